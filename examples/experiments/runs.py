"""Launching ``pretrain_gpt_let.py`` under torchrun and reading Megatron-LM's log lines back.

Both trainers print Megatron-LM's format (``iteration N/ M | consumed samples: ... | lm loss: ...``
and ``validation loss at iteration N | lm loss value: ...``), so one parser serves both.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pretrain_gpt_let.py"
HYBRID_SCRIPT = ROOT / "pretrain_hybrid_let.py"  # a HybridModel target (--hybrid-layer-pattern; megatron-core 0.19)
# what Megatron-LM's own loop needs on a CPU (megatron_let.compat.cpu_megatron_lm); the lean trainer accepts them too
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo", "--use-cpu-initialization",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
             "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion"]
ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|(.*)")
VAL_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.eE+-]+)")


def new_log() -> dict:
    """``train``: iteration -> {field: value}; ``valid``: iteration -> validation lm loss."""
    return {"train": {}, "valid": {}}


def parse_line(line: str, log: dict) -> Optional[Tuple[str, int]]:
    """Update ``log`` with one log line; return ("train"|"valid", iteration) or None."""
    if (m := VAL_LINE.search(line)):
        log["valid"][int(m.group(1))] = float(m.group(2))
        return "valid", int(m.group(1))
    m = ITER_LINE.search(line)
    if m and "consumed samples" in line:
        fields = dict(part.strip().rsplit(":", 1) for part in m.group(3).split("|") if ":" in part)
        log["train"][int(m.group(1))] = {k.strip(): float(v) for k, v in fields.items()}
        return "train", int(m.group(1))
    return None


def parse_log(text: str) -> dict:
    log = new_log()
    for line in text.splitlines():
        parse_line(line, log)
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(flags: List[str], nproc: int = 1, script: Path = SCRIPT) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            f"--master-port={free_port()}", str(script), *map(str, flags)]


def run_pretrain(flags: List[str], log_path: Path, on_line: Callable[[str, int, dict], None] = lambda *_: None,
                 gpu: bool = False, nproc: int = 1, script: Path = SCRIPT) -> Tuple[int, dict, List[str]]:
    """Run ``pretrain_gpt_let.py flags`` (or ``script``) to completion, writing its output to ``log_path``.

    ``on_line(kind, iteration, log)`` is called for every parsed log line (progress output). Without
    ``gpu`` the GPUs are hidden. Returns (exit code, parsed log, the last 30 lines).
    """
    cmd = pretrain_command(flags, nproc, script)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2)),
               PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    (log_path.parent / "command.txt").write_text(" ".join(cmd) + "\n")
    log, tail = new_log(), []
    with open(log_path, "w") as logfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env, bufsize=1)
        for line in proc.stdout:
            logfile.write(line)
            logfile.flush()
            tail = (tail + [line.rstrip()])[-30:]
            if (hit := parse_line(line, log)):
                on_line(*hit, log)
        rc = proc.wait()
    return rc, log, tail


def progress_line(name: str, kind: str, iteration: int, log: dict, total: int) -> str:
    """One short console line for a parsed log line."""
    if kind == "valid":
        return f"  [{name:8s}] validation at {iteration:5d}: lm loss {log['valid'][iteration]:.4f}"
    m = log["train"][iteration]
    line = (f"  [{name:8s}] iter {iteration:5d}/{total} | lm loss {m.get('lm loss', float('nan')):.4f} | "
            f"lr {m.get('learning rate', 0):.2e} | {m.get('elapsed time per iteration (ms)', 0) / 1000:.2f} s/it")
    if "let lambda" in m:
        line += f" | let lambda {m['let lambda']:.3f}"
        if "let cos" in m:
            line += f" | let cos {m['let cos']:.3f}"
    return line


def iteration_times(log: dict, stop_iter: int) -> dict:
    """Median wall ms per iteration over log intervals, before/after the LET stop step.

    The first interval (start-up) is left out; the median shrugs off other jobs on a shared machine.
    """
    times = [(i, m["elapsed time per iteration (ms)"]) for i, m in sorted(log["train"].items())
             if "elapsed time per iteration (ms)" in m][1:]
    before = [t for i, t in times if i <= stop_iter]
    after = [t for i, t in times if i > stop_iter]
    return {"ms_per_iter_before_stop": statistics.median(before) if before else None,
            "ms_per_iter_after_stop": statistics.median(after) if after else None}
