"""xpdiff: array-API diffusion models with hand-derived backward passes."""

from .backend import get_backend, set_backend

__version__ = "0.1.0"

__all__ = ["get_backend", "set_backend", "__version__"]
