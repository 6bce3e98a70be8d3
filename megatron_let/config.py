"""LET configuration: one validated dataclass, from which the Megatron-LM style argparse group is generated.

Each field is one ``--let-*`` flag (``--let-`` + its name, ``lambda0``: ``--let-lambda``), its help, type and
choices in the field's metadata. Fields marked ``per_run`` (an action of this run, not a LET setting) are not
saved in checkpoints.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import List, Optional, Union

from megatron_let.errors import LETConfigError

SCHEDULES = ("linear", "constant", "cosine")
PROJECTORS = ("interp", "linear", "mlp")
TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("error", "skip")
TOKEN_ALIGNMENTS = ("exact", "causal-span", "causal-span-matched")  # megatron_let/teachers/token_alignment.py
TEACHER_PLACEMENTS = ("spread", "owner")  # megatron_let/loss/placement.py
TEACHER_NORMS = ("none", "layernorm", "center", "standardize")  # megatron_let/loss/teacher_norm.py
LAMBDA_AUTO = "auto"  # --let-lambda auto: megatron_let/weight/auto_lambda.py
DEFAULT_LAMBDA_AUTO_FRACTION = 3.0  # from issue 27's convergence sweep (docs/convergence.md, docs/auto-lambda.md)
TEACHER_NONE = "none"  # --let-teacher none: LET off on purpose for this run (ends a resumed LET: preflight/resume_state.py)
STOP_MODES = ("schedule", "auto")  # --let-stop auto: megatron_let/weight/auto_stop.py
STOP_AUTO = "auto"
DEFAULT_STOP_AUTO = {"threshold": 0.0, "window": 20, "warmup": 100}  # provisional: never fired in the sweep
# (each list lives only here, imported where a module checks it: config stays torch-free)


def _lambda_value(text: str):
    """--let-lambda: a number, or 'auto'."""
    if text.strip().lower() == LAMBDA_AUTO:
        return LAMBDA_AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or '{LAMBDA_AUTO}', got {text!r}") from None


def _flag(help: str, default=None, type=None, choices=None, flag: Optional[str] = None, per_run: bool = False,
          required: bool = False, at_least=None, above=None, only_with: Optional[tuple] = None):
    """A LETConfig field that is one --let-* flag (``required``: a dataclass field without default). Checked by
    :meth:`LETConfig.validate` from this metadata: ``choices``; a finite number ``>= at_least`` or ``> above``
    (an int where ``type`` is int); ``only_with=(field, values)``: meaningless unless that field is one of them."""
    metadata = {"help": help, "type": type, "choices": choices, "flag": flag, "per_run": per_run,
                "at_least": at_least, "above": above, "only_with": only_with}
    return field(metadata=metadata) if required else field(default=default, metadata=metadata)


@dataclass
class LETConfig:
    """Everything LET needs besides the target model.

    ``target_layer`` is 1-based and global, like megatron-core's ``layer_number``.
    ``teacher_layer`` indexes the teacher's ``hidden_states`` tuple (``None`` = final).
    The stop step is ``stop_iter``, ``stop_samples`` or ``stop_fraction`` of training (default 0.25),
    resolved on Megatron-LM's schedule by :func:`megatron_let.weight.stop.resolve_stop`; after it lambda is 0
    and the teacher is released.
    """

    teacher: str = _flag(
        "Frozen teacher: a Hugging Face model directory. Enables LET. 'none': LET off for this run on purpose, e.g. "
        "to end a resumed checkpoint's LET before its stop step (a directory named none: ./none).", type=str,
        required=True)
    target_layer: int = _flag("1-based global layer number of the target whose output is aligned.", type=int,
                              required=True)
    teacher_layer: Optional[int] = _flag("Index into the teacher's hidden_states (default: final layer).", type=int)
    lambda0: Union[float, str] = _flag(
        "'auto' (default): the alignment-loss weight that keeps the alignment's gradient at layer k's output a fixed "
        "fraction (--let-lambda-auto-fraction) of the LM loss's gradient there, measured every iteration, smoothed, "
        "and decayed to 0 at the stop step by --let-schedule (docs/auto-lambda.md); or a fixed initial weight "
        "lambda0 (the paper: 0.1 at 1.4B), decayed the same way.", LAMBDA_AUTO, _lambda_value, flag="--let-lambda")
    stop_iter: Optional[int] = _flag("Iteration at which lambda reaches 0 and the teacher is released.", type=int,
                                     above=0)
    stop_fraction: Optional[float] = _flag(
        "Stop step as a fraction of training: of --train-iters, or of --train-samples (default 0.25).", type=float)
    schedule: str = _flag("Decay of lambda to 0 at the stop step (linear = the paper).", "linear", choices=SCHEDULES)
    projector: str = _flag(
        "interp: parameter-free 1-D interpolation of the teacher vector to the target width; linear / mlp: learned "
        "on the target side (REPA-style MLP).", "interp", choices=PROJECTORS)
    projector_hidden_size: Optional[int] = _flag("Hidden width of the mlp projector (default: target hidden size).",
                                                 type=int, at_least=1)
    teacher_dtype: str = _flag("Teacher weights dtype (auto: bf16 on GPU, fp32 on CPU).", "auto",
                               choices=TEACHER_DTYPES)
    on_nonfinite: str = _flag(
        "A NaN/Inf alignment loss (e.g. a broken teacher): stop with the iteration and rank (error), or skip that "
        "optimizer step like an fp16 overflow (skip).", "error", choices=NONFINITE_POLICIES)
    token_alignment: str = _flag(
        "exact: the target must use the teacher's tokenizer (checked). causal-span: the teacher re-tokenizes the "
        "text of each micro-batch with its own tokenizer and target position i is aligned to the last teacher "
        "token ending at or before token i's end. causal-span-matched: the same, but only positions where a "
        "teacher token ends exactly where token i ends (the others' teacher state is one teacher token stale).",
        "exact", choices=TOKEN_ALIGNMENTS)
    teacher_tokenizer: Optional[str] = _flag(
        "Teacher tokenizer directory for causal-span (default: the teacher's directory).", type=str,
        only_with=("token_alignment", TOKEN_ALIGNMENTS[1:]))
    teacher_placement: str = _flag(
        "spread: each iteration's teacher forward is divided evenly over every rank of the replica's "
        "model-parallel group (TP x CP x PP), states sent to layer k's ranks; owner: only layer k's stage loads "
        "and runs the teacher (less memory elsewhere).", "spread", choices=TEACHER_PLACEMENTS)
    teacher_norm: str = _flag(
        "Normalise the teacher's states before the cosine: none (the paper); layernorm (per token, over its "
        "dimensions); center (the teacher's mean state subtracted: the near-constant part of massive "
        "activations); standardize (per dimension, by the teacher's mean/std). center/standardize estimate their "
        "statistics over the tokens of the first --let-teacher-norm-iters iterations, identically on every rank, "
        "then freeze them; saved in the checkpoint. The start-up line 'LET teacher features' shows how "
        "concentrated a teacher's states are; on CPU none of these beat none (README).", "none",
        choices=TEACHER_NORMS)
    teacher_norm_iters: int = _flag(
        "center / standardize: iterations whose teacher states estimate the statistics (default 20; the first "
        "only measures, then they are frozen).", 20, int, at_least=1)
    stop_samples: Optional[int] = _flag(
        "Stop once this many training samples are consumed (sample-based runs; --rampup-batch-size is followed).",
        type=int, above=0)
    lambda_auto_fraction: Optional[float] = _flag(
        f"--let-lambda auto: the alignment's pull at layer k as a fraction of the LM loss's at the start, decayed by "
        f"the schedule (default {DEFAULT_LAMBDA_AUTO_FRACTION:g}: docs/convergence.md).", type=float, above=0,
        only_with=("lambda0", (LAMBDA_AUTO,)))
    stop: str = _flag(
        "schedule: LET stops at the stop step. auto: also stop as soon as the alignment no longer helps the LM loss: "
        "the cosine between the alignment's and the LM loss's gradients at layer k's output stays below "
        "--let-stop-auto-threshold for --let-stop-auto-window iterations; the stop step stays the latest stop "
        "(docs/auto-lambda.md).", "schedule", choices=STOP_MODES)
    stop_auto_threshold: Optional[float] = _flag(
        f"--let-stop auto: cosine below which an iteration counts as not helping "
        f"(default {DEFAULT_STOP_AUTO['threshold']}).", type=float, above=-math.inf, only_with=("stop", (STOP_AUTO,)))
    stop_auto_window: Optional[int] = _flag(
        f"--let-stop auto: consecutive such iterations that stop LET (default {DEFAULT_STOP_AUTO['window']}).",
        type=int, at_least=1, only_with=("stop", (STOP_AUTO,)))
    stop_auto_warmup: Optional[int] = _flag(
        f"--let-stop auto: iterations at the start that never count (default {DEFAULT_STOP_AUTO['warmup']}).",
        type=int, at_least=0, only_with=("stop", (STOP_AUTO,)))
    allow_bidirectional_teacher: bool = _flag(
        "Accept a teacher that is not a causal decoder (BERT-style encoders). Off by default: its state at "
        "position t has seen later tokens, which the target's causal layer k cannot, so the alignment asks for "
        "information the target does not have.", False, per_run=True)
    reset_projector: bool = _flag(
        "On resume, start a fresh learned projector (and its optimizer state) instead of the checkpoint's: needed "
        "when the teacher's width, --let-projector or --let-projector-hidden-size changed, which the saved "
        "projector cannot serve.", False, per_run=True)
    export_dir: Optional[str] = _flag(
        "With --load: write the loaded model without LET state (no projector, no optimizer) to this directory as "
        "a plain Megatron checkpoint (the trainer's own save), and exit. LET need not be on.", type=str,
        per_run=True)

    def validate(self, num_layers: Optional[int] = None, train_iters: Optional[int] = None,
                 train_samples: Optional[int] = None) -> "LETConfig":
        """Raise LETConfigError for a setting that cannot work; return self. Each field's own limits come from
        its metadata (:func:`_flag`); the rules between fields are below."""
        if not isinstance(self.target_layer, int) or self.target_layer < 1:
            raise LETConfigError(f"--let-target-layer must be a layer number >= 1 (1-based, like Megatron's "
                                 f"layer_number); got {self.target_layer}.")
        if num_layers is not None and self.target_layer > num_layers:
            raise LETConfigError(
                f"--let-target-layer {self.target_layer} is beyond the model's --num-layers "
                f"{num_layers}; choose 1..{num_layers} (the paper uses an early layer, ~1/6 of depth).")
        if self.lambda0 != LAMBDA_AUTO and not _number_in(self.lambda0, float, at_least=0):
            raise LETConfigError(f"--let-lambda must be a finite number >= 0 or 'auto'; got {self.lambda0}.")
        for item in fields(self):
            _check_field(self, item)
        stops = [flag_of(name) for name in ("stop_iter", "stop_samples", "stop_fraction")
                 if getattr(self, name) is not None]
        if len(stops) > 1:
            raise LETConfigError(f"give one of --let-stop-iter, --let-stop-samples, --let-stop-fraction; "
                                 f"got {' and '.join(stops)}.")
        if self.stop_fraction is not None and not 0 < self.stop_fraction <= 1:
            raise LETConfigError(f"--let-stop-fraction must be in (0, 1]; got {self.stop_fraction}.")
        if self.stop_iter is None and self.stop_samples is None and train_iters is None and not train_samples:
            raise LETConfigError("LET needs a stop step: give --let-stop-iter or --let-stop-samples, or "
                                 "--train-iters / --train-samples for --let-stop-fraction (default 0.25).")
        return self

    def warnings(self, num_layers: Optional[int] = None, train_iters: Optional[int] = None,
                 stop_iter: Optional[int] = None) -> List[str]:
        """Settings that run but are probably not what the user wants (``stop_iter``: the resolved stop)."""
        found = []
        if num_layers and self.target_layer > num_layers / 2:
            found.append(f"--let-target-layer {self.target_layer} is in the second half of {num_layers} layers; "
                         "the paper aligns an EARLY layer (~1/6 of depth): late layers gave a loss spike after "
                         "the stop step.")
        stop = self.resolve_stop_iter(train_iters) if stop_iter is None and train_iters else stop_iter
        if train_iters and stop is not None and stop > train_iters:
            given = f"--let-stop-iter {self.stop_iter}" if self.stop_iter is not None else \
                f"--let-stop-samples {self.stop_samples} (iteration {stop})"
            found.append(f"{given} is beyond --train-iters {train_iters}: lambda never "
                         "reaches 0 and the teacher runs for the whole job.")
        return found

    def resolve_stop_iter(self, train_iters: Optional[int]) -> int:
        """The stop iteration of an iteration-based run with a constant batch size (default: a quarter
        of training); :func:`megatron_let.weight.stop.resolve_stop` handles every schedule."""
        if self.stop_iter is not None:
            return self.stop_iter
        if self.stop_samples is not None or train_iters is None:
            raise LETConfigError("the stop step of --let-stop-samples or --train-samples needs the batch schedule: "
                                 "megatron_let.weight.stop.resolve_stop")
        fraction = 0.25 if self.stop_fraction is None else self.stop_fraction
        return max(1, int(round(fraction * train_iters)))

    def stop_auto_setting(self, name: str):
        """--let-stop auto's ``threshold``, ``window`` or ``warmup``, its default where not given."""
        value = getattr(self, f"stop_auto_{name}")
        return DEFAULT_STOP_AUTO[name] if value is None else value

    @property
    def auto_fraction(self) -> float:
        """--let-lambda auto's fraction of the LM loss's pull at layer k."""
        return DEFAULT_LAMBDA_AUTO_FRACTION if self.lambda_auto_fraction is None else float(self.lambda_auto_fraction)

    def to_dict(self) -> dict:
        """The LET settings a checkpoint keeps (not this run's actions: export, reset, ...)."""
        return {name: value for name, value in asdict(self).items() if not _field(name).metadata["per_run"]}


