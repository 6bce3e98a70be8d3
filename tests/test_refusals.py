"""Issue 26: inputs that used to train silently or die with a traceback. Each is refused in one line
(exit 2) before any process group exists, with every file it was given unchanged, or runs with a
documented opt-in or warning (docs/reliability.md)."""

import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch

from let_testing import (SMALL_MODEL as BASE, TEXTS, bpe_tokenizer, launch, make_tiny_llama,
                         one_line_error as assert_one_line_error, refused, run_lean as run, small_let_flags as let,
                         tree_hash)

RESUMABLE = [*BASE, "--let-stop-iter", 4]  # the teacher is still in use at the resumed iterations


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"narrow": make_tiny_llama(str(root / "llama48"), vocab_size=256),
            "wide": make_tiny_llama(str(root / "llama96"), vocab_size=256, hidden_size=96)}


def run_refused(*args, files=(), fragments=()):
    """let_testing.refused on the lean trainer, and no 'LET settings differ' warning either (the run got no further)."""
    return refused(args, files=files, fragments=fragments, lean=True, not_in_stdout=["WARNING: LET settings differ"])


def test_held_port_would_catch_a_process_group(teachers):
    """The control for run_refused: a valid run under the held port fails (it creates a process group)."""
    with pytest.raises(AssertionError):
        run_refused(*BASE, "--train-iters", 1, *let(teachers["narrow"]))


# ------------------------------------------------------------------ 1. a bidirectional teacher
def _bert(path, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, **overrides)).save_pretrained(path)
    return str(path)


def test_bidirectional_teacher_is_refused(tmp_path):
    bert = _bert(tmp_path / "bert")
    run_refused(*BASE, *let(bert), files=[bert], fragments=[
        "--let-teacher", "is not a causal decoder", "architecture BertModel", "model_type bert", "is_decoder False",
        "causal decoder", "--let-allow-bidirectional-teacher"])


def test_bidirectional_teacher_with_the_opt_in_trains(tmp_path):
    proc = run(*BASE, "--train-iters", 1, *let(_bert(tmp_path / "bert")), "--let-allow-bidirectional-teacher")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: --let-teacher" in proc.stdout and "aligning to it anyway" in proc.stdout
    assert "let cos" in proc.stdout


def test_which_teachers_are_causal():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    from megatron_let.teachers.causality import bidirectional_reason

    assert bidirectional_reason(LlamaConfig()) is None and bidirectional_reason(GPT2Config()) is None
    assert bidirectional_reason(BertConfig(is_decoder=True)) is None  # BERT built as a causal decoder
    assert "bidirectional attention" in bidirectional_reason(BertConfig())
    assert "encoder-decoder" in bidirectional_reason(T5Config())


