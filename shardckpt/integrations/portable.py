"""Framework values the state tree cannot hold, as tagged JSON-able dicts (no pickle).

Lightning checkpoints carry the module's hyperparameters as users wrote them: Hydra's OmegaConf
``DictConfig``, ``pathlib.Path``, ``Enum`` members, the hyperparameter container's class. The
state tree (FORMAT.md 3.4) holds tensors, numbers, strings, lists and dicts only, so
``encode`` rewrites every other value as a dict with the key ``"__shardckpt__"`` naming its kind,
and ``decode`` turns those dicts back. The kinds (documented in docs/lightning.md):

====================  =====================================================  ==================
kind                  stored                                                 loads as
====================  =====================================================  ==================
``path``              ``class`` (Path, PurePosixPath...), ``value`` str      that path class
``enum``              ``class`` ("module.Qualname"), ``name``, ``value``     the member, or
                                                                             ``value`` + warning
``omegaconf``         ``value``: ``to_container(resolve=False)``, encoded    DictConfig/ListConfig
``class``             ``name`` ("module.Qualname")                           the class if allowed,
                                                                             else ``name``
``namespace``         ``value``: its ``vars()``                              argparse.Namespace
``set``/``frozenset`` ``value``: the items as a list                         set / frozenset
``numpy``             ``dtype``, ``value`` (a Python number or bool)         numpy scalar
``ndarray``           ``value``: the array as a tensor                       numpy array
``dict``              ``items``: ``[key, value]`` pairs                      dict with those keys
``repr``              ``class``, ``repr`` (anything else; a warning on save) the repr string
====================  =====================================================  ==================

``dict`` keeps keys that are not str/int (Enum, tuple, float keys) and dicts that hold the tag
key themselves, so a user's own ``"__shardckpt__"`` key never decodes by mistake.

Loading never imports a module: an Enum class is looked up in ``sys.modules`` (like Lightning
2.6.6's check of instantiators), and a ``class`` resolves only from a short allowlist of
containers Lightning rebuilds hyperparameters with; anything else stays a readable string.
"""

from __future__ import annotations

import argparse
import enum
import pathlib
import sys
import warnings
from typing import Any

import numpy as np
import torch

TAG = "__shardckpt__"
_PATHS = {c.__name__: c for c in (pathlib.Path, pathlib.PurePath, pathlib.PosixPath,
                                  pathlib.WindowsPath, pathlib.PurePosixPath,
                                  pathlib.PureWindowsPath)}
# Containers Lightning calls with the hyperparameter dict (``hparams_type(hparams)``): calling
# an arbitrary class named by a checkpoint would run code, so only these resolve.
ALLOWED_CLASSES = frozenset({
    "builtins.dict", "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"})
_PLAIN = (bool, int, float, str, type(None), torch.Tensor, torch.dtype, torch.Size,
          bytes, bytearray)


class PortableValueWarning(UserWarning):
    """A value was saved as its ``repr`` and will load as that string, not as itself."""


def qualname(obj_type: type) -> str:
    """``"module.Qualname"`` of a class."""
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


def _omegaconf_container(value):
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, omegaconf.Container):
        return omegaconf
    return None


def _child(where: str, key) -> str:
    return f"{where}/{key}" if where else str(key)


