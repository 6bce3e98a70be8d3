"""Every change megatron-let makes to Megatron at run time, as one declared entry.

An entry names what it changes (``target``: ``"module:attribute"``), why, the megatron-core versions it
applies to (``since`` / ``until``: data, read only by :mod:`megatron_let.megatron_versions`) and the group it
belongs to. A group is applied by one runner, :func:`apply_patches`: every target of the group is resolved
first (so a Megatron whose layout moved is refused before anything is patched, naming the entry), then each
entry runs once; each is logged at debug level as applied or skipped with the reason, and the start-up line
gives the count (:func:`summary`).

Groups (declared where their entries live):

- ``cpu-core``: megatron-core on a machine without CUDA (:mod:`megatron_let.compat.cpu`);
- ``cpu-training``: Megatron-LM's ``megatron.training`` on such a machine (:mod:`megatron_let.compat.cpu_megatron_lm`);
- ``cpu-script``: the CUDA calls of a ``pretrain_gpt.py`` script module, same condition;
- ``let-script``: LET's wiring into a ``pretrain_gpt.py``'s batch functions, ``let-megatron-lm``: into
  megatron.training's loop (:mod:`megatron_let.integrations.megatron_lm`);
- ``let-patched-script``: a user's patched ``pretrain_gpt.py``'s own ``pretrain()`` call
  (:mod:`megatron_let.integrations.patching`).
- ``cpu-bridge-imports``, ``cpu-bridge``: Megatron-Bridge on a machine without CUDA (:mod:`megatron_let.compat.cpu_bridge`);
- ``let-bridge``: LET's wiring into Bridge's ``train()`` and checkpoint (:mod:`megatron_let.integrations.bridge`).

How to add a Megatron version: run the tests against it; each entry whose target moved fails by its id; add
an entry with ``since`` = the version that moved it, and give the old one ``until`` = the same version.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron_let import megatron_versions

__all__ = ["Patch", "register_patch", "patches", "apply_patches", "summary", "announce", "PatchTargetMissing"]

_log = logging.getLogger(__name__)


class PatchTargetMissing(RuntimeError):
    """A patch's target is absent from this Megatron: the entry's id and the target say which."""


@dataclass(frozen=True)
class Patch:
    id: str
    group: str
    target: str  # "package.module:Name", "package.module:Class.method", "package.module"; ":Name": of the context
    why: str
    apply: Callable[[Any, Any], None]  # (the target's module, the group's context)
    since: Optional[str] = None  # first megatron-core version it applies to ("0.19"); None: every one
    until: Optional[str] = None  # first version it no longer applies to; None: still applies
    optional: bool = False  # a target some builds lack (a stub, an optional package): skipped, not refused

    @property
    def module_name(self) -> str:
        return self.target.split(":")[0]

    def resolve(self, module: Any = None, context: Any = None):
        """The target's module (``module``: a script's namespace given by the caller; a ":Name" target is looked
        up on ``context``), after checking the attribute path exists (``PatchTargetMissing`` if not)."""
        try:
            if module is None:
                module = importlib.import_module(self.module_name) if self.module_name else context
            owner = module
            for name in self.target.partition(":")[2].split(".") if ":" in self.target else ():
                owner = getattr(owner, name)
        except (ImportError, AttributeError) as error:
            if isinstance(error, ModuleNotFoundError) and error.name and \
                    not self.module_name.startswith(error.name):  # a dependency is missing, not the target
                raise
            where = f"megatron-core {megatron_versions.core_version()}" if self.module_name else \
                getattr(context, "__name__", repr(context))
            raise PatchTargetMissing(
                f"patch {self.id}: {where} has no {self.target} "
                f"({type(error).__name__}: {error}); the entry needs a version range or a successor "
                "(megatron_let/patch_registry.py says how)") from error
        return module

    def applies(self) -> bool:
        return megatron_versions.in_versions(self.since, self.until)


_REGISTRY: Dict[str, List[Patch]] = {}
_APPLIED: Dict[str, Tuple[int, int]] = {}  # group -> (applied, skipped), for the start-up line


def register_patch(id: str, *, group: str, target: str, why: str, since: Optional[str] = None,
                   until: Optional[str] = None, optional: bool = False) -> Callable:
    """Declare the decorated function ``apply(module, context)`` as the patch ``id``."""

    def register(apply: Callable) -> Callable:
        entries = _REGISTRY.setdefault(group, [])
        if any(entry.id == id for entry in entries):
            raise ValueError(f"patch {id} is registered twice")
        entries.append(Patch(id, group, target, why, apply, since, until, optional))
        return apply

    return register


def patches(group: Optional[str] = None) -> List[Patch]:
    """The declared entries of ``group`` (all groups: None), in declaration order."""
    if group is not None:
        return list(_REGISTRY.get(group, ()))
    return [entry for entries in _REGISTRY.values() for entry in entries]


def apply_patches(group: str, context: Any = None, module: Any = None) -> int:
    """Apply every entry of ``group`` that fits this megatron-core; returns how many were applied. ``module``:
    the object the targets live in, for a group whose targets are a script's names (``pretrain_gpt``'s
    namespace), not an importable module's.

    All targets are resolved before the first one is patched."""
    chosen = []
    skipped = 0
    for entry in patches(group):
        if not entry.applies():
            skipped += 1
            _log.debug("patch %s skipped: megatron-core %s is outside [%s, %s)", entry.id,
                       megatron_versions.core_version(), entry.since or "any", entry.until or "any")
            continue
        try:
            chosen.append((entry, entry.resolve(module, context)))
        except PatchTargetMissing:
            if not entry.optional:
                raise
            skipped += 1
            _log.debug("patch %s skipped: %s is absent (optional)", entry.id, entry.target)
    for entry, module in chosen:
        entry.apply(module, context)
        _log.debug("patch %s applied to %s: %s", entry.id, entry.target, entry.why)
    applied, before = len(chosen), _APPLIED.get(group, (0, 0))
    _APPLIED[group] = (before[0] + applied, before[1] + skipped)
    return applied


def summary() -> str:
    """'12 Megatron patches applied (cpu-core 9, let-megatron-lm 3), 2 not for this version'."""
    applied = sum(count for count, _ in _APPLIED.values())
    skipped = sum(count for _, count in _APPLIED.values())
    groups = ", ".join(f"{group} {count}" for group, (count, _) in _APPLIED.items() if count)
    return f"{applied} Megatron patches applied ({groups or 'none'}), {skipped} not for this version"


def announce() -> None:
    """The count, once, on rank 0, after the start-up line (each entry at debug level: logging)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megatron-let: {summary()}", flush=True)