# ------------------------------------------------------------------ 2. resume: what may change
def _checkpoint(tmp_path, teacher, *flags):
    ckpt = str(tmp_path / "ckpt")
    proc = run(*RESUMABLE, *let(teacher, 1, *flags), "--save", ckpt, "--save-interval", 1, "--exit-interval", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt


def test_resume_with_a_teacher_the_saved_projector_cannot_serve_is_refused(tmp_path, teachers):
    """Saved with a 48-wide teacher and a linear projector, resumed with a 96-wide one: it used to warn and
    die at the first step with 'size mismatch ... 48 ... 96'."""
    ckpt = _checkpoint(tmp_path, teachers["narrow"], "--let-projector", "linear")
    run_refused(*RESUMABLE, *let(teachers["wide"], 1, "--let-projector", "linear"), "--load", ckpt,
                files=[ckpt, teachers["wide"]], fragments=[
                    "--let-teacher", "(48 wide)", "(96 wide)", "checkpoint's setting", "--let-reset-projector"])


@pytest.mark.parametrize("flags,fragments", [
    (["--let-projector", "mlp"], ["--let-projector", "trained for linear", "asks for mlp"]),
    (["--let-projector", "interp"], ["--let-projector", "trained for linear", "asks for interp"]),
], ids=["linear_to_mlp", "linear_to_interp"])
def test_resume_with_another_projector_kind_is_refused(tmp_path, teachers, flags, fragments):
    ckpt = _checkpoint(tmp_path, teachers["narrow"], "--let-projector", "linear")
    run_refused(*RESUMABLE, *let(teachers["narrow"], 1, *flags), "--load", ckpt, files=[ckpt],
                fragments=[*fragments, "--let-reset-projector"])


def test_reset_projector_resumes_with_the_new_teacher_and_trains_it(tmp_path, teachers):
    ckpt = _checkpoint(tmp_path, teachers["narrow"], "--let-projector", "linear")
    saved = str(tmp_path / "resumed")
    proc = run(*RESUMABLE, *let(teachers["wide"], 1, "--let-projector", "linear"), "--load", ckpt,
               "--let-reset-projector", "--save", saved, "--save-interval", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded checkpoint" in proc.stdout and "iteration        4/" in proc.stdout
    assert "WARNING: LET settings differ from the checkpoint's: teacher" in proc.stdout
    weight = _saved_projector_weight(os.path.join(saved, "iter_0000004"))
    assert weight.shape == (96, 32)  # the new teacher's width ...
    from megatron_let.loss.projector import build_projector

    fresh = build_projector("linear", 32, 96, seed=1234).weight  # ... trained from a fresh projector
    assert not torch.equal(weight, fresh.detach())


def _saved_projector_weight(directory):
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(directory)
    stored = reader.read_metadata().state_dict_metadata
    key = next(k for k in stored if k.endswith("let_alignment.projector.weight") and "optimizer" not in k)
    state = {key: torch.empty(tuple(stored[key].size))}
    load(state, storage_reader=reader, no_dist=True)
    return state[key]


def test_interp_projector_follows_a_wider_teacher_on_resume(tmp_path, teachers):
    """No learned tensor depends on the width: a warning, and the new teacher is used (it used to crash)."""
    ckpt = _checkpoint(tmp_path, teachers["narrow"])
    proc = run(*RESUMABLE, *let(teachers["wide"]), "--load", ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: LET settings differ from the checkpoint's: teacher" in proc.stdout
    assert "of 96 dims" in proc.stdout and "iteration        4/" in proc.stdout


def test_target_layer_and_lambda_may_change_on_resume(tmp_path, teachers):
    ckpt = _checkpoint(tmp_path, teachers["narrow"], "--let-projector", "linear")
    proc = run(*RESUMABLE, *let(teachers["narrow"], 2, "--let-projector", "linear", "--let-lambda", 0.3),
               "--load", ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: LET settings differ from the checkpoint's: lambda0, target_layer" in proc.stdout
    assert "iteration        4/" in proc.stdout


def test_resume_rules_per_setting():
    """megatron_let/resume.py on its own: which changes the saved LET tensors can serve."""
    from megatron_let.config import LETConfig
    from megatron_let.errors import LETConfigError
    from megatron_let.resume import refuse_unusable_projector, refuse_unusable_width

    def saved(**config):
        return {"config": LETConfig(teacher="/old", target_layer=1, **config).to_dict(), "teacher_hidden_size": 48}

    mlp = saved(projector="mlp", projector_hidden_size=64)
    with pytest.raises(LETConfigError, match="--let-projector-hidden-size: .* trained for 64, .* asks for 128"):
        refuse_unusable_projector(mlp, LETConfig(teacher="/old", target_layer=1, projector="mlp",
                                                 projector_hidden_size=128))
    refuse_unusable_projector(mlp, LETConfig(teacher="/old", target_layer=3, projector="mlp", projector_hidden_size=64,
                                             lambda0=0.5, token_alignment="causal-span"))  # may change
    refuse_unusable_projector(mlp, LETConfig(teacher="/old", target_layer=1, projector="linear"),
                              reset_projector=True)
    refuse_unusable_width(saved(), LETConfig(teacher="/new", target_layer=1), 96)  # interp follows the teacher
    with pytest.raises(LETConfigError, match="--let-teacher-norm center statistics are for a 48-wide teacher"):
        refuse_unusable_width(saved(teacher_norm="center"),
                              LETConfig(teacher="/new", target_layer=1, teacher_norm="center"), 96, True)
    refuse_unusable_width(saved(projector="linear"), LETConfig(teacher="/new", target_layer=1, projector="linear"),
                          48)  # another teacher of the same width: the projector fits


def test_either_trainers_checkpoint_gives_its_let_state():
    """The lean trainer keeps LET state under 'let', Megatron-LM in its saved args.let_state: both are read."""
    import argparse

    from megatron_let.resume import saved_let_state

    state = {"config": {"teacher": "/t"}, "teacher_hidden_size": 48}
    assert saved_let_state({"let": state, "args": argparse.Namespace()}) == state
    assert saved_let_state({"args": argparse.Namespace(let_state=state)}) == state
    assert saved_let_state({"args": argparse.Namespace()}) == {} == saved_let_state(None)


# ------------------------------------------------------------------ 3. an adversarial user
def test_teacher_path_that_is_a_symlink_loop_is_refused(tmp_path, teachers):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # loop -> loop
    run_refused(*BASE, *let(str(loop)), fragments=["--let-teacher", "not a Hugging Face model directory"])
    inner = shutil.copytree(teachers["narrow"], tmp_path / "inner")  # a model directory whose weights loop
    os.remove(inner / "model.safetensors")
    os.symlink(inner / "model.safetensors", inner / "model.safetensors")
    run_refused(*BASE, *let(str(inner)), files=[inner],
                fragments=["--let-teacher", "weight file model.safetensors is unreadable or corrupt"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway; the unreadable case is checked "
                                                "through a config.json the reader cannot open as a file below")
def test_unreadable_teacher_is_refused(tmp_path, teachers):
    locked = shutil.copytree(teachers["narrow"], tmp_path / "locked")
    os.chmod(locked / "config.json", 0)
    try:
        run_refused(*BASE, *let(str(locked)), fragments=["--let-teacher", "cannot read its config"])
    finally:
        os.chmod(locked / "config.json", 0o644)


def test_teacher_config_that_cannot_be_read_as_a_file_is_refused(tmp_path, teachers):
    odd = shutil.copytree(teachers["narrow"], tmp_path / "odd")
    os.remove(odd / "config.json")
    os.mkdir(odd / "config.json")
    run_refused(*BASE, *let(str(odd)), files=[odd], fragments=["--let-teacher", "no config.json"])


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    tokenizer = bpe_tokenizer(TEXTS, 300, "alpha beta gamma")
    tokenizer.save_pretrained(root / "target")
    with_tokenizer = make_tiny_llama(str(root / "teacher"), vocab_size=len(tokenizer))
    tokenizer.save_pretrained(with_tokenizer)
    bare = make_tiny_llama(str(root / "bare"), vocab_size=len(tokenizer))  # weights and config, no tokenizer
    (root / "empty").mkdir()
    (root / "empty" / "README.md").write_text("the tokenizer files were not copied")
    return {name: str(root / name) for name in ("target", "teacher", "bare", "empty")}


def _hf_tokenizer(path):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path]


def test_target_tokenizer_directory_without_tokenizer_files_is_refused(tokenizer_dirs):
    run_refused(*BASE, *_hf_tokenizer(tokenizer_dirs["empty"]), *let(tokenizer_dirs["teacher"]),
                files=[tokenizer_dirs["empty"]],
                fragments=["--tokenizer-model", "cannot load a Hugging Face tokenizer", "save_pretrained"])


def test_teacher_tokenizer_directory_without_tokenizer_files_is_refused(tokenizer_dirs):
    """causal-span needs the teacher's tokenizer: the library's multi-line message arrives as one line."""
    run_refused(*BASE, *_hf_tokenizer(tokenizer_dirs["target"]), *let(tokenizer_dirs["teacher"]),
                "--let-token-alignment", "causal-span", "--let-teacher-tokenizer", tokenizer_dirs["empty"],
                files=[tokenizer_dirs["empty"]], fragments=["--let-teacher-tokenizer", "cannot load a tokenizer"])


def test_teacher_without_tokenizer_files_is_checked_by_size_and_says_so(tokenizer_dirs):
    proc = run(*BASE, "--train-iters", 1, *_hf_tokenizer(tokenizer_dirs["target"]), *let(tokenizer_dirs["bare"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: --let-teacher" in proc.stdout and "ships no tokenizer" in proc.stdout
    assert "only its size (" in proc.stdout and "not its tokens" in proc.stdout


def test_target_layer_inside_a_fully_recomputed_block_trains(teachers):
    """Full recompute runs layer k twice (megatron_let/loss/recompute.py counts it once): nothing to refuse.
    A layer in a virtual-pipeline chunk is covered by test_parallel_equivalence (pp2_vpp2_k_on_*)."""
    proc = run(*BASE, "--train-iters", 2, *let(teachers["narrow"], 2, "--let-stop-iter", 3),
               "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cos = [float(line.split("let cos:")[1].split("|")[0]) for line in proc.stdout.splitlines() if "let cos:" in line]
    assert len(cos) == 2 and all(abs(c) <= 1 for c in cos)


def test_megatron_lm_checkpoint_resumed_by_the_lean_trainer_is_checked_too(tmp_path, teachers):
    """Megatron-LM keeps the LET state in its saved args (args.let_state), not under 'let': the lean
    trainer reads it there, so the projector check holds across trainers (it used to be skipped)."""
    ckpt = _checkpoint(tmp_path, teachers["narrow"], "--let-projector", "linear")
    common_file = os.path.join(ckpt, "iter_0000001", "common.pt")
    common = torch.load(common_file, weights_only=False)
    common["args"].let_state = common.pop("let")  # as megatron_let/integrations/megatron_lm.py saves it
    torch.save(common, common_file)
    run_refused(*RESUMABLE, *let(teachers["wide"], 1, "--let-projector", "linear"), "--load", ckpt,
                files=[ckpt], fragments=["--let-teacher", "(48 wide)", "(96 wide)"])
    proc = run(*RESUMABLE, *let(teachers["narrow"], 1, "--let-projector", "linear"), "--load", ckpt)
    assert proc.returncode == 0 and "LET settings differ" not in proc.stdout, proc.stderr[-3000:]
    assert "iteration        4/" in proc.stdout


def _fill(directory, keep_free: int = 0):
    """Write a filler file until the filesystem is full (ENOSPC), then give ``keep_free`` bytes back."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, os.path.getsize(filler) - keep_free))
    return filler


def _small_tmpfs(path, size="8m"):
    os.makedirs(path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the RLIMIT_FSIZE case covers the rest")
    return str(path)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("fault", ["disk_full", "file_size_limit"])
def test_disk_full_during_save_keeps_the_last_checkpoint(tmp_path, teachers, fault):
    """A real write fault at the filesystem: a full tmpfs (ENOSPC), or RLIMIT_FSIZE (EFBIG) where mounting
    is not allowed. One line, exit 1, the partial files removed, the previous checkpoint byte-identical,
    and the job resumes from it once there is room."""
    ckpt = _small_tmpfs(tmp_path / "mnt") if fault == "disk_full" else str(tmp_path / "ckpt")
    try:
        common = [*RESUMABLE, *let(teachers["narrow"], 1), "--save", ckpt, "--save-interval", 2]
        first = run(*common, "--exit-interval", 2)
        assert first.returncode == 0, first.stderr[-3000:]
        before = tree_hash(os.path.join(ckpt, "iter_0000002"), os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
        filler = _fill(ckpt) if fault == "disk_full" else None
        proc = launch([*common, "--load", ckpt], lean=True, timeout=180,
                      preexec=_limit_file_size if fault == "file_size_limit" else None)
        line = assert_one_line_error(proc, "saving the checkpoint of iteration 4", f"--save {ckpt} failed",
                                     "bytes free on its disk", "iteration 2 is still the checkpoint that loads", code=1)
        print(line)  # torch's zip writer reports a failed write without its errno: the free space says why
        if fault == "disk_full":
            os.remove(filler)
        assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
        assert tree_hash(os.path.join(ckpt, "iter_0000002"),
                         os.path.join(ckpt, "latest_checkpointed_iteration.txt")) == before
        resumed = run(*common, "--load", ckpt)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "loaded checkpoint" in resumed.stdout and "iteration        3/" in resumed.stdout
        assert "saved checkpoint at iteration 4" in resumed.stdout
    finally:
        if fault == "disk_full":
            subprocess.run(["umount", ckpt], capture_output=True)
