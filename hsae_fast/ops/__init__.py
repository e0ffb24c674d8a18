"""The model's two ops, registered with `torch.library` so `torch.compile` sees them whole:
`encode_tree` (the top-down encode of every level: scores, selection, activations) and `sparse_decode`.
Each dispatches to the backend named in its `backend` argument; the backward is sparse.
AuxK's scoring and decode of the dead features are `ops/auxk.py` (eager: the dead set is data-dependent)."""
from .decode import sparse_decode
from .encode import encode_tree

__all__ = ["encode_tree", "sparse_decode"]