def _number_in(value, kind, at_least=None, above=None) -> bool:
    """A finite number (an int where ``kind`` is int; bools are not numbers) within the bound."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)) \
            or not math.isfinite(value):
        return False
    return (at_least is None or value >= at_least) and (above is None or value > above)


def _check_field(config: LETConfig, item) -> None:
    """One field against its metadata: choices, numeric bounds, the setting it belongs to."""
    value, meta, flag = getattr(config, item.name), item.metadata, flag_of(item.name)
    if value is None:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise LETConfigError(f"{flag} must be one of {meta['choices']}; got {value!r}.")
    if meta["only_with"]:
        other, allowed = meta["only_with"]
        if getattr(config, other) not in allowed:
            raise LETConfigError(f"{flag} is only used with {flag_of(other)} {' or '.join(allowed)}; "
                                 f"got {flag_of(other)} {getattr(config, other)}.")
    at_least, above = meta["at_least"], meta["above"]
    if (at_least is not None or above is not None) and not _number_in(value, meta["type"], at_least, above):
        kind = "an integer" if meta["type"] is int else "a finite number"
        bound = f">= {at_least}" if at_least is not None else f"> {above}" if above != -math.inf else ""
        raise LETConfigError(f"{flag} must be {f'{bound} ({kind})' if bound else kind}; got {value}.")


def resolved_settings(settings: dict, hidden_size: Optional[int] = None, teacher_layers: Optional[int] = None) -> dict:
    """A LETConfig dict (a checkpoint's, possibly older and missing fields) with every default that None stands
    for written out, so that a setting typed out at its default compares equal to one left out.

    ``hidden_size``: the target's (the mlp projector's default width); ``teacher_layers``: the teacher's
    ``num_hidden_layers`` where known (its final layer may be named by index)."""
    out = {**{f.name: f.default for f in fields(LETConfig)}, **settings}
    if out["teacher_layer"] is not None and teacher_layers is not None and out["teacher_layer"] == teacher_layers:
        out["teacher_layer"] = -1
    if out["teacher_layer"] is None:
        out["teacher_layer"] = -1  # hidden_states[-1]: the final layer
    if out["stop_iter"] is None and out["stop_samples"] is None and out["stop_fraction"] is None:
        out["stop_fraction"] = 0.25
    if out["projector_hidden_size"] is None and out["projector"] == "mlp":
        out["projector_hidden_size"] = hidden_size
    if out["teacher_tokenizer"] is None and out["token_alignment"] != "exact":
        out["teacher_tokenizer"] = out["teacher"]
    if out["lambda_auto_fraction"] is None and out["lambda0"] == LAMBDA_AUTO:
        out["lambda_auto_fraction"] = DEFAULT_LAMBDA_AUTO_FRACTION
    for name, default in DEFAULT_STOP_AUTO.items():
        if out[f"stop_auto_{name}"] is None and out["stop"] == STOP_AUTO:
            out[f"stop_auto_{name}"] = default
    for name in ("lambda0", "stop_fraction", "lambda_auto_fraction", "stop_auto_threshold"):
        if isinstance(out[name], int) and not isinstance(out[name], bool):
            out[name] = float(out[name])  # --let-lambda 1 and 1.0 are one setting
    return out


def flag_of(field_name: str) -> str:
    """'--let-target-layer' for ``target_layer`` (``lambda0``: '--let-lambda')."""
    return _field(field_name).metadata["flag"] or "--let-" + field_name.replace("_", "-")


def dest_of(field_name: str) -> str:
    """The argparse attribute of a field's flag: ``let_target_layer``."""
    return flag_of(field_name)[2:].replace("-", "_")


