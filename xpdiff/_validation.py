"""Argument checks for every public boundary: constructors, ``generate``, schedulers,
``TrainConfig`` and config files, command-line flags.

Each helper checks one value once and returns it in its plain Python form (``int``,
``float``, ``bool``).  A failure raises :class:`ArgumentError` (a ``ValueError``) whose
message names the caller, the argument, what was expected and what came::

    UNet2DModel: expected layers_per_block to be an integer >= 1, got 0

A value of the wrong type raises :class:`ArgumentTypeError`, which is both an
``ArgumentError`` and a ``TypeError``.  ``bool`` is never taken for a number, strings
are never taken for numbers or booleans (``"false"`` in a JSON file is an error, not
True), and floats must be finite unless ``finite=False``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_float",
    "check_int",
    "check_int_list",
]


class ArgumentError(ValueError):
    """A public argument has a bad value; the message names it."""


class ArgumentTypeError(ArgumentError, TypeError):
    """A public argument has the wrong type (also a ``TypeError``)."""


def _fail(where: str, name: str, what: str, value: Any, kind: type = ArgumentError) -> None:
    raise kind(f"{where}: expected {name} to be {what}, got {value!r}")


def _range_text(noun: str, lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return f"{noun} {' and '.join(parts)}" if parts else noun


def check_int(
    where: str,
    name: str,
    value: Any,
    *,
    min: int | None = None,
    max: int | None = None,
    none: bool = False,
) -> int | None:
    """``value`` as a Python int in [min, max] (``None`` passes when ``none``).

    Integer-like objects (NumPy integer scalars) are accepted; bool, float (even 3.0),
    str and everything else are not.
    """
    if value is None and none:
        return None
    what = _range_text("an integer", min, max) + (" or None" if none else "")
    if isinstance(value, bool):
        _fail(where, name, what, value, ArgumentTypeError)
    try:
        v = operator.index(value)
    except TypeError:
        _fail(where, name, what, value, ArgumentTypeError)
    if (min is not None and v < min) or (max is not None and v > max):
        _fail(where, name, what, value)
    return v


def check_float(
    where: str,
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    finite: bool = True,
    none: bool = False,
) -> float | None:
    """``value`` as a Python float in [min, max] (an end is excluded when ``min_open`` or
    ``max_open``).

    Real numbers of any kind (int, float, NumPy scalars) are accepted; bool, str and
    complex are not.  NaN is always refused, infinities unless ``finite=False``.
    """
    if value is None and none:
        return None
    noun = "a finite number" if finite else "a number"
    what = _range_text(noun, min, max, min_open, max_open) + (" or None" if none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(where, name, what, value, ArgumentTypeError)
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        _fail(where, name, what, value)
    if min is not None and (v <= min if min_open else v < min):
        _fail(where, name, what, value)
    if max is not None and (v >= max if max_open else v > max):
        _fail(where, name, what, value)
    return v


def check_bool(where: str, name: str, value: Any) -> bool:
    """``value`` if it is exactly True or False (no strings, no 0/1)."""
    if not isinstance(value, bool):
        _fail(where, name, "True or False", value, ArgumentTypeError)
    return value


def check_choice(where: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        _fail(where, name, f"one of {', '.join(map(repr, choices))}", value)
    return value


def check_dtype(where: str, value: Any, xp: Any = None, *, name: str = "dtype") -> str:
    """The name, ``"float32"`` or ``"float64"``, of a float dtype given by that name or as
    the namespace's own dtype (``xp.float32``; ``xp`` None: the default backend's).

    Layers store parameters in these two dtypes only; anything else (``"int32"``,
    ``"float"``, ``xp.int64``, a dtype of another library) is refused.
    """
    names = ("float32", "float64")
    if isinstance(value, str):
        return check_choice(where, name, value, names)
    if xp is None:
        from . import backend

        xp = backend.default_namespace()
    for n in names:
        try:
            if bool(value == getattr(xp, n)):
                return n
        except Exception:  # an array or an object that cannot compare with a dtype
            continue
    _fail(
        where,
        name,
        "one of 'float32', 'float64' or the namespace's float32 or float64",
        value,
        ArgumentTypeError,
    )


def check_int_list(
    where: str, name: str, value: Any, *, min: int | None = None, length: int | None = None
) -> list[int]:
    """``value`` (a list or tuple of integers, each >= ``min``) as a list of ints."""
    what = f"a list of {_range_text('integers', min, None)}"
    if length is not None:
        what += f" of length {length}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(where, name, what, value, ArgumentTypeError)
    out = []
    for v in value:
        if isinstance(v, bool):
            _fail(where, name, what, value, ArgumentTypeError)
        try:
            i = operator.index(v)
        except TypeError:
            _fail(where, name, what, value, ArgumentTypeError)
        if min is not None and i < min:
            _fail(where, name, what, value)
        out.append(i)
    if length is not None and len(out) != length:
        _fail(where, name, what, value)
    return out
