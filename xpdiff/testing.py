"""Test helpers: gradient checking by finite differences, and array comparison."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import backend
from .nn.module import Module, no_grad

__all__ = ["assert_close", "check_backward"]


def _is_float(x: Any) -> bool:
    return backend.dtype_name(x.dtype) in ("float32", "float64")


def _dot(xp: Any, a: Any, b: Any) -> float:
    return float(xp.sum(a * b))


def check_backward(
    module: Module,
    inputs: Sequence[Any],
    kwargs: dict | None = None,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
    params: bool = True,
    forward: Callable[..., Any] | None = None,
) -> dict[str, tuple[float, float]]:
    """Compare ``module.backward`` with a central difference along random directions.

    For each floating-point input, and each parameter when ``params``, one random
    direction ``d`` is drawn and ``(L(z + eps d) - L(z - eps d)) / (2 eps)`` is
    compared with ``<grad_z, d>`` where ``L = sum(y * gy)`` for a random ``gy``.
    The tolerance is ``atol + rtol * max(|analytic|, |numeric|, sum|grad_z * d|)`` plus
    the round-off of the difference quotient, ``1e-15 * (|L+| + |L-|) / eps``.
    Run it in float64.  ``forward`` replaces ``module.forward`` when given (for
    modules whose forward needs a wrapper).  Integer inputs (labels, timesteps)
    get no check.

    Returns:
        ``{name: (analytic, numeric)}`` for every checked tensor.

    Raises:
        AssertionError: naming the first tensor whose gradient disagrees.
    """
    kwargs = kwargs or {}
    fwd = forward or module.forward
    xp = backend.get_namespace(*[x for x in inputs if hasattr(x, "shape")])
    gen = backend.Generator(seed, xp, device=backend.device(inputs[0]))
    inputs = list(inputs)

    module.zero_grad()
    y = fwd(*inputs, **kwargs)
    gy = gen.normal(tuple(y.shape), dtype=y.dtype)
    grads = module.backward(gy)
    if not isinstance(grads, tuple):
        grads = (grads,)

    def loss() -> float:
        with no_grad():
            return _dot(xp, fwd(*inputs, **kwargs), gy)

    results: dict[str, tuple[float, float]] = {}

    def check(name: str, get: Callable[[], Any], put: Callable[[Any], None], grad: Any) -> None:
        z0 = get()
        d = gen.normal(tuple(z0.shape), dtype=z0.dtype)
        put(z0 + eps * d)
        lp = loss()
        put(z0 - eps * d)
        lm = loss()
        put(z0)
        numeric = (lp - lm) / (2 * eps)
        if grad is None:
            raise AssertionError(f"check_backward: {name} received no gradient")
        if tuple(grad.shape) != tuple(z0.shape) or grad.dtype != z0.dtype:
            raise AssertionError(
                f"check_backward: gradient of {name} has shape {tuple(grad.shape)} and "
                f"dtype {grad.dtype}, expected {tuple(z0.shape)} and {z0.dtype}"
            )
        analytic = _dot(xp, grad, d)
        results[name] = (analytic, numeric)
        # the directional derivative is a sum with cancellations; judge its error against
        # the size of its terms, and allow the difference quotient's own round-off
        terms = float(xp.sum(xp.abs(grad * d)))
        roundoff = 1e-15 * (abs(lp) + abs(lm)) / eps
        tol = atol + roundoff + rtol * max(abs(analytic), abs(numeric), terms)
        if abs(analytic - numeric) > tol:
            raise AssertionError(
                f"check_backward: gradient of {name} disagrees: analytic {analytic!r}, "
                f"finite difference {numeric!r}"
            )

    for i, x in enumerate(inputs):
        if not hasattr(x, "shape") or not _is_float(x):
            continue
        g = grads[i] if i < len(grads) else None

        def put(v: Any, i: int = i) -> None:
            inputs[i] = v

        check(f"input {i}", lambda i=i: inputs[i], put, g)

    if params:
        for name, p in module.named_parameters():

            def put(v: Any, p=p) -> None:
                p.data = v

            check(name, lambda p=p: p.data, put, p.grad)
    return results


def assert_close(actual: Any, desired: Any, *, rtol: float = 1e-7, atol: float = 0.0) -> None:
    """Assert equal dtype name and shape, and values within ``atol + rtol*|desired|``.

    ``desired`` may be an array of another library: both are compared on the host.
    """
    a = backend.to_numpy(actual)
    d = backend.to_numpy(desired)
    assert backend.dtype_name(actual.dtype) == backend.dtype_name(desired.dtype), (
        f"dtype {actual.dtype} != {desired.dtype}"
    )
    assert a.shape == d.shape, f"shape {a.shape} != {d.shape}"
    err = abs(a.astype("float64") - d.astype("float64"))
    tol = atol + rtol * abs(d.astype("float64"))
    if not (err <= tol).all():
        worst = float((err - tol).max())
        raise AssertionError(
            f"arrays differ: max abs error {float(err.max())!r}, exceeds tolerance by {worst!r} "
            f"(rtol={rtol}, atol={atol})"
        )
