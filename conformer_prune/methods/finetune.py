"""Fine-tuning the trained dense run without pruning: the reference for prune-then-fine-tune
methods, and the start of a fine-tuned variant (delta.py).

The unstructured and structured magnitude methods fine-tune the dense model for a few more
epochs while or after pruning; part of what they gain over the dense run is those extra updates.
This method gives the same updates with nothing pruned, so that the comparison at equal
training is on the dashboard too.
"""

from conformer_prune.methods.base import PruningMethod
from conformer_prune.methods.structured_magnitude import load_dense_run


class FineTune(PruningMethod):
    """Loads the dense run's last checkpoint (model and normaliser) and trains on; prunes nothing.

    Arguments
    ---------
    dense_run : str
        The training run (results/<name>/<seed>) to start from.
    """

    kind = "dense"
    model_kind = "dense"

    def __init__(self, dense_run, name="finetune"):
        self.dense_run = str(dense_run)
        self.name = name
        self.source = None

    def attach(self, modules):
        self.source = str(load_dense_run(modules, self.dense_run))
        return modules

    def results_summary(self, modules):
        return {"finetuned_from": self.source}

    def settings(self):
        return {"dense_run": self.dense_run}
