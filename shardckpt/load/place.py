"""Place a checkpoint into the caller's state: match the target against the saved tree.

``match`` walks the target and the manifest's tree together and decides, before any byte is read,
which saved tensor fills which target tensor, which values replace non-tensor leaves, and which
``load_state_dict`` calls run afterwards. Every mismatch is collected, so one StateMismatchError
lists them all and the target is left untouched (nothing is assigned until ``apply``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UnsupportedValueError
from ..format.tree import build, dict_items, is_stateful, node_kind, path_text
from ..types import Manifest


@dataclass
class Placement:
    """What a load does, decided up front."""

    fills: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # key -> target tensor
    new: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> freshly made tensor
    assigns: list[Callable[[], None]] = field(default_factory=list)  # container updates
    finalizers: list[Callable[[], None]] = field(default_factory=list)  # load_state_dict calls
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str]] = field(default_factory=list)

    def apply(self) -> None:
        """After the data is in: update containers, then call load_state_dict (inner first)."""
        for fn in self.assigns:
            fn()
        for fn in self.finalizers:
            fn()


class _Matcher:
    def __init__(self, manifest: Manifest, strict: bool, blob):
        self.m, self.strict, self.p, self.blob = manifest, strict, Placement(), blob
        self.replaced: list[tuple] = []  # paths whose dicts become the checkpoint's (optimizer state)

    def new_tensor(self, key: str) -> torch.Tensor:
        if key not in self.p.new:
            entry = self.m.tensors[key]
            self.p.new[key] = torch.empty(entry.shape, dtype=entry.dtype.torch)
        return self.p.new[key]

    def saved_value(self, node):
        """The checkpoint's value at ``node``, with tensors made fresh."""
        return build(node, self.new_tensor, blob=self.blob)

    def tensor(self, target: torch.Tensor, key: str, where: str) -> None:
        entry = self.m.tensors[key]
        if tuple(target.shape) != entry.shape:
            self.p.mismatched.append((where, f"shape {tuple(target.shape)} in the target, "
                                             f"{entry.shape} in the checkpoint"))
        elif target.dtype != entry.dtype.torch:
            self.p.mismatched.append((where, f"dtype {target.dtype} in the target, "
                                             f"{entry.dtype.name} in the checkpoint"))
        else:
            self.p.fills.append((key, target))

    def dict(self, target: dict, items, path: tuple, allow_new: bool) -> dict:
        saved, updates = dict(items), {}
        replace = any(path[:len(r)] == r for r in self.replaced)
        for k in list(target):
            if k in saved:
                updates[k] = self.value(target[k], saved[k], path + (k,), allow_new)
            elif replace:
                pass  # dropped below: the checkpoint's entries replace the live ones
            elif self.strict:
                self.p.missing.append(_where(path + (k,)))
        for k, node in saved.items():
            if k not in target:
                if allow_new:
                    updates[k] = self.saved_value(node)
                elif self.strict:
                    self.p.unexpected.append(_where(path + (k,)))
        if replace:
            self.p.assigns.append(lambda: (target.clear(), target.update(updates)))
        else:
            self.p.assigns.append(lambda: target.update(updates))
        return target

    def sequence(self, target, payload, path: tuple, allow_new: bool):
        if len(target) != len(payload):
            self.p.mismatched.append((_where(path), f"length {len(target)} in the target, "
                                                    f"{len(payload)} in the checkpoint"))
            return target
        values = [self.value(t, n, path + (i,), allow_new)
                  for i, (t, n) in enumerate(zip(target, payload))]
        if isinstance(target, list):
            self.p.assigns.append(lambda: target.__setitem__(slice(None), values))
            return target
        return tuple(values)

    def stateful(self, obj, node, path: tuple):
        # Modules are strict (their load_state_dict would refuse extra keys after the data is
        # already read); other stateful objects (optimizers before their first step) may gain
        # entries that only the checkpoint has.
        allow_new = not isinstance(obj, torch.nn.Module)
        if isinstance(obj, torch.optim.Optimizer):
            # Like Optimizer.load_state_dict, the saved per-parameter state replaces the live
            # one whole: a checkpoint made before the first step has none, so the moments of
            # later steps must go, under strict=False too.
            self.replaced.append(path + ("state",))
        sd = self.value(obj.state_dict(), node, path, allow_new)
        self.p.finalizers.append(lambda: obj.load_state_dict(sd))
        return obj

    def value(self, target, node, path: tuple, allow_new: bool):
        kind, payload = node_kind(node)
        if is_stateful(target):
            return self.stateful(target, node, path)
        if isinstance(target, torch.Tensor):
            if kind != "tensor":
                self.p.mismatched.append((_where(path), f"a tensor in the target, a {kind} in "
                                                        "the checkpoint"))
            else:
                self.tensor(target, payload, _where(path))
            return target
        if isinstance(target, dict) and kind == "dict":
            return self.dict(target, dict_items(payload), path, allow_new)
        if isinstance(target, (list, tuple)) and kind in ("list", "tuple"):
            return self.sequence(target, payload, path, allow_new)
        if isinstance(target, (dict, list, tuple)):
            self.p.mismatched.append((_where(path), f"a {type(target).__name__} in the target, "
                                                    f"a {kind} in the checkpoint"))
            return target
        return self.saved_value(node)  # a plain leaf: the checkpoint's value replaces it


_where = path_text


def _no_blob(key: str):
    raise UnsupportedValueError(f"{key}: a bytes value, which this load cannot read")


def match(target: Any, manifest: Manifest, tree, strict: bool = True, blob=None
          ) -> tuple[Any, Placement]:
    """``(new_target, placement)`` of loading ``tree`` (this rank's saved tree) into ``target``;
    containers are updated in place (at ``apply``), tuples rebuilt. ``blob(key)`` reads the
    bytes of a bytes value (at once: bytes cannot be filled in later)."""
    matcher = _Matcher(manifest, strict, blob or _no_blob)
    result = matcher.value(target, tree, (), allow_new=False)
    return result, matcher.p
