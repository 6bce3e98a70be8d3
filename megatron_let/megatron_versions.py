"""What changed in megatron-core / Megatron-LM between the versions LET supports: one entry per difference,
with the version it appeared in. Nothing else in megatron_let compares versions.

Supported: 0.16 and newer; a version newer than the newest tested minor runs with one warning line. Tested
in CI: 0.16.1 (Python 3.11) and 0.19.x (Python 3.12).
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Optional, Tuple

OLDEST_SUPPORTED = (0, 16)  # 0.13-0.15 lack the batch predicate and builder split the integration relies on
TESTED = ("0.16.1", "0.19")  # a tested entry matches the version or its prefix; the newest is the wiring's model


def parse(version: Optional[str]) -> Optional[Tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def newest_tested() -> Tuple[int, int]:
    return max(parse(tested) for tested in TESTED)


def is_supported(version: Optional[str]) -> bool:
    """Not older than the oldest supported minor. Newer than tested counts as supported: it runs with one
    warning (:func:`newer_than_tested`), since each Megatron release changes little of what LET touches."""
    minor = parse(version)
    return minor is not None and minor >= OLDEST_SUPPORTED


def newer_than_tested(version: Optional[str]) -> bool:
    minor = parse(version)
    return minor is not None and minor > newest_tested()


def is_tested(version: Optional[str]) -> bool:
    return any(version == tested or (version or "").startswith(tested + ".") for tested in TESTED)


def tested_versions() -> str:
    """'0.16.1, 0.19.x': for messages."""
    return ", ".join(tested if tested.count(".") == 2 else f"{tested}.x" for tested in TESTED)


def supported_range() -> str:
    return f"{OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]} or newer (tested: {tested_versions()})"


def core_version() -> str:
    """The imported megatron-core's version, without the ``+<git hash>`` 0.19 appends (of the cwd's repository)."""
    from megatron.core import package_info

    return package_info.__version__.split("+")[0]


def imported_core_version() -> Optional[str]:
    """The version of a megatron.core already imported, or None (nothing is imported here)."""
    import sys

    core = sys.modules.get("megatron.core")
    version = getattr(core, "__version__", None)
    return version.split("+")[0] if version else None


def version_in_directory(core_dir: Optional[str]) -> Optional[str]:
    """The version in ``<core_dir>/package_info.py``, read as text (nothing is imported)."""
    import os

    if not core_dir:
        return None
    try:
        text = open(os.path.join(core_dir, "package_info.py"), encoding="utf-8").read()
    except OSError:
        return None
    numbers = {key: re.search(rf"^{key}\s*=\s*['\"]?([0-9A-Za-z]*)", text, re.M)
               for key in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")}
    if not all(numbers[key] for key in ("MAJOR", "MINOR", "PATCH")):
        return None
    pre = numbers["PRE_RELEASE"].group(1) if numbers["PRE_RELEASE"] else ""
    return ".".join(numbers[key].group(1) for key in ("MAJOR", "MINOR", "PATCH")) + pre


def _release(version) -> Tuple[int, ...]:
    """(0, 19) from "0.19" or (0, 19); (0, 19, 2) from "0.19.2rc0"."""
    if isinstance(version, str):
        return tuple(int(x) for x in re.findall(r"\d+", version)[:3])
    return tuple(version)


def in_versions(since=None, until=None) -> bool:
    """Does the imported megatron-core fall in [since, until)? ``"0.19"`` or ``(0, 19)``; None: open. The range
    of a patch entry (megatron_let/patch_registry.py) or a table row: data, compared here only."""
    release = _release(core_version())
    return (since is None or release[:len(_release(since))] >= _release(since)) and \
        (until is None or release[:len(_release(until))] < _release(until))


def same_minor(version, other) -> bool:
    """Do two versions share major.minor? (A compiled extension's interface, e.g. megatron-core's dataset
    helpers, is the same within a minor version.)"""
    return parse(version) is not None and parse(version) == parse(other)


def _core_minor() -> Tuple[int, int]:
    return parse(core_version())


# -- 0.18: pretrain() takes a PretrainConfigContainer first; the arguments are parsed before it --------------
def call_pretrain(pretrain: Callable, datasets_provider, model_provider, model_type, forward_step, *,
                  extra_args_provider, args_defaults: dict, attach: Callable,
                  model_config_from_args: Optional[Callable] = None, **kwargs) -> None:
    """Run Megatron-LM's ``pretrain()`` the way that version's ``pretrain_gpt.py`` does.

    ``attach(model_chunks)`` sees every model chunk before Megatron wraps it in DDP: through
    ``model_provider`` where pretrain() builds the model with it, and as a pre-wrap hook of the model
    config where (0.19) the config container's builder builds it. ``model_config_from_args(args)`` (0.18+) builds the
    model config, GPT's ``gpt_config_from_args`` by default (``pretrain_hybrid.py``: ``hybrid_config_from_args``).
    """
    parameters = inspect.signature(pretrain).parameters
    if "cfg_container" not in parameters:  # up to 0.17
        pretrain(datasets_provider, model_provider, model_type, forward_step, args_defaults=args_defaults,
                 extra_args_provider=extra_args_provider, **kwargs)
        return
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
    model_config = (model_config_from_args or gpt_config_from_args)(args)
    model_config.pre_wrap_hooks.append(attach)  # the builder runs it on the chunks, before DDP
    container = pretrain_cfg_container_from_args(args, model_config)
    names = list(parameters)
    if names.index("model_provider") < names.index("model_type"):  # 0.18: model_provider still positional
        pretrain(container, datasets_provider, model_provider, model_type, forward_step, **kwargs)
    else:  # 0.19: the container's model builder builds the chunks
        pretrain(container, datasets_provider, model_type, forward_step, **kwargs)


# -- up to 0.18: pretrain() builds the chunks with the script's model_provider(gpt_builder, ...); 0.19: the config
# container's builder does (the wheel's scripts have neither) ---------------------------------------------------
def script_model_provider(script) -> Optional[Callable]:
    if in_versions(since="0.19"):
        return None
    import functools

    return functools.partial(script.model_provider, script.gpt_builder)


# -- 0.19: HybridModel (megatron.core.models.hybrid, Megatron-LM's pretrain_hybrid.py) ------------------------
def has_hybrid_model() -> bool:
    """True where megatron-core has HybridModel (0.19; 0.16's closest is MambaModel, which LET does not drive)."""
    return _core_minor() >= (0, 19)


# -- 0.19: the config container's model builder moves the chunks to the GPU unless --use-cpu-initialization
# (megatron_let/preflight/cpu.py refuses such a run on a machine without one) -------------------------------
def cpu_initialization_needed() -> bool:
    return _core_minor() >= (0, 19)


# -- 0.18: pretrain_gpt.get_batch returns its fields in the alphabetical BATCH_KEYS order (0.19: a module-level
# list; before 0.18: tokens, labels, loss_mask, attention_mask, position_ids) -------------------------------------
_BATCH_KEYS_0_18 = ["attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels", "local_cp_size",
                    "loss_mask", "max_seqlen", "position_ids", "tokens"]


def tokens_and_loss_mask(script, batch) -> tuple:
    """(tokens, loss_mask) of what ``script.get_batch`` returned."""
    if not in_versions(since="0.18"):
        return batch[0], batch[2]
    keys = getattr(script, "BATCH_KEYS", _BATCH_KEYS_0_18)
    return batch[keys.index("tokens")], batch[keys.index("loss_mask")]


# -- 0.19: the rampup calculator is gone (--rampup-batch-size is ignored); --step-batch-size-schedule instead --
def rampup_calculator_class():
    """megatron-core's rampup calculator, or None where the version has none."""
    from megatron.core import num_microbatches_calculator

    return getattr(num_microbatches_calculator, "RampupBatchsizeNumMicroBatchesCalculator", None)


def build_calculator(schedule):
    """megatron-core's num-microbatches calculator for a :class:`~megatron_let.weight.stop.TrainingSchedule`."""
    from megatron.core.num_microbatches_calculator import _build_num_microbatches_calculator

    kwargs = dict(rank=-1, global_batch_size=schedule.global_batch_size, micro_batch_size=schedule.micro_batch_size,
                  data_parallel_size=schedule.data_parallel_size,
                  decrease_batch_size_if_needed=schedule.decrease_batch_size_if_needed)
    if rampup_calculator_class() is not None:
        kwargs["rampup_batch_size"] = [int(v) for v in schedule.rampup_batch_size] if schedule.rampup_batch_size else None
    else:
        kwargs.update(step_batch_size_schedule=schedule.step_batch_size_schedule, seq_length=schedule.seq_length)
    return _build_num_microbatches_calculator(**kwargs)


# -- 0.19: get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=...) (before: (batch, cp_group=None)) --------
def batch_on_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """megatron-core's context-parallel slice of ``batch`` (zigzag over 2 x CP chunks)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        # 0.19 reads the group's size from torch.distributed: None would mean the whole world
        group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group) if cp_group is not None \
        else get_batch_on_this_cp_rank(batch)


# -- 0.17: the null tokenizer is the "null-text" library of megatron.core.tokenizers (a path is required else) --
def null_tokenizer(vocab_size: int):
    """megatron-core's null tokenizer (ids are the text) with ``vocab_size`` ids."""
    from megatron.core.tokenizers import MegatronTokenizer

    if _core_minor() >= (0, 17):
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=vocab_size)
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=vocab_size)
