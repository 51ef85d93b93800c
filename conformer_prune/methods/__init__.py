"""Pruning methods behind one small interface (`PruningMethod`), one module each.

A method is named in the training YAML (`method: !new:conformer_prune.methods.<module>.<Class>`
with its settings) and the Brain, the shrink, the decoder and the dashboard only ever call the
interface, so adding a method is one new module and one YAML. See docs/METHODS_API.md.
"""

from conformer_prune.methods.base import Dense, PruningMethod

__all__ = ["Dense", "PruningMethod"]
