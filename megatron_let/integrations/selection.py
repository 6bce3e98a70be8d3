"""Which trainer runs, and on which megatron: decided before anything imports megatron.

- ``MEGATRON_LM_PATH`` set (or ``megatron.training`` on ``PYTHONPATH``): Megatron-LM's ``pretrain()``
  or one line saying why not (a missing package, a checkout without ``megatron/training``, a
  ``megatron.core`` of another version already imported). Never a silent fall-back to the lean
  trainer: its refusals of the user's Megatron-LM flags would hide the real cause.
- The checkout is put FIRST on ``sys.path``, as running ``python pretrain_gpt.py`` from it does, so
  ``megatron.core`` comes from the checkout (local changes to ``megatron/core`` included), not from
  the pip wheel. ``megatron`` is a namespace package (the wheel has no ``megatron/__init__.py``), so
  its search path follows ``sys.path``; a ``megatron.core`` imported before that cannot be swapped:
  if its version differs from the checkout's, the run is refused.
- One start-up line names the trainer, where ``megatron.core`` and ``megatron.training`` come from
  and whether those versions are tested.

Nothing here imports torch or megatron at module level: the lean trainer's flag errors stay instant.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_let.errors import LETConfigError
from megatron_let import megatron_versions as versions


class TrainerSelectionError(LETConfigError):
    """Megatron-LM was asked for and cannot run: one line, exit 2."""


@dataclass
class TrainerChoice:
    megatron_lm: bool
    reason: str = ""  # why the lean trainer (Megatron-LM not asked for)
    core_version: Optional[str] = None
    core_path: Optional[str] = None
    training_path: Optional[str] = None

    def describe(self) -> str:
        trainer = "Megatron-LM pretrain()" if self.megatron_lm else f"lean megatron-core trainer ({self.reason})"
        parts = [f"megatron-let: trainer: {trainer}",
                 f"megatron.core {self.core_version or '?'} from {self.core_path or '?'}"]
        if self.megatron_lm:
            parts.append(f"megatron.training from {self.training_path}")
        parts.append(f"Python {sys.version.split()[0]}")
        parts.append(version_status(self.core_version))
        return " | ".join(parts)

    def warning(self) -> Optional[str]:
        """A line to print after the start-up line (a megatron-core newer than tested), or None."""
        return newer_than_tested_warning(self.core_version)


def version_status(version: Optional[str]) -> str:
    """'tested', 'newer than tested' or 'supported, not tested in CI' (an older one never gets this far)."""
    if versions.is_tested(version):
        return f"megatron {version}: tested"
    if versions.newer_than_tested(version):
        return f"megatron {version}: newer than tested ({versions.tested_versions()})"
    return f"megatron {version}: supported, not tested in CI (tested: {versions.tested_versions()})"


def newer_than_tested_warning(version: Optional[str]) -> Optional[str]:
    """The one warning line for a megatron-core newer than the newest tested minor, or None."""
    if not versions.newer_than_tested(version):
        return None
    return (f"megatron-let: WARNING: megatron-core {version} is newer than tested (tested: "
            f"{versions.tested_versions()}); LET runs with the newest tested version's wiring. If the run fails or "
            "its numbers differ from a run without --let-* flags in ways LET does not explain, use a tested version "
            "and report it.")


def check_supported_version(version: Optional[str], checkout: Optional[str] = None) -> None:
    """One line, before any process group, for a megatron-core older than supported, with the fix that fits
    where it came from: a Megatron-LM checkout (``checkout``) or a pip wheel."""
    if version is None or versions.is_supported(version):
        return
    oldest = ".".join(map(str, versions.OLDEST_SUPPORTED))
    if checkout:
        fix = (f"check out a supported release in it (git -C {checkout} checkout core_v0.19.0; any core_v{oldest}+ "
               "tag works)")
    else:
        fix = (f"pip install 'megatron-core>={oldest}' (0.17+ need Python 3.12; on Python 3.11 megatron-core "
               "0.16.1 is the newest)")
    raise TrainerSelectionError(
        f"megatron-core {version} is not supported: megatron-let supports {versions.supported_range()}; {fix}.")


def _package_dir(name: str) -> Optional[str]:
    """Directory of package ``name`` (already imported or as the import system would find it)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None):
        return os.path.dirname(os.path.abspath(module.__file__))
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("namespace", None):
        return None
    return os.path.dirname(os.path.abspath(spec.origin))


def _put_checkout_first(path: str) -> None:
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    megatron = sys.modules.get("megatron")
    if megatron is not None and hasattr(megatron, "__path__") and not hasattr(megatron.__path__, "_recalculate"):
        # a plain list (not a live namespace path): put the checkout's megatron/ first by hand
        entry = os.path.join(path, "megatron")
        if entry not in megatron.__path__:
            megatron.__path__.insert(0, entry)


