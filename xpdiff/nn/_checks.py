"""Input validation shared by the layers: fail fast, say what was expected and what came."""

from __future__ import annotations

from typing import Any

from .. import backend


def check_input(
    where: str,
    x: Any,
    *,
    like: Any = None,
    ndim: int | None = None,
    axis: int = 1,
    size: int | None = None,
    layout: str = "",
) -> Any:
    """Validate ``x`` and return the shared namespace of ``x`` and ``like``.

    Raises:
        TypeError: x is not an array, comes from another library than ``like``,
            or has another dtype than ``like``.
        ValueError: wrong number of dimensions, or ``x.shape[axis] != size``.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{where}: expected an array, got {type(x).__name__}")
    xp = backend.get_namespace(x, like, where=where)
    shape = tuple(x.shape)
    if ndim is not None and len(shape) != ndim:
        lay = f" {layout}" if layout else ""
        raise ValueError(f"{where}: expected a {ndim}-D input{lay}, got shape {shape}")
    needed = axis + 1 if axis >= 0 else -axis
    if size is not None and (len(shape) < needed or shape[axis] != size):
        raise ValueError(f"{where}: expected size {size} on axis {axis}, got shape {shape}")
    if like is not None and x.dtype != like.dtype:
        raise TypeError(
            f"{where}: expected dtype {backend.dtype_name(like.dtype)} (the layer's weights), "
            f"got {backend.dtype_name(x.dtype)}"
        )
    return xp
