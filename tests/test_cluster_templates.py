"""The cluster templates in examples/cluster/ launch what they claim, with flags the parsers accept.

Every SLURM script and the Kubeflow PyTorchJob is run the way bash would run it, in its dry-run
mode (``LET_DRY_RUN=1`` prints the final command one argument per line instead of running it), with
dummy cluster variables. From the printed command this checks:

- the launcher: one ``torchrun`` per node under ``srun``, parsed by torchrun's own parser, with the
  c10d rendezvous on ``$MASTER_ADDR:$MASTER_PORT`` and the node count of the allocation;
- every ``--let-*`` flag through ``megatron_let.config.add_let_args`` and the LET configuration
  through ``let_config_from_args`` (the teacher is the tokenizer, the target layer is early);
- each BASELINE twin equals its LET run minus the ``--let-*`` flags (same RUN_NAME), and by
  default writes to its own checkpoint directory; ``--save`` and ``--load`` are the same directory;
- all other flags against Megatron-LM's own parser (``add_megatron_arguments`` + LET's
  ``extra_args_provider``, strict ``parse_args``, then ``validate_args`` with the job's world size,
  which checks the TP/PP/CP/DP arithmetic; the global batch must split into micro-batches) when a checkout is available
  (``MEGATRON_LM_PATH``); otherwise that part is skipped, and
- against the lean trainer's ``build_parser()`` for the flags it implements; the flags only
  Megatron-LM knows must be the expected ones (fp8 recipe details, exit handling).
"""

import argparse
import json
import os
import subprocess
import sys

import pytest

from let_testing import NEEDS_MEGATRON_LM, ROOT, megatron_lm_source

CLUSTER = os.path.join(ROOT, "examples", "cluster")
GPUS_PER_NODE = 8
MASTER_ADDR, MASTER_PORT = "node-0.cluster", "29500"

# Megatron-LM flags the lean megatron-core trainer does not implement (it refuses them); the
# templates need Megatron-LM (MEGATRON_LM_PATH) for them.
MEGATRON_LM_ONLY = {"--fp8-recipe", "--fp8-amax-history-len", "--fp8-amax-compute-algo",
                    "--exit-signal-handler", "--exit-duration-in-mins"}

# name: (script, nodes, environment knobs, expected data-parallel size)
SLURM_VARIANTS = {
    "1p4b-bf16": ("llama_1p4b", 4, {}, 16),
    "1p4b-bf16-tp1": ("llama_1p4b", 4, {"TP": "1"}, 32),
    "1p4b-fp8": ("llama_1p4b", 4, {"PRECISION": "fp8"}, 16),
    "7b-bf16": ("llama_7b", 8, {}, 8),
    "7b-bf16-cp2": ("llama_7b", 8, {"CP": "2"}, 4),
    "7b-fp8": ("llama_7b", 8, {"PRECISION": "fp8"}, 8),
    "7b-fp8-cp2": ("llama_7b", 8, {"PRECISION": "fp8", "CP": "2"}, 4),
}
KINDS = ("let", "baseline")
CASES = [(name, kind) for name in SLURM_VARIANTS for kind in KINDS]
YAML = os.path.join(CLUSTER, "llama_1p4b_let.pytorchjob.yaml")


def _base_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(LET_DRY_RUN="1", MASTER_ADDR=MASTER_ADDR, TEACHER="/models/teacher-hf",
               DATA_PATH="/data/corpus_text_document", RUN_ROOT="/runs")
    env.update(extra)
    return env


def run_bash(args, env) -> list:
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, f"bash {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout.splitlines()


def split_command(argv):
    """(launcher argv, pretrain_gpt_let.py argv) of a printed command."""
    scripts = [i for i, token in enumerate(argv) if token.endswith("pretrain_gpt_let.py")]
    assert len(scripts) == 1, f"expected one pretrain_gpt_let.py in {argv}"
    return argv[:scripts[0] + 1], argv[scripts[0] + 1:]


def render_slurm(name: str, kind: str, **env):
    script, nodes, knobs, _ = SLURM_VARIANTS[name]
    path = os.path.join(CLUSTER, f"{script}_{kind}.sbatch")
    environment = _base_env(SLURM_NNODES=str(nodes), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[0-9]",
                            **knobs, **env)
    return split_command(run_bash([path], environment))


@pytest.fixture(scope="module")
def rendered():
    """{(variant, kind): (launcher, args)} with default run names."""
    return {(name, kind): render_slurm(name, kind) for name, kind in CASES}


def let_parser() -> argparse.ArgumentParser:
    from megatron_let.config import add_let_args

    return add_let_args(argparse.ArgumentParser(prog="let", allow_abbrev=False, exit_on_error=False))


def split_let(args):
    """(args without --let-* flags, the --let-* flags with their values). Every LET flag takes a value."""
    rest, let = [], []
    i = 0
    while i < len(args):
        if args[i].startswith("--let-"):
            let += args[i:i + 2]
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return rest, let


