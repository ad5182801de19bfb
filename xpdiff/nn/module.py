"""Parameters, Modules and the switch that turns caching off for sampling.

A Module's ``forward`` keeps the smallest cache its ``backward`` needs (unless
``no_grad()`` is active); ``backward(grad_output)`` returns the gradient with
respect to the forward's array inputs and ADDS into each ``Parameter.grad``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from .. import backend

__all__ = [
    "Module",
    "ModuleList",
    "Parameter",
    "Sequential",
    "is_grad_enabled",
    "no_grad",
]

_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``: forwards keep no cache, backward is unavailable."""
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run forwards without keeping caches (sampling, evaluation)."""
    prev = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = prev


class Parameter:
    """A trainable array and its accumulated gradient (``None`` until a backward)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: Any):
        self.data = data
        self.grad = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    def accumulate(self, g: Any) -> None:
        """Add ``g`` into ``grad`` (the first call stores it)."""
        if self.grad is None:
            self.grad = g
        else:
            self.grad = self.grad + g

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={backend.dtype_name(self.dtype)})"


class Module:
    """Base class: holds Parameters and child Modules under dotted names.

    Subclasses implement ``forward`` and ``backward``.  Children are registered
    by attribute assignment, in order, so ``named_parameters`` yields the same
    dotted names (``down_blocks.0.resnets.1.conv1.weight``) as diffusers.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "backward" in cls.__dict__:
            cls.backward = _checking_grad_shape(cls.__dict__["backward"])

    def __init__(self) -> None:
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_out_shape", None)

    # -- where the parameters live ---------------------------------------------
    def _first_parameter(self) -> Any:
        for _, p in self.named_parameters():
            return p.data
        raise AttributeError(f"{type(self).__name__} has no parameters")

    @property
    def xp(self) -> Any:
        """The array-API namespace of the parameters (of the first one)."""
        return backend.get_namespace(self._first_parameter())

    @property
    def dtype(self) -> Any:
        """The dtype of the parameters (of the first one)."""
        return self._first_parameter().dtype

    @property
    def device(self) -> Any:
        """The device of the parameters (of the first one)."""
        return backend.device(self._first_parameter())

    # -- registration --------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_params" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        self._params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # -- calling -------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``forward``; a call from outside any module (the model a user calls) also records
        the output shape, which its ``backward`` then checks the gradient against."""
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        try:
            out = self.forward(*args, **kwargs)
        finally:
            _state.depth = depth
        if depth == 0 and is_grad_enabled() and hasattr(out, "shape"):
            object.__setattr__(self, "_out_shape", tuple(out.shape))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad_output: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def _save(self, cache: Any) -> None:
        """Keep ``cache`` for backward unless gradients are disabled."""
        object.__setattr__(self, "_cache", cache if is_grad_enabled() else None)

    def _take(self) -> Any:
        """Return and release the forward cache; a clear error if there is none."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward cache; call forward first "
                "(outside no_grad()), and call backward once per forward"
            )
        object.__setattr__(self, "_cache", None)
        return cache

    # -- traversal -----------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for mname, m in self.named_modules(prefix):
            for pname, p in m._params.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        n = 0
        for p in self.parameters():
            size = 1
            for d in p.shape:
                size *= d
            n += size
        return n

    def zero_grad(self) -> None:
        """Drop every parameter gradient (the next backward stores fresh ones)."""
        for p in self.parameters():
            p.grad = None

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> OrderedDict:
        """Ordered ``name -> array`` of every parameter (the arrays themselves)."""
        return OrderedDict((n, p.data) for n, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, moved to each parameter's namespace and dtype.

        Raises:
            KeyError: with every missing, unexpected and shape-mismatched key listed
                (missing/unexpected only when ``strict``; mismatches always).
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        mismatched = [
            f"{k}: expected {params[k].shape}, got {tuple(state[k].shape)}"
            for k in params
            if k in state and tuple(state[k].shape) != params[k].shape
        ]
        problems = []
        if strict and missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        if problems:
            raise KeyError(f"{type(self).__name__}.load_state_dict: " + " | ".join(problems))
        for k, p in params.items():
            if k in state:
                xp = backend.get_namespace(p.data)
                host = backend.to_numpy(state[k]).astype(backend.dtype_name(p.dtype))
                p.data = backend.asarray(host, xp, device=backend.device(p.data))
                p.grad = None

    def to(self, backend_name: str | None = None, dtype: str | None = None) -> Module:
        """Move every parameter to another backend and/or dtype (``"float32"``/``"float64"``).

        ``backend_name`` is one of numpy, cupy, torch, array_api_strict.
        """
        if dtype is not None and dtype not in ("float32", "float64"):
            raise ValueError(
                f"{type(self).__name__}.to: dtype must be float32 or float64, got {dtype!r}"
            )
        for p in self.parameters():
            xp = (
                backend.namespace_for(backend_name)
                if backend_name is not None
                else backend.get_namespace(p.data)
            )
            host = backend.to_numpy(p.data)
            if dtype is not None:
                host = host.astype(dtype)
            p.data = backend.asarray(host, xp)
            p.grad = None
        return self

    def __repr__(self) -> str:
        lines = [type(self).__name__ + "("]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + ")" if len(lines) > 1 else type(self).__name__ + "()"


def _checking_grad_shape(backward: Any) -> Any:
    """Wrap a ``backward`` so a gradient whose shape differs from the recorded output shape
    of the last outermost call fails with both shapes (a shape compare: no device sync)."""

    @functools.wraps(backward)
    def checked(self: Module, *args: Any, **kwargs: Any) -> Any:
        expected = self.__dict__.get("_out_shape")
        object.__setattr__(self, "_out_shape", None)
        grad_output = args[0] if args else kwargs.get("grad_output")
        if expected is not None and grad_output is not None:
            got = tuple(getattr(grad_output, "shape", ()))
            if not hasattr(grad_output, "shape") or got != expected:
                what = (
                    f"shape {got}" if hasattr(grad_output, "shape") else type(grad_output).__name__
                )
                raise ValueError(
                    f"{type(self).__name__}.backward: expected grad_output of shape {expected} "
                    f"(the shape of the forward output), got {what}"
                )
        return backward(self, *args, **kwargs)

    return checked


class ModuleList(Module):
    """A list of Modules registered under names ``"0"``, ``"1"``, ..."""

    def __init__(self, modules: list[Module] | None = None):
        super().__init__()
        for m in modules or []:
            self.append(m)

    def append(self, m: Module) -> None:
        setattr(self, str(len(self._modules)), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))


class Sequential(ModuleList):
    """Applies its children in order; backward runs them in reverse."""

    def forward(self, x: Any) -> Any:
        for m in self:
            x = m(x)
        return x

    def backward(self, grad_output: Any) -> Any:
        g = grad_output
        for m in reversed(list(self)):
            g = m.backward(g)
        return g
