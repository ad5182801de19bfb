"""One configuration mechanism for models and schedulers (the idea of diffusers' ``ConfigMixin``).

A class derives from :class:`ConfigMixin` and decorates its ``__init__`` with
:func:`register_to_config`.  Every constructor argument is then recorded once, by the
signature (defaults included), before the body runs; the body may replace values by
their checked, plain-Python form with ``_update_config``.  Arguments named in
``_config_exclude`` (``dtype``, ``xp`` of the UNet) are not configuration.

``obj.config`` is a read-only :class:`FrozenConfig`: ``sched.config.num_train_timesteps``
and ``sched.config["num_train_timesteps"]`` both work, and it compares equal to a dict of
the same items.  ``Cls.from_config(config, **overrides)`` builds a new object; keys of
other classes (``variance_type`` handed to DDIM: diffusers' scheduler-swap idiom) and
keys not known at all are ignored with ONE logged warning naming them, while an
unsupported value of a key the class knows still raises.  ``save_config`` /
``save_pretrained`` write ``config_name`` (``config.json`` or
``scheduler_config.json``) in diffusers' format; ``from_pretrained(directory,
subfolder=None)`` reads it back, from files written here or by diffusers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import io

__all__ = ["ConfigMixin", "FrozenConfig", "register_to_config"]

logger = logging.getLogger("xpdiff")

_C = TypeVar("_C", bound="ConfigMixin")

#: value of ``_accepted_off`` meaning "any value": the key only matters when a feature
#: that is not implemented here is switched on by another key
ANY_VALUE = object()


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: the JSON form of a config value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class FrozenConfig(dict):
    """A read-only dict whose keys also read as attributes (``config.sample_size``).

    A dict, so ``json.dumps(obj.config)`` works and it compares equal to a dict with
    the same items; every mutator raises ``TypeError``, attribute assignment
    ``AttributeError``.  ``config[key]`` and ``config.key`` return copies, so a list
    in the config cannot be changed through them either.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__({k: _plain(v) for k, v in data.items()})

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "config is read-only; build a new object with from_config(obj.config, key=value)"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(dict.__getitem__(self, key))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"config is read-only (setting {name!r}); build a new object with "
            f"from_config(obj.config, {name}=...)"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"config is read-only (deleting {name!r})")

    def __reduce__(self) -> tuple:
        return (FrozenConfig, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenConfig({dict.__repr__(self)})"

    def to_dict(self) -> dict[str, Any]:
        """A fresh, JSON-serialisable plain dict of the items."""
        return copy.deepcopy(dict(self))


def register_to_config(init: Callable) -> Callable:
    """Decorate ``__init__`` so that its arguments become ``self.config``.

    The arguments are bound to the signature with their defaults and recorded before
    the body runs (tuples stored as lists); ``_config_exclude`` names those that are
    not configuration.
    """
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        exclude = set(type(self)._config_exclude)
        values = {
            k: v
            for k, v in list(bound.arguments.items())[1:]
            if k not in exclude
            and sig.parameters[k].kind
            not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        object.__setattr__(self, "_config", FrozenConfig(values))
        init(self, *args, **kwargs)

    return wrapper


class ConfigMixin:
    """Config recording, ``from_config``, ``save_config``, ``save_pretrained`` and
    ``from_pretrained`` for models and schedulers (see the module docstring)."""

    #: file written by ``save_config``
    config_name: ClassVar[str] = "config.json"
    #: constructor arguments that are not configuration
    _config_exclude: ClassVar[tuple[str, ...]] = ()
    #: diffusers keys of this class for features not implemented here: accepted in a
    #: config only with the value that leaves the feature off (``ANY_VALUE``: any)
    _accepted_off: ClassVar[dict[str, Any]] = {}

    @property
    def config(self) -> FrozenConfig:
        """The constructor arguments, read-only (attribute and mapping access)."""
        return self._config

    def _update_config(self, **values: Any) -> None:
        """Replace recorded values by their checked form (for constructors only)."""
        object.__setattr__(self, "_config", FrozenConfig({**self._config, **values}))

    @classmethod
    def config_keys(cls) -> list[str]:
        """Names of the configuration arguments, in signature order."""
        params = inspect.signature(cls.__init__).parameters
        return [
            k
            for k, p in params.items()
            if k != "self"
            and k not in cls._config_exclude
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]

    # -- building -------------------------------------------------------------
    @classmethod
    def from_config(cls: type[_C], config: Mapping[str, Any] | None = None, **kwargs: Any) -> _C:
        """A new object from ``config`` (a ``FrozenConfig``, or a dict such as a loaded
        ``config.json``, ours or diffusers'), with ``kwargs`` overriding it.

        Keys starting with ``"_"`` (``_class_name``, ``_diffusers_version``) are
        bookkeeping and skipped.  Keys this class does not take are ignored with one
        logged warning (logger ``"xpdiff"``) that names them all.  ``kwargs`` may also
        hold constructor arguments that are not configuration (``dtype``, ``xp``).

        Raises:
            TypeError: ``config`` is not a mapping, or a keyword override is not an
                argument of the constructor.
            ValueError: a known key holds an unsupported value (the constructor's
                checks; or a diffusers feature that is not implemented here, switched on).
        """
        where = f"{cls.__name__}.from_config"
        if isinstance(config, ConfigMixin):
            config = config.config
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(
                f"{where}: expected a config mapping (a dict or obj.config), "
                f"got {type(config).__name__}"
            )
        keys = set(cls.config_keys())
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        bad = sorted(k for k in kwargs if k not in params)
        if bad:
            raise TypeError(
                f"{where}: unexpected keyword arguments {bad}; expected among {sorted(params)}"
            )
        init: dict[str, Any] = {}
        ignored = []
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: expected string config keys, got {key!r}")
            if key.startswith("_") or key in kwargs:
                continue
            if key in keys:
                init[key] = value
            elif key in cls._accepted_off:
                off = cls._accepted_off[key]
                if off is not ANY_VALUE and value != off:
                    raise ValueError(
                        f"{where}: {key}={value!r} is not supported (only {key}={off!r})"
                    )
            else:
                ignored.append(key)
        if ignored:
            saved_by = config.get("_class_name")
            note = f" (saved by {saved_by})" if saved_by not in (None, cls.__name__) else ""
            logger.warning(
                "%s: ignoring config keys %s%s: not arguments of %s",
                where,
                sorted(ignored),
                note,
                cls.__name__,
            )
        return cls(**init, **kwargs)

    # -- files ----------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """The config with ``_class_name`` and ``_xpdiff_version``, as written to disk."""
        from . import __version__

        return {
            "_class_name": type(self).__name__,
            "_xpdiff_version": __version__,
            **self._config.to_dict(),
        }

    def save_config(self, save_directory: str | os.PathLike) -> str:
        """Write ``config_name`` into ``save_directory`` (created if needed), atomically.

        Returns:
            The path of the written file.

        Raises:
            ValueError: ``save_directory`` is an existing file.
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(
                f"{type(self).__name__}.save_config: expected a directory, "
                f"got the file {str(directory)!r}"
            )
        target = directory / self.config_name
        io.save_json(self.to_json_dict(), target)
        return str(target)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write everything ``from_pretrained`` needs (here: the config) into a directory."""
        self.save_config(save_directory)

    @classmethod
    def load_config(cls, path: str | os.PathLike, subfolder: str | None = None) -> dict:
        """The JSON object in ``path/subfolder/config_name`` (or in ``path`` if a file).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON, or not a JSON object.
        """
        where = Path(path) / subfolder if subfolder else Path(path)
        file = where if where.is_file() else where / cls.config_name
        if not file.is_file():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: no {cls.config_name} at {str(where)!r}"
            )
        config = io.load_json(file)
        if not isinstance(config, dict):
            raise ValueError(
                f"{cls.__name__}.from_pretrained: expected a JSON object in "
                f"{file}, got {type(config).__name__}"
            )
        return config

    @classmethod
    def from_pretrained(
        cls: type[_C], path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> _C:
        """Load from a directory written by ``save_pretrained`` here or by diffusers;
        ``subfolder`` (e.g. ``"scheduler"`` of a pipeline) is joined to it first, and
        ``kwargs`` override the saved config."""
        return cls.from_config(cls.load_config(path, subfolder), **kwargs)