def flag_value(args, flag):
    values = [args[i + 1] for i, token in enumerate(args) if token == flag]
    assert len(values) == 1, f"{flag} given {len(values)} times"
    return values[0]


def options(args):
    return [token for token in args if token.startswith("--")]


# -- the files -------------------------------------------------------------------------------------

def test_templates_are_valid_bash():
    files = sorted(f for f in os.listdir(CLUSTER) if f.endswith((".sh", ".sbatch", ".flags")))
    assert {"common.sh", "llama_1p4b.flags", "llama_7b.flags", "llama_1p4b_let.sbatch",
            "llama_1p4b_baseline.sbatch", "llama_7b_let.sbatch", "llama_7b_baseline.sbatch"} <= set(files)
    for name in files:
        proc = subprocess.run(["bash", "-n", os.path.join(CLUSTER, name)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script", ["llama_1p4b", "llama_7b"])
def test_sbatch_header(script, kind):
    """Requeue on preemption, one task per node, and a --time above the Megatron-LM exit duration."""
    text = open(os.path.join(CLUSTER, f"{script}_{kind}.sbatch")).read()
    directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives
    (time,) = [d.split("=", 1)[1] for d in directives if d.startswith("--time=")]
    hours, minutes, _ = map(int, time.split(":"))
    _, args = render_slurm(f"{script[6:]}-bf16", kind)
    assert int(flag_value(args, "--exit-duration-in-mins")) < 60 * hours + minutes


def test_bad_knob_fails_cleanly():
    proc = subprocess.run(["bash", os.path.join(CLUSTER, "llama_1p4b_let.sbatch")], capture_output=True, text=True,
                          env=_base_env(SLURM_NNODES="4", SLURM_JOB_ID="1", PRECISION="fp4"), cwd=ROOT)
    assert proc.returncode == 2 and "PRECISION must be bf16 or fp8" in proc.stderr


# -- the launcher ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", CASES)
def test_srun_torchrun_rendezvous(name, kind, rendered):
    from torch.distributed.run import get_args_parser

    launcher, _ = rendered[name, kind]
    assert launcher[0] == "srun" and "--ntasks-per-node=1" in launcher
    torchrun = launcher.index("torchrun")
    launched = get_args_parser().parse_args(launcher[torchrun + 1:])
    assert launched.rdzv_backend == "c10d"
    assert launched.rdzv_endpoint == f"{MASTER_ADDR}:{MASTER_PORT}"
    assert launched.rdzv_id == "4242"
    assert launched.nnodes == str(SLURM_VARIANTS[name][1])
    assert launched.nproc_per_node == str(GPUS_PER_NODE)
    assert os.path.samefile(launched.training_script, os.path.join(ROOT, "pretrain_gpt_let.py"))


# -- LET flags and the twins -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SLURM_VARIANTS))
def test_let_flags_validate(name, rendered):
    from megatron_let.config import let_config_from_args

    _, args = rendered[name, "let"]
    _, let_flags = split_let(args)
    namespace = let_parser().parse_args(let_flags)  # every --let-* flag is one of LET's
    namespace.num_layers = int(flag_value(args, "--num-layers"))
    namespace.train_iters = int(flag_value(args, "--train-iters"))
    config = let_config_from_args(namespace)
    assert config is not None and config.lambda0 == 0.1
    assert config.warnings(namespace.num_layers, namespace.train_iters) == []
    assert config.target_layer <= namespace.num_layers / 4, "the paper aligns an early layer (~1/6 of depth)"
    assert 0 < config.resolve_stop_iter(namespace.train_iters) < namespace.train_iters
    # the target is trained with the teacher's tokenizer
    assert flag_value(args, "--tokenizer-model") == config.teacher


@pytest.mark.parametrize("name", sorted(SLURM_VARIANTS))
def test_baseline_twin_differs_only_in_let_flags(name, rendered):
    same = dict(RUN_NAME="twin")
    let_launcher, let_args = render_slurm(name, "let", **same)
    base_launcher, base_args = render_slurm(name, "baseline", **same)
    without_let, let_flags = split_let(let_args)
    assert let_flags and not split_let(base_args)[1]
    assert base_args == without_let
    assert base_launcher == let_launcher
    # by default each gets its own run directory, and resumes from where it saves
    _, let_default = rendered[name, "let"]
    _, base_default = rendered[name, "baseline"]
    for args in (let_default, base_default):
        assert flag_value(args, "--save") == flag_value(args, "--load")
    assert flag_value(let_default, "--save") != flag_value(base_default, "--save")


# -- the parsers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", CASES)
def test_lean_trainer_parser(name, kind, rendered):
    """Flags the lean trainer implements parse there; the rest are the expected Megatron-LM-only ones."""
    from megatron_let.training.arguments import build_parser

    _, args = rendered[name, kind]
    parser = build_parser()
    unknown = {flag for flag in options(args) if flag not in parser._option_string_actions}
    assert unknown <= MEGATRON_LM_ONLY, f"flags neither trainer knows: {sorted(unknown - MEGATRON_LM_ONLY)}"
    known, _ = parser.parse_known_args(args)  # values of the known flags are valid there
    assert known.num_layers == int(flag_value(args, "--num-layers"))
    print(f"{name}/{kind}: Megatron-LM-only flags: {sorted(unknown)}")


def _megatron_lm_checkout():
    for path in (os.environ.get("MEGATRON_LM_PATH"),):
        if path and os.path.isfile(os.path.join(path, "megatron", "training", "arguments.py")):
            return path
    return None


_MEGATRON_CHECK = r"""
import argparse, contextlib, io, json, sys
from megatron_let.integrations.megatron_lm import megatron_lm_available
assert megatron_lm_available(), "megatron.training does not import"
from megatron.training.arguments import add_megatron_arguments, validate_args
from megatron_let.config import add_let_args, let_config_from_args
results = {}
for name, (world_size, argv) in json.load(sys.stdin).items():
    parser = add_let_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)  # what parse_args(ignore_unknown_args=False) does with sys.argv
    except SystemExit:
        results[name] = {"error": err.getvalue().strip().splitlines()[-1]}
        continue
    args.rank, args.world_size = 0, world_size
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        config = let_config_from_args(args)
    except BaseException as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
        continue
    results[name] = {"dp": args.data_parallel_size, "vpp": args.virtual_pipeline_model_parallel_size,
                     "sp": args.sequence_parallel, "fp8": args.fp8, "cp": args.context_parallel_size,
                     "gbs": args.global_batch_size, "mbs": args.micro_batch_size,
                     "pp": args.pipeline_model_parallel_size,
                     "let_layer": None if config is None else config.target_layer}
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def megatron_lm_results(rendered):
    checkout = _megatron_lm_checkout()
    if checkout is None and megatron_lm_source() != "wheel":
        pytest.skip(NEEDS_MEGATRON_LM)  # the non-LET flags are then checked against the lean trainer's parser only
    jobs = {f"{name}/{kind}": (SLURM_VARIANTS[name][1] * GPUS_PER_NODE, rendered[name, kind][1])
            for name, kind in CASES}
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    if checkout is not None:  # else the wheel's megatron.training (megatron-core 0.17+)
        env["MEGATRON_LM_PATH"] = checkout
    proc = subprocess.run([sys.executable, "-c", _MEGATRON_CHECK], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"Megatron-LM parser check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[0][len("RESULTS"):])


@pytest.mark.parametrize("name,kind", CASES)
def test_megatron_lm_parser_and_validation(name, kind, megatron_lm_results):
    result = megatron_lm_results[f"{name}/{kind}"]
    assert "error" not in result, f"Megatron-LM rejects {name}/{kind}: {result['error']}"
    _, _, knobs, dp = SLURM_VARIANTS[name]
    assert result["dp"] == dp
    # Megatron-LM checks this only when it builds its micro-batch calculator
    microbatches, remainder = divmod(result["gbs"], result["mbs"] * result["dp"])
    assert remainder == 0 and microbatches >= result["pp"], result
    assert result["fp8"] == ("hybrid" if knobs.get("PRECISION") == "fp8" else None)
    if name.startswith("7b"):
        assert result["vpp"] == 4 and result["sp"] and result["cp"] == int(knobs.get("CP", "1"))
    assert result["let_layer"] == ({"llama_1p4b": 4, "llama_7b": 5}[SLURM_VARIANTS[name][0]]
                                   if kind == "let" else None)


# -- Kubernetes ------------------------------------------------------------------------------------

def test_pytorchjob_uses_the_same_flags():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load(open(YAML))
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    nodes = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    assert int(job["spec"]["nprocPerNode"]) == GPUS_PER_NODE
    for role in ("Master", "Worker"):
        (container,) = specs[role]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == GPUS_PER_NODE
    assert container["command"] == ["bash", "-c"]
    (script,) = container["args"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["RUN_KIND"] == "let" and env["EXIT_DURATION_MIN"] == "0"
    # as the operator would start it: MASTER_ADDR/PORT and PET_NNODES, here with the project at ROOT
    environment = _base_env(**{**env, "LET_REPO": ROOT, "TEACHER": "/models/teacher-hf",
                               "DATA_PATH": "/data/corpus_text_document", "RUN_ROOT": "/runs",
                               "MASTER_PORT": MASTER_PORT, "PET_NNODES": str(nodes)})
    launcher, args = split_command(run_bash(["-c", script], environment))

    from torch.distributed.run import get_args_parser

    launched = get_args_parser().parse_args(launcher[1:])
    assert launcher[0] == "torchrun" and launched.rdzv_backend == "c10d"
    assert launched.rdzv_endpoint == f"{MASTER_ADDR}:{MASTER_PORT}" and launched.nnodes == str(nodes)
    # the same arguments as the SLURM LET run of the same knobs, minus the SLURM time limit
    _, slurm_args = render_slurm("1p4b-bf16", "let", TP=env["TP"], PRECISION=env["PRECISION"],
                                 EXIT_DURATION_MIN="0")
    assert args == slurm_args
    assert "--exit-duration-in-mins" not in args and "--exit-signal-handler" in args