class _Encoder:
    """One walk of a state; ``where`` is the key path, for warnings."""

    def __init__(self):
        self.warned: set[str] = set()

    def value(self, obj: Any, where: str) -> Any:
        if isinstance(obj, _PLAIN) or hasattr(obj, "state_dict"):
            return obj
        if isinstance(obj, dict):
            return self.mapping(obj, where)
        if isinstance(obj, list):
            return [self.value(v, _child(where, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and type(obj) is tuple:
            return tuple(self.value(v, _child(where, i)) for i, v in enumerate(obj))
        return self.special(obj, where)

    def mapping(self, obj: dict, where: str) -> dict:
        plain_keys = all(isinstance(k, (str, int)) and not isinstance(k, bool) and k != TAG
                         for k in obj)
        if plain_keys and type(obj) is dict:
            return {k: self.value(v, _child(where, k)) for k, v in obj.items()}
        if plain_keys:  # a dict subclass (AttributeDict...): its items, as a plain dict
            return {k: self.value(v, _child(where, k)) for k, v in obj.items()}
        return {TAG: "dict", "items": [[self.value(k, _child(where, "<key>")),
                                        self.value(v, _child(where, k))]
                                       for k, v in obj.items()]}

    def special(self, obj: Any, where: str) -> Any:
        if isinstance(obj, pathlib.PurePath):
            return {TAG: "path", "class": type(obj).__name__, "value": str(obj)}
        if isinstance(obj, enum.Enum):
            return {TAG: "enum", "class": qualname(type(obj)), "name": obj.name,
                    "value": self.value(obj.value, where)}
        omegaconf = _omegaconf_container(obj)
        if omegaconf is not None:
            plain = omegaconf.OmegaConf.to_container(obj, resolve=False)
            return {TAG: "omegaconf", "value": self.value(plain, where)}
        if isinstance(obj, type):
            return {TAG: "class", "name": qualname(obj)}
        if isinstance(obj, argparse.Namespace):
            return {TAG: "namespace", "value": self.mapping(vars(obj), where)}
        if isinstance(obj, (set, frozenset)):
            kind = "frozenset" if isinstance(obj, frozenset) else "set"
            return {TAG: kind, "value": [self.value(v, where) for v in obj]}
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return {TAG: "numpy", "dtype": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
            return {TAG: "ndarray", "value": torch.from_numpy(np.ascontiguousarray(obj))}
        if isinstance(obj, tuple):  # a namedtuple: its fields, as a tuple
            return tuple(self.value(v, _child(where, i)) for i, v in enumerate(obj))
        return self.readable(obj, where)

    def readable(self, obj: Any, where: str) -> dict:
        name = qualname(type(obj))
        if where not in self.warned:
            self.warned.add(where)
            warnings.warn(f"{where or '<root>'}: a {type(obj).__name__} ({name}) cannot be "
                          "saved without pickle; stored as its repr (it loads as that string)",
                          PortableValueWarning, stacklevel=4)
        return {TAG: "repr", "class": name, "repr": repr(obj)[:10000]}


def encode(state: Any) -> Any:
    """``state`` with every value the state tree cannot hold replaced by its tagged form.

    Containers are rebuilt (tensors and other leaves are the same objects); warns with
    ``PortableValueWarning`` for each value stored only as its repr. Never raises for a value
    it does not know.
    """
    return _Encoder().value(state, "")


def _resolve(name: str):
    """The object ``"module.Qualname"`` names, from already imported modules only."""
    module, _, attr = name.rpartition(".")
    target = sys.modules.get(module)
    for part in attr.split("."):
        target = getattr(target, part, None)
    return target


def _decode_tagged(obj: dict) -> Any:
    kind = obj[TAG]
    if kind == "path" and obj.get("class") in _PATHS:
        return _PATHS[obj["class"]](obj["value"])
    if kind == "enum":
        cls = _resolve(str(obj.get("class")))
        if isinstance(cls, type) and issubclass(cls, enum.Enum) and obj.get("name") in \
                cls.__members__:
            return cls[obj["name"]]
        warnings.warn(f"enum {obj.get('class')} is not imported; loading its value "
                      f"{obj.get('value')!r} instead of the member", PortableValueWarning)
        return decode(obj.get("value"))
    if kind == "omegaconf":
        value = decode(obj["value"])
        omegaconf = sys.modules.get("omegaconf")
        return omegaconf.OmegaConf.create(value) if omegaconf is not None else value
    if kind == "class":
        name = str(obj.get("name"))
        cls = _resolve(name) if name in ALLOWED_CLASSES else None
        return cls if isinstance(cls, type) else name
    if kind == "namespace":
        return argparse.Namespace(**decode(obj["value"]))
    if kind in ("set", "frozenset"):
        items = [decode(v) for v in obj["value"]]
        return set(items) if kind == "set" else frozenset(items)
    if kind == "numpy":
        return np.dtype(str(obj["dtype"])).type(obj["value"])
    if kind == "ndarray":
        return obj["value"].numpy()
    if kind == "dict":
        return {decode(k): decode(v) for k, v in obj["items"]}
    if kind == "repr":
        return obj.get("repr")
    return obj


def decode(state: Any) -> Any:
    """Undo ``encode``: tagged dicts become their values again (see the module docstring)."""
    if isinstance(state, dict):
        if isinstance(state.get(TAG), str):
            return _decode_tagged(state)
        return {k: decode(v) for k, v in state.items()}
    if isinstance(state, list):
        return [decode(v) for v in state]
    if isinstance(state, tuple):
        return tuple(decode(v) for v in state)
    return state
