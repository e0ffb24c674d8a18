"""The model's two ops, registered with `torch.library` so `torch.compile` sees them whole:
`encode_level` (score one level, keep each token's best candidates) and `sparse_decode`.
Each dispatches to the backend named in its `backend` argument; the backward is sparse."""
from .decode import sparse_decode
from .encode import encode_level

__all__ = ["encode_level", "sparse_decode"]