def choose_trainer(environ=None) -> TrainerChoice:
    """Megatron-LM (sys.path prepared, versions checked, CPU redirections applied) or the lean trainer;
    TrainerSelectionError when Megatron-LM was asked for and cannot run."""
    environ = os.environ if environ is None else environ
    path = environ.get("MEGATRON_LM_PATH")
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(os.path.join(path, "megatron", "training", "__init__.py")):
            raise TrainerSelectionError(
                f"MEGATRON_LM_PATH={path} holds no megatron/training: point it at the root of a Megatron-LM "
                "checkout (the directory with pretrain_gpt.py), or unset it to use the lean megatron-core trainer.")
        checkout_core = os.path.join(path, "megatron", "core")
        imported = _package_dir("megatron.core") if "megatron.core" in sys.modules else None
        if imported and os.path.isdir(checkout_core) and not os.path.samefile(imported, checkout_core):
            mine, theirs = versions.version_in_directory(imported), versions.version_in_directory(checkout_core)
            if mine != theirs:
                raise TrainerSelectionError(
                    f"version mismatch: megatron.core {mine} was already imported from {imported}, but "
                    f"MEGATRON_LM_PATH={path} is Megatron-LM {theirs}; its megatron.training must run on its own "
                    f"megatron.core: set MEGATRON_LM_PATH before anything imports megatron (or pip install "
                    f"megatron-core=={theirs}).")
        _put_checkout_first(path)
        asked = f"MEGATRON_LM_PATH={path}"
    else:
        try:
            found = importlib.util.find_spec("megatron") is not None and \
                importlib.util.find_spec("megatron.training") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return _lean("MEGATRON_LM_PATH is not set and megatron.training is not importable")
        asked = f"megatron.training on PYTHONPATH ({_package_dir('megatron.training')})"

    training_dir = _package_dir("megatron.training")
    core_dir = _package_dir("megatron.core")
    training_version = versions.version_in_directory(os.path.join(os.path.dirname(training_dir), "core")) \
        if training_dir else None
    core_version = versions.version_in_directory(core_dir)
    check_supported_version(core_version, path or _checkout_root(core_dir))
    if training_version and core_version and training_version != core_version:
        raise TrainerSelectionError(
            f"version mismatch: megatron.training is Megatron-LM {training_version} ({training_dir}) but "
            f"megatron.core is {core_version} ({core_dir}); use the checkout's own megatron/core (keep it in the "
            f"checkout) or pip install megatron-core=={training_version}.")
    try:
        import torch

        if not torch.cuda.is_available():
            from megatron_let.compat.cpu_megatron_lm import enable_cpu_megatron_lm

            enable_cpu_megatron_lm()
        importlib.import_module("megatron.training")
    except Exception as error:  # noqa: BLE001 - any failure to import is reported, in one line
        raise TrainerSelectionError(_import_failure(asked, error)) from None
    return TrainerChoice(True, core_version=core_version or versions.imported_core_version(), core_path=_package_dir("megatron.core"),
                         training_path=_package_dir("megatron.training"))


def _checkout_root(core_dir: Optional[str]) -> Optional[str]:
    """The Megatron-LM checkout ``megatron/core`` belongs to (a git work tree or a directory with
    pretrain_gpt.py), or None for a pip-installed megatron-core."""
    root = os.path.dirname(os.path.dirname(core_dir)) if core_dir else None
    if root and any(os.path.exists(os.path.join(root, name)) for name in (".git", "pretrain_gpt.py")):
        return root
    return None


def _import_failure(asked: str, error: Exception) -> str:
    missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    what = f"{type(error).__name__}: {error}".replace("\n", " ")
    if missing:
        top = missing.split(".")[0]
        fix = f"pip install {top.replace('_', '-')}" if top != "megatron" else "check the checkout"
        hint = f"missing package '{top}' ({fix}; Megatron-LM's requirements are in its requirements/ files)"
    else:
        hint = "Megatron-LM's megatron.training fails to import"
    return (f"{asked} but Megatron-LM cannot be imported: {what} -> {hint}; or unset MEGATRON_LM_PATH to use "
            "the lean megatron-core trainer.")


def _lean(reason: str) -> TrainerChoice:
    core_dir = _package_dir("megatron.core")
    check_supported_version(versions.version_in_directory(core_dir), _checkout_root(core_dir))
    return TrainerChoice(False, reason, core_version=versions.version_in_directory(core_dir), core_path=core_dir)


def announce(choice: TrainerChoice) -> None:
    """The start-up line, once (rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(choice.describe(), flush=True)
