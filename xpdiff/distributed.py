"""Data-parallel training over MPI: the one module of xpdiff that knows MPI or NCCL.

:func:`world` describes the processes this program runs as.  Launched by ``mpiexec -n N``
(N > 1) it is an :class:`MPIWorld` over ``MPI.COMM_WORLD`` (mpi4py, the ``mpi`` extra:
``pip install "xpdiff[mpi]"``); otherwise it is a :class:`World` of one process whose every
collective is a no-op, and mpi4py is never imported.  Both offer the same interface:

* ``rank``, ``size``, :meth:`World.barrier`;
* :meth:`World.allreduce_sum` of one contiguous buffer (float32 or float64), in place;
* :func:`allreduce_gradients`: all parameter gradients flattened into ONE contiguous buffer
  and summed across processes by one all-reduce per step (no per-parameter messages);
* :func:`broadcast_parameters`: rank 0's parameters to every rank, also one buffer;
* small Python objects: :meth:`World.broadcast_object`, :meth:`World.allgather_object`,
  :meth:`World.check_same` (every rank must hold the same value) and :meth:`World.on_root`
  (run a function on rank 0 only, every rank returns its result or raises its error, so a
  failure there stops all ranks instead of leaving them waiting in the next collective).

Device buffers (CuPy): with ``cupy.cuda.nccl`` available, :class:`MPIWorld` sums and
broadcasts them through an NCCL communicator whose unique id rank 0 sends over MPI (each
rank on GPU ``local_rank % device_count``: :meth:`World.use_local_device`, called before the
model is built); without NCCL they go through host memory.  A
CUDA-aware MPI could take device pointers directly; mpi4py cannot tell whether the MPI
underneath is one, so host staging is the safe default.  ``cupy.cuda`` and its NCCL binding
come from :func:`xpdiff.backend.cupy_cuda` (the array library stays behind that module).

How the launch is recognised: ``mpiexec`` of MPICH (and Intel MPI, MVAPICH) sets
``PMI_SIZE``, Open MPI's sets ``OMPI_COMM_WORLD_SIZE``, MVAPICH2's ``MV2_COMM_WORLD_SIZE``.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from . import backend

__all__ = [
    "MPIWorld",
    "World",
    "allreduce_gradients",
    "broadcast_parameters",
    "flatten",
    "gradient_buffer",
    "launched_size",
    "set_gradients",
    "unflatten",
    "world",
]

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_size() -> int:
    """The number of processes ``mpiexec`` started, read from its environment (1 when this
    process was not launched by ``mpiexec``).

    Raises:
        ValueError: a launcher variable that is not a positive integer (named).
    """
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(
                f"distributed: expected {name} to be a positive integer, got {value!r}"
            )
        return size
    return 1


class World:
    """One process: rank 0 of 1; every collective returns its input.

    Subclasses implement the collectives for several processes; the methods' contracts
    (shapes, dtypes, errors) are stated here once.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among the processes of this machine

    @property
    def is_root(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process has arrived here."""

    def use_local_device(self) -> None:
        """With CuPy, make GPU ``local_rank % device_count`` this process's current device;
        call it before building the model.  A no-op for one process."""

    def allreduce_sum(self, buffer: Any) -> Any:
        """Sum a contiguous 1-D buffer (float32 or float64, host or CuPy) over all processes,
        in place; returns it.  Every process passes a buffer of the same length and dtype."""
        return buffer

    def broadcast(self, buffer: Any, root: int = 0) -> Any:
        """Overwrite a contiguous 1-D buffer on every process with ``root``'s, in place;
        returns it."""
        return buffer

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``root``'s picklable ``obj`` on every process."""
        return obj

    def allgather_object(self, obj: Any) -> list:
        """Every process's picklable ``obj``, as a list in rank order."""
        return [obj]

    def allreduce_scalar(self, value: float) -> float:
        """The float64 sum of one number over all processes (NaN and inf propagate)."""
        return float(value)

    def check_same(self, what: str, value: Any) -> None:
        """Require every process to hold an equal ``value`` (e.g. a model configuration).

        Raises:
            ValueError (on every process): the ranks disagree; the message names ``what``
                and which ranks differ from rank 0.
        """
        values = self.allgather_object(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(
                f"distributed: every process must have the same {what}, but ranks {differ} "
                f"differ from rank 0 ({values[differ[0]]!r:.200} against {values[0]!r:.200})"
            )

    def on_root(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on rank 0 only; every process returns its result.

        The other processes wait for rank 0 (a barrier after its work), so what it writes
        exists for all of them afterwards.  If ``fn`` raises, rank 0 raises that exception
        and the others raise one of the same type and message (a RuntimeError when that
        type cannot be built from a message), so every process stops together.
        """
        if self.size == 1:
            return fn(*args)
        outcome: tuple[str, Any]
        error = None
        if self.is_root:
            try:
                outcome = ("ok", fn(*args))
            except Exception as err:  # sent to the others, then re-raised here
                error = err
                outcome = ("error", (type(err), str(err)))
        else:
            outcome = ("", None)
        kind, payload = self.broadcast_object(outcome)
        if error is not None:
            raise error
        if kind == "error":
            cls, message = payload
            try:
                err = cls(message)
            except Exception:
                err = RuntimeError(message)
            raise err
        return payload


class MPIWorld(World):
    """The processes of an MPI communicator (default ``MPI.COMM_WORLD``).

    Args:
        comm: an mpi4py communicator; None: ``MPI.COMM_WORLD``.

    Raises:
        ImportError: mpi4py is not installed (the message says how to install it).
    """

    def __init__(self, comm: Any = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = local.Get_rank()
        local.Free()
        self._nccl_comm: Any = None

    def barrier(self) -> None:
        self.comm.Barrier()

    def use_local_device(self) -> None:
        cuda = backend.cupy_cuda()
        if cuda is None:
            raise ImportError("distributed.use_local_device: CuPy (cupy.cuda) does not import")
        cuda.Device(self.local_rank % cuda.runtime.getDeviceCount()).use()

    def allreduce_sum(self, buffer: Any) -> Any:
        _check_buffer("allreduce_sum", buffer)
        if not backend.on_host(buffer) and _nccl() is not None:
            nccl = _nccl()
            self._nccl().allReduce(
                buffer.data.ptr,
                buffer.data.ptr,
                buffer.size,
                _nccl_dtype(nccl, buffer),
                nccl.NCCL_SUM,
                _current_stream_ptr(buffer),
            )
            return buffer
        return self._through_host(buffer, lambda host: self.comm.Allreduce(self.MPI.IN_PLACE, host))

    def broadcast(self, buffer: Any, root: int = 0) -> Any:
        _check_buffer("broadcast", buffer)
        if not backend.on_host(buffer) and _nccl() is not None:
            nccl = _nccl()
            self._nccl().bcast(
                buffer.data.ptr,
                buffer.size,
                _nccl_dtype(nccl, buffer),
                root,
                _current_stream_ptr(buffer),
            )
            return buffer
        return self._through_host(buffer, lambda host: self.comm.Bcast(host, root=root))

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def allreduce_scalar(self, value: float) -> float:
        return float(self.comm.allreduce(float(value), op=self.MPI.SUM))

    def _through_host(self, buffer: Any, op: Callable[[Any], Any]) -> Any:
        """Apply an MPI operation to a host copy of ``buffer`` (a view for NumPy) and write
        the result back where it came from."""
        host = backend.to_numpy(buffer, contiguous=True)
        op(host)
        return buffer if host is buffer else _copy_into(buffer, host)

    def _nccl(self) -> Any:
        """This world's NCCL communicator, made on first use on the current device (see
        :meth:`use_local_device`): rank 0 draws the unique id and sends it over MPI."""
        if self._nccl_comm is None:
            nccl = _nccl()
            uid = nccl.get_unique_id() if self.is_root else None
            uid = self.broadcast_object(uid)
            self._nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl_comm


def _copy_into(buffer: Any, host: Any) -> Any:
    xp = backend.get_namespace(buffer)
    moved = backend.asarray(host, xp, device=backend.device(buffer))
    buffer[...] = moved
    return buffer


def _check_buffer(where: str, buffer: Any) -> None:
    shape = tuple(getattr(buffer, "shape", ()))
    name = backend.dtype_name(buffer.dtype) if hasattr(buffer, "dtype") else type(buffer).__name__
    if len(shape) != 1 or name not in ("float32", "float64"):
        raise ValueError(
            f"distributed.{where}: expected a 1-D float32 or float64 buffer, got {name} {shape}"
        )


def _mpi() -> Any:
    """mpi4py's MPI module (importing it initialises MPI)."""
    try:
        return importlib.import_module("mpi4py.MPI")
    except ImportError as err:
        raise ImportError(
            f"distributed: this program was launched as {launched_size()} processes, which "
            f'needs mpi4py: pip install "xpdiff[mpi]" ({err})'
        ) from err


_NCCL: Any = None


def _nccl() -> Any:
    """``cupy.cuda.nccl`` when CuPy was built with NCCL, else None."""
    global _NCCL
    if _NCCL is None:
        nccl = backend.cupy_cuda("nccl")
        _NCCL = nccl if nccl is not None and getattr(nccl, "available", True) else False
    return _NCCL or None


def _nccl_dtype(nccl: Any, buffer: Any) -> int:
    return {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}[
        backend.dtype_name(buffer.dtype)
    ]


def _current_stream_ptr(buffer: Any) -> int:
    return backend.cupy_cuda().get_current_stream().ptr


_WORLD: World | None = None


def world() -> World:
    """The processes this program runs as (made once, then shared).

    Raises:
        ImportError: launched as several processes without mpi4py installed.
        ValueError: a launcher variable that is not a positive integer.
    """
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIWorld() if launched_size() > 1 else World()
    return _WORLD


# ---------------------------------------------------------------------------
# parameters and gradients as one buffer
# ---------------------------------------------------------------------------
def flatten(arrays: Sequence[Any], xp: Any) -> Any:
    """One contiguous 1-D buffer ``(sum of sizes,)`` holding ``arrays`` (of one dtype) one
    after another (row-major), in namespace ``xp``.

    Raises:
        ValueError: no arrays.
    """
    if not arrays:
        raise ValueError("distributed.flatten: expected at least one array, got none")
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


def unflatten(buffer: Any, shapes: Sequence[tuple[int, ...]]) -> list:
    """Views of ``buffer`` (1-D) with the given shapes, in order: the inverse of
    :func:`flatten`.

    Raises:
        ValueError: the shapes do not add up to the buffer's length.
    """
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != buffer.shape[0]:
        raise ValueError(
            f"distributed.unflatten: expected a buffer of {sum(sizes)} elements for "
            f"{len(shapes)} shapes, got {buffer.shape[0]}"
        )
    xp = backend.get_namespace(buffer)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(xp.reshape(buffer[start : start + size], shape))
        start += size
    return out


def gradient_buffer(params: Sequence[Any]) -> Any:
    """The gradients of ``params`` (``Parameter`` objects of one dtype) flattened into one
    buffer; a parameter without a gradient contributes zeros."""
    first = params[0].data
    xp = backend.get_namespace(first)
    grads = [
        p.grad if p.grad is not None else xp.zeros_like(p.data, device=backend.device(p.data))
        for p in params
    ]
    return flatten(grads, xp)


def set_gradients(params: Sequence[Any], buffer: Any) -> None:
    """Make each parameter's gradient its part of ``buffer`` (views, no copy)."""
    for p, g in zip(params, unflatten(buffer, [p.shape for p in params]), strict=True):
        p.grad = g


def allreduce_gradients(params: Sequence[Any], comm: World) -> Any:
    """Sum every parameter's gradient over all processes with ONE all-reduce of one
    contiguous buffer (the gradients flattened in parameter order); each gradient becomes a
    view of the summed buffer, which is returned.

    The caller scales its gradients first (by its share of the global batch, so the sum is
    the global batch's mean gradient).  With two processes each element is one addition,
    exact and independent of the order; with more, MPI chooses the order of the additions.
    """
    buffer = gradient_buffer(params)
    comm.allreduce_sum(buffer)
    set_gradients(params, buffer)
    return buffer


def broadcast_parameters(params: Sequence[Any], comm: World, root: int = 0) -> None:
    """Overwrite every parameter with rank ``root``'s values (one broadcast of one buffer)."""
    if comm.size == 1 or not params:
        return
    first = params[0].data
    buffer = flatten([p.data for p in params], backend.get_namespace(first))
    comm.broadcast(buffer, root)
    xp = backend.get_namespace(first)
    for p, value in zip(params, unflatten(buffer, [p.shape for p in params]), strict=True):
        p.data = xp.asarray(value, copy=True)