def _field(name: str):
    return next(f for f in fields(LETConfig) if f.name == name)


def add_let_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the ``--let-*`` flags, one per LETConfig field, in their own group."""
    group = parser.add_argument_group(title="late-to-early training (LET)")
    for f in fields(LETConfig):
        meta = f.metadata
        default = None if f.default is MISSING else f.default
        if isinstance(default, bool):
            group.add_argument(flag_of(f.name), action="store_true", help=meta["help"])
        else:
            group.add_argument(flag_of(f.name), type=meta["type"], choices=meta["choices"], default=default,
                               help=meta["help"])
    return parser


def let_requested(args) -> bool:
    """--let-teacher names a teacher (not absent, not ``none``)."""
    return getattr(args, "let_teacher", None) not in (None, TEACHER_NONE)


def let_flags(settings: dict) -> str:
    """The --let-* flags that give a LETConfig dict (a checkpoint's) back: the teacher, the target layer and
    every setting away from its default, as a user would paste them."""
    import shlex

    parts = []
    for f in fields(LETConfig):
        default = None if f.default is MISSING else f.default
        value = settings.get(f.name, default)
        if f.metadata["per_run"] or value is None or (value == default and f.default is not MISSING):
            continue
        parts.append(f"{flag_of(f.name)} {shlex.quote(str(value))}")
    return " ".join(parts)


def let_config_from_args(args: argparse.Namespace) -> Optional[LETConfig]:
    """Build and validate the LETConfig from parsed args; None when LET is off (no --let-teacher, or
    ``--let-teacher none``)."""
    if not let_requested(args):
        given = [flag_of(f.name) for f in fields(LETConfig)  # a setting that only means something with LET
                 if f.name != "teacher" and f.default in (None, MISSING) and not f.metadata["per_run"]
                 and getattr(args, dest_of(f.name), None) is not None]
        if given and getattr(args, "let_teacher", None) == TEACHER_NONE:
            raise LETConfigError(f"{', '.join(given)} given with --let-teacher none, which turns LET off; drop "
                                 f"them, or name the teacher with --let-teacher PATH.")
        if given:
            raise LETConfigError(f"{', '.join(given)} given without --let-teacher; add --let-teacher PATH.")
        return None
    if args.let_target_layer is None:
        raise LETConfigError("--let-teacher needs --let-target-layer K (e.g. 1/6 of --num-layers).")
    values = {f.name: getattr(args, dest_of(f.name), None if f.default is MISSING else f.default)
              for f in fields(LETConfig)}
    return LETConfig(**values).validate(num_layers=getattr(args, "num_layers", None),
                                        train_iters=getattr(args, "train_iters", None),
                                        train_samples=getattr(args, "train_samples", None))
