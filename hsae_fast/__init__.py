"""hsae_fast: hierarchical sparse autoencoders, fast."""
from .backends import available_backends
from .config import HSAEConfig
from .layer import HSAELayer, HSAEOutput
from .reference import reference_forward

__all__ = ["HSAEConfig", "HSAELayer", "HSAEOutput", "available_backends", "reference_forward"]
__version__ = "0.1.0"
