"""Files in diffusers' layout: config.json + diffusion_pytorch_model.safetensors.

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
    "load_config",
    "load_safetensors",
    "save_config",
    "save_safetensors",
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

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or corrupt file; the message names it.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}, found nothing")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors' own error type, or a decoding error
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def save_config(config: dict, directory: str | os.PathLike, class_name: str,
                name: str = CONFIG_NAME) -> None:
    """Write ``config`` plus ``_class_name`` as ``directory/name``."""
    from . import __version__

    out = dict(config)
    out["_class_name"] = class_name
    out["_xpdiff_version"] = __version__
    save_json(out, Path(directory) / name)


def load_config(directory: str | os.PathLike, known: set[str], where: str,
                name: str = CONFIG_NAME) -> dict:
    """Read ``directory/name``; drop bookkeeping keys (``_...``); reject unknown keys."""
    cfg = load_json(Path(directory) / name)
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object in {Path(directory) / name}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown config keys {unknown} in {Path(directory) / name}; "
            f"expected a subset of {sorted(known)}"
        )
    return cfg
