"""Files in diffusers' layout: config.json + diffusion_pytorch_model.safetensors.

Config files are read and written by ``xpdiff.configuration`` (the one config
mechanism); this module holds the JSON and safetensors files underneath.

Writes are atomic: each file is written to a temporary name in the same folder,
flushed to disk, then renamed over the target, so an interrupted save never
leaves a half-written checkpoint behind.  The file gets the permissions a plain
``open(path, "w")`` would (0644 under umask 022).  Errors while reading name the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import backend

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "atomic_write",
    "load_json",
    "load_safetensors",
    "load_weights",
    "save_json",
    "save_safetensors",
    "weights_name",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``.

    The temporary file (private while it is written) gets mode ``0o666 & ~umask`` before
    the rename, as a file created by ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def load_json(path: str | os.PathLike) -> Any:
    """The JSON value in the UTF-8 file ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not UTF-8 or not valid JSON; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON file at {path}, found nothing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: not UTF-8 text ({err})") from err


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write arrays of any backend to a safetensors file, atomically."""
    from safetensors.numpy import save_file

    host = {k: backend.to_numpy(v, contiguous=True) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(host, tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read a safetensors file into host (NumPy) arrays.

    float16 tensors stay float16; bfloat16 ones (which NumPy lacks) come out as float32
    with the same values.  Loading into a model casts to its dtype.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or corrupt file, or an unsupported dtype; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}, found nothing")
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError("shorter than its 8-byte header length")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes does not fit in {len(data)} bytes")
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        body = memoryview(data)[8 + n :]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"tensor {name!r} lies outside the file")
            out[name] = backend.host_from_tensor_bytes(
                body[start:end], info["dtype"], tuple(info["shape"])
            )
        return out
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def weights_name(variant: str | None = None) -> str:
    """The weights file name: ``diffusion_pytorch_model[.<variant>].safetensors``."""
    if variant is None:
        return WEIGHTS_NAME
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def load_weights(
    directory: str | os.PathLike, variant: str | None = None, *, where: str = "load_weights"
) -> dict[str, Any]:
    """The weights in a diffusers model directory: ``weights_name(variant)``.

    Raises:
        FileNotFoundError: no weights file; names the variant files found, if any.
        ValueError: only pickle weights (``.bin``, ``.pt``, ``.ckpt``): they can run
            code when read, so xpdiff never loads them.
    """
    directory = Path(directory)
    file = directory / weights_name(variant)
    if file.is_file():
        return load_safetensors(file)
    found = sorted(p.name for p in directory.glob("*.safetensors")) if directory.is_dir() else []
    pickles = (
        sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
        if directory.is_dir()
        else []
    )
    if pickles and not found:
        raise ValueError(
            f"{where}: {directory} holds only pickle weights ({', '.join(pickles)}), which "
            f"xpdiff never loads (unpickling can run arbitrary code); convert them to "
            f"safetensors first, e.g. load with diffusers and save_pretrained(..., "
            f"safe_serialization=True)"
        )
    hint = f"; found {', '.join(found)} (pass variant=...)" if found else ""
    raise FileNotFoundError(f"{where}: no {file.name} in {directory}{hint}")
