"""AdamR: Adam with a decoupled pull back toward the weights it started from (DAREx-L2).

Fine-tuning a variant with AdamR keeps its delta from the base small, so that delta-parameter
pruning (delta.py) survives higher drop rates (Deng et al. 2025, METHODS.md section 3). Before
each Adam step every parameter moves toward its base value:

    theta <- theta - pull * lr * (theta - theta_base) / s

where `s` is the square root of the mean of Adam's bias-corrected second moment `v_hat` over
all elements (one number; 1 before the first step, and where it is 0), then torch's own Adam
step runs unchanged, so `pull: 0` is Adam exactly. `theta_base` is each parameter's value when
the optimiser is built: in the recipe, after the method loaded the base checkpoint.

Deviation from the authors' code (AdamR.py), said here because it is visible in numbers: their
pull uses the `v_hat` of the current step (after the moment update); here it uses the previous
step's, because the moment update happens inside torch's Adam step and keeping that step
untouched is what makes `pull: 0` exactly Adam. The two differ by one step of the moving average.
"""

import torch


class AdamR(torch.optim.Adam):
    """torch.optim.Adam plus `pull` (the authors' lambda; their code passes it as
    weight_decay, default 1e-4), the strength of the decoupled pull toward the base weights."""

    def __init__(self, params, lr=1e-3, pull=1e-4, **adam_args):
        super().__init__(params, lr=lr, **adam_args)
        if pull < 0:
            raise ValueError(f"AdamR: pull {pull!r} must be >= 0")
        self.pull = pull
        self.base = {p: p.detach().clone() for group in self.param_groups
                     for p in group["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        if self.pull:
            scale = self._second_moment_scale()
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.sub_(param - self.base[param],
                                   alpha=self.pull * group["lr"] / scale)
        return super().step(closure)

    def _second_moment_scale(self):
        """sqrt(mean v_hat) over every element with Adam state; 1 before the first step."""
        total, count = 0.0, 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                correction = 1.0 - beta2 ** float(state["step"])
                total += float(state["exp_avg_sq"].sum()) / correction
                count += state["exp_avg_sq"].numel()
        scale = (total / count) ** 0.5 if count else 0.0
        return scale if scale > 0 else 1.0
