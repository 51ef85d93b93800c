"""Two DDP processes (gloo, CPU) train a tiny gated model and end with identical gate logits.

Each rank sees different data and draws different gate noise, so only DDP's gradient averaging
keeps the logits equal.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conformer_prune.gated_conformer import insert_gates
from conformer_prune.gates import RetentionRegulariser, TargetSchedule, iter_gates
from conformer_prune.model import build_asr_modules
from tiny import TINY_ARCH
from tiny_runs import free_port

WORLD_SIZE = 2
VOCAB = 8


class _ASR(torch.nn.Module):
    """The full CTC/attention forward, so that every parameter takes part in the reduction."""

    def __init__(self, modules):
        super().__init__()
        self.modules_ = modules

    def forward(self, feats, tokens):
        m = self.modules_
        encoded, decoded = m["Transformer"](m["CNN"](feats), tokens)
        return m["ctc_lin"](encoded), m["seq_lin"](decoded)


def _train(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)  # same model on every rank (DDP also broadcasts rank 0's)
    modules = build_asr_modules(**{**TINY_ARCH, "vocab_size": VOCAB, "num_encoder_layers": 1})
    model = torch.nn.parallel.DistributedDataParallel(_ASR(insert_gates(modules)))
    regulariser = RetentionRegulariser(1.0, TargetSchedule("linear", 3.0, -3.0))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data and gate noise on each rank
    steps = 4
    for step in range(steps):
        tokens = torch.randint(1, VOCAB, (2, 5))  # 0 is padding
        ctc_out, seq_out = model(torch.randn(2, 24, 16), tokens)
        # Bounded stand-ins for the CTC and attention losses.
        loss = ctc_out.log_softmax(-1)[..., 0].mean().neg()
        loss = loss + torch.nn.functional.cross_entropy(seq_out.transpose(1, 2), tokens)
        loss = loss + regulariser(model.module, step / steps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    logits = torch.cat([gate.logits.detach() for _, gate in iter_gates(model.module)])
    torch.save(logits, os.path.join(out_dir, f"logits{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_keeps_gate_logits_identical(tmp_path):
    # fork: the children inherit the imported modules instead of importing SpeechBrain again.
    mp.start_processes(
        _train,
        args=(free_port(), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="fork",
    )
    logits = [torch.load(tmp_path / f"logits{rank}.pt") for rank in range(WORLD_SIZE)]
    initial = torch.full_like(logits[0], logits[0].new_tensor(0.95).logit().item())
    assert not torch.allclose(logits[0], initial)  # the gates did train
    assert torch.equal(logits[0], logits[1])
