"""What a new user meets first (issue 32), on whichever trainer the stack selects: --help lists LET's flags
and exits 0; README.md's "Smoke test on CPU" command runs as written (its flags are parsed out of the README,
so this breaks when the README changes) without a warning of LET's own; each GPU-only Megatron-LM default on a
machine without a GPU is refused in one line naming the flag and the fix, before any process group."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from let_testing import ROOT, free_port, megatron_lm_source, refused

MEGATRON_LM = megatron_lm_source() is not None  # pretrain_gpt_let.py runs Megatron-LM's pretrain() here
NEEDS_MEGATRON_LM_LOOP = ("preflight/cpu.py guards Megatron-LM's own loop, which this stack (megatron-core "
                          "0.16 wheel without MEGATRON_LM_PATH) does not run: the lean trainer checks its own flags")
LET_WARNING = re.compile(r"megatron_let/\S+\.py:\d+: \w*Warning")  # a warning raised by LET itself


def readme_smoke_command():
    """(teacher one-liner argv, torchrun argv) of README.md's "Smoke test on CPU" block."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        section = handle.read().split("## Smoke test on CPU\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    teacher, train = (shlex.split(part) for part in block.split("&&"))
    assert teacher[:2] == ["python", "-c"] and train[:2] == ["OMP_NUM_THREADS=1", "torchrun"], block
    return teacher, train[2:]


def _flags(teacher_dir):
    """The README's pretrain_gpt_let.py flags, its teacher directory replaced by ``teacher_dir``."""
    _, torchrun_args = readme_smoke_command()
    flags = torchrun_args[torchrun_args.index("pretrain_gpt_let.py") + 1:]
    return [teacher_dir if flag == "/tmp/let-teacher" else flag for flag in flags]


def _without(flags, *drop):
    """``flags`` less each flag in ``drop`` (with its value when it takes one)."""
    out, skip = [], False
    for i, flag in enumerate(flags):
        if skip:
            skip = False
            continue
        if flag in drop:
            skip = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            continue
        out.append(flag)
    return out


# ------------------------------------------------------------------ the README's smoke command
def test_readme_smoke_command_runs_as_written(tmp_path):
    """The teacher one-liner, then torchrun with exactly the README's flags (teacher under tmp_path), with the
    user's warnings visible: four iterations with a LET loss, no traceback, no warning of LET's own."""
    teacher_argv, torchrun_args = readme_smoke_command()
    teacher = str(tmp_path / "let-teacher")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    env.pop("PYTHONWARNINGS", None)
    code = teacher_argv[2].replace("/tmp/let-teacher", teacher)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT, env=env, timeout=300)
    nproc = torchrun_args[torchrun_args.index("--nproc-per-node") + 1]
    script_at = torchrun_args.index("pretrain_gpt_let.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc, "--master-port",
               str(free_port()), *torchrun_args[script_at:]]
    command = [teacher if arg == "/tmp/let-teacher" else arg for arg in command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    lines = [line for line in proc.stdout.splitlines() if re.search(r"iteration\s+\d+/\s*4 \|", line)]
    assert len(lines) >= 4 and "iteration        4/       4" in lines[-1], proc.stdout[-3000:]
    assert re.search(r"let loss: [1-9]", lines[0]), lines[0]  # LET ran: a positive alignment loss
    assert not LET_WARNING.search(output), [line for line in output.splitlines() if LET_WARNING.search(line)]


# ------------------------------------------------------------------ --help
@pytest.mark.parametrize("script", ["pretrain_gpt_let.py", "pretrain_hybrid_let.py"])
def test_help_lists_let_flags_and_exits_0(script):
    flag = "-h" if script == "pretrain_hybrid_let.py" else "--help"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), flag], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--let-teacher" in proc.stdout and "--let-export-dir" in proc.stdout, proc.stdout[-3000:]
    # Megatron-LM's (or the lean trainer's) whole list, or one line saying why only LET's flags are shown
    why = [line for line in proc.stdout.splitlines() if line.startswith(f"{script}: ")]
    assert "--tensor-model-parallel-size" in proc.stdout or len(why) == 1, proc.stdout[-3000:]


# ------------------------------------------------------------------ GPU-only settings on a CPU machine
CPU_CASES = {  # name: (flags dropped from the README command, flags added, fragments of the one line); the
    # defaults the README's flags switch off are test_every_missing_cpu_flag_named_in_the_same_line's
    "bf16-softmax-fusion": ([], ["--bf16"], ["--bf16/--fp16 with masked-softmax fusion",
                                             "add --no-masked-softmax-fusion"]),
    "fp16": ([], ["--fp16"], ["--fp16 needs a GPU", "use --bf16"]),
    "fp8": ([], ["--fp8-format", "hybrid"], ["--fp8-format needs TransformerEngine", "drop --fp8-format"]),
    "flash-attn": ([], ["--use-flash-attn"], ["drop --use-flash-attn"]),
    "layernorm-1p": ([], ["--apply-layernorm-1p"], ["drop --apply-layernorm-1p"]),
    "rope-fusion": ([], ["--position-embedding-type", "rope"], ["add --no-rope-fusion"]),
    "precision-aware-optimizer": ([], ["--use-precision-aware-optimizer"], ["drop --use-precision-aware-optimizer"]),
    "grouped-gemm": ([], ["--num-experts", "2", "--moe-grouped-gemm"], ["drop --moe-grouped-gemm"]),
}


@pytest.mark.skipif(not MEGATRON_LM, reason=NEEDS_MEGATRON_LM_LOOP)
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_gpu_only_setting_refused_in_one_line(name, tiny_teacher):
    drop, add, fragments = CPU_CASES[name]
    line = refused([*_without(_flags(tiny_teacher), *drop), *add], fragments=fragments)
    assert line.count("torch.cuda.is_available() is False") <= 1, line


@pytest.mark.skipif(not MEGATRON_LM, reason=NEEDS_MEGATRON_LM_LOOP)
def test_every_missing_cpu_flag_named_in_the_same_line(tiny_teacher):
    """The issue's five tries: Megatron-LM's defaults, all at once, fixed by one corrected launch."""
    flags = _without(_flags(tiny_teacher), "--distributed-backend", "--transformer-impl", "--no-persist-layer-norm",
                     "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--eval-interval")
    refused(flags, fragments=["add --distributed-backend gloo", "add --transformer-impl local",
                              "add --no-persist-layer-norm", "add --no-gradient-accumulation-fusion",
                              "add --use-cpu-initialization", "add --eval-interval N"])
