"""Parameter initialisation from one seeded generator (``manual_seed``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .. import backend

__all__ = ["manual_seed", "normal", "ones", "seeded", "uniform", "zeros"]

_rng: backend.Generator | None = None


def manual_seed(seed: int) -> None:
    """Seed the generator every layer constructor draws its initial weights from."""
    global _rng
    _rng = backend.Generator(seed, backend.namespace_for("numpy"))


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Layers built inside draw their weights from a generator seeded with ``seed``; the
    global generator (``manual_seed``) is left as it was.  ``None`` uses the global one."""
    global _rng
    if seed is None:
        yield
        return
    prev = _rng
    _rng = backend.Generator(seed, backend.namespace_for("numpy"))
    try:
        yield
    finally:
        _rng = prev


def _gen() -> backend.Generator:
    global _rng
    if _rng is None:
        manual_seed(0)
    return _rng


def _place(host: Any, xp: Any | None, dtype: str) -> Any:
    return backend.to_namespace(host.astype(dtype), xp or backend.default_namespace())


def uniform(shape: tuple[int, ...], bound: float, dtype: str = "float32", xp: Any = None) -> Any:
    """Uniform in [-bound, bound) (drawn in float64 on the host, then cast)."""
    host = (_gen().uniform(shape, dtype="float64") * 2.0 - 1.0) * bound
    return _place(host, xp, dtype)


def normal(shape: tuple[int, ...], std: float = 1.0, dtype: str = "float32", xp: Any = None) -> Any:
    host = _gen().normal(shape, dtype="float64") * std
    return _place(host, xp, dtype)


def zeros(shape: tuple[int, ...], dtype: str = "float32", xp: Any = None) -> Any:
    xp = xp or backend.default_namespace()
    return xp.zeros(shape, dtype=getattr(xp, dtype))


def ones(shape: tuple[int, ...], dtype: str = "float32", xp: Any = None) -> Any:
    xp = xp or backend.default_namespace()
    return xp.ones(shape, dtype=getattr(xp, dtype))
