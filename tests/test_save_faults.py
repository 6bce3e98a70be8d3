"""A checkpoint save that fails inside Megatron-LM's loop ends with the one line docs/reliability.md promises.

Real faults, not mocked exceptions: a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes get EFBIG)
and a read-only filesystem (a tmpfs remounted read-only: root writes through chmod). A run saves iteration 2,
the next one fails saving iteration 4: exit 1, one error line naming --save, the iteration and the checkpoint
that still loads, no traceback, iteration 2 byte-identical, the tracker still 2, no partial iter_0000004 left,
and a resume with --load trains from iteration 2 to the end. The lean trainer's own case is
tests/test_refusals.py::test_disk_full_during_save_keeps_the_last_checkpoint.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from let_testing import (MEGATRON_LM_BODY, MEGATRON_LM_MODEL as MODEL_ARGS, NEEDS_MEGATRON_LM, ROOT, free_port,
                         make_tiny_llama, megatron_lm_source, one_line_error, tree_hash)

pytestmark = pytest.mark.skipif(megatron_lm_source() is None, reason=NEEDS_MEGATRON_LM)

TRACKER = "latest_checkpointed_iteration.txt"
SAVES = ["--train-iters", 4, "--save-interval", 2]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def _run(script, args, preexec=None, world_size=1, timeout=240):
    """``script`` as ``world_size`` plain processes with torchrun's environment (no torchrun: it would SIGTERM
    the other ranks as soon as rank 0 exits, hiding whether each rank ended on its own). Rank 0's result, after
    checking that every rank ended by itself within ``timeout``, with rank 0's exit code and no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT,
               TORCHDYNAMO_DISABLE="1")  # inductor's g++ would hit the file-size limit first
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    procs = [subprocess.Popen(command, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
             for r in range(world_size)]  # pipes, not files: the file-size limit would cut a log file
    try:
        with ThreadPoolExecutor(world_size) as pool:  # every rank's pipes drained at once
            outputs = [f.result() for f in [pool.submit(p.communicate, timeout=timeout) for p in procs]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a hung rank: the test fails on the timeout and leaves nothing running
    results = [subprocess.CompletedProcess(command, p.returncode, *out) for p, out in zip(procs, outputs)]
    assert len({r.returncode for r in results}) == 1, [(r.returncode, r.stderr[-2000:]) for r in results]
    assert not any("Traceback" in r.stderr for r in results), [r.stderr[-3000:] for r in results]
    return results[0]


@pytest.fixture(scope="module")
def gpt_args(tmp_path_factory):
    """Megatron-LM's GPT with LET on (the save wrapper is active either way)."""
    teacher = make_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"))
    return [*MODEL_ARGS, "--let-teacher", teacher, "--let-target-layer", 3, "--let-lambda", 0.5,
            "--let-stop-iter", 100, "--let-projector", "linear"]


@pytest.fixture(scope="module")
def saved_at_2(gpt_args, tmp_path_factory):
    """A --save directory whose tracker names iteration 2 (copied by each test)."""
    ckpt = str(tmp_path_factory.mktemp("first") / "ckpt")
    proc = _run("pretrain_gpt_let.py", [*gpt_args, *SAVES, "--save", ckpt, "--exit-interval", 2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", TRACKER]
    return ckpt


def _snapshot(ckpt):
    return tree_hash(os.path.join(ckpt, "iter_0000002"), os.path.join(ckpt, TRACKER))


def _failed_at_4(proc, ckpt, before, *fragments, program="pretrain_gpt_let.py"):
    """The promised line, and the data side: iteration 2 untouched, the tracker still 2, nothing partial left."""
    line = one_line_error(proc, f"{program}: error: saving the checkpoint of iteration 4 to --save {ckpt} failed",
                          "iteration 2 is still the checkpoint that loads",
                          f"Free space or fix the error, then resume with --load {ckpt}.", *fragments, code=1)
    print(line)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", TRACKER]
    assert open(os.path.join(ckpt, TRACKER)).read().strip() == "2"
    assert _snapshot(ckpt) == before
    return line


def _resumes_from_2(args, ckpt, script="pretrain_gpt_let.py"):
    proc = _run(script, [*args, *SAVES, "--save", ckpt, "--load", ckpt])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration        3/       4" in proc.stdout and "iteration        1/" not in proc.stdout
    assert "successfully saved checkpoint from iteration       4" in proc.stdout
    assert open(os.path.join(ckpt, TRACKER)).read().strip() == "4"


def test_file_size_limit_during_save(gpt_args, saved_at_2, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved_at_2, ckpt)
    before = _snapshot(ckpt)
    proc = _run("pretrain_gpt_let.py", [*gpt_args, *SAVES, "--save", ckpt, "--load", ckpt], preexec=_limit_file_size)
    assert "iteration        4/       4" in proc.stdout  # it trained, then failed at the save
    _failed_at_4(proc, ckpt, before, "(OSError: [Errno 27] File too large;", "bytes free on its disk",
                 f"its partial files were removed ({ckpt}/iter_0000004)")
    _resumes_from_2(gpt_args, ckpt)


def test_every_rank_gets_the_failure(gpt_args, saved_at_2, tmp_path):
    """Two data-parallel ranks both hit the limit: torch.distributed.checkpoint broadcasts the failure, so each
    rank raises, exits 1 on its own (checked by _run) and none hangs; rank 0 alone prints the line."""
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved_at_2, ckpt)
    before = _snapshot(ckpt)
    proc = _run("pretrain_gpt_let.py", [*gpt_args, *SAVES, "--save", ckpt, "--load", ckpt, "--no-load-rng"],
                preexec=_limit_file_size, world_size=2)
    _failed_at_4(proc, ckpt, before, "[Errno 27] File too large")


@pytest.fixture
def read_only_mount(tmp_path):
    """A directory whose writes fail with EROFS (root) or EACCES (chmod, for other users); yields a function that
    makes it read-only and one that makes it writable again."""
    path = str(tmp_path / "mnt")
    os.makedirs(path)
    if os.geteuid() != 0:
        yield path, lambda: os.chmod(path, 0o555), lambda: os.chmod(path, 0o755)
        os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path], capture_output=True).returncode:
        pytest.skip("a read-only --save as root needs a tmpfs remounted read-only (chmod does not stop root's "
                    "writes), and mounting needs CAP_SYS_ADMIN; the file-size-limit tests cover the rest")

    def remount(mode):
        subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True, capture_output=True)

    try:
        yield path, lambda: remount("ro"), lambda: remount("rw")
    finally:
        subprocess.run(["umount", path], capture_output=True)


def test_read_only_save_directory(gpt_args, saved_at_2, read_only_mount):
    """Two ranks: rank 0 fails creating iter_0000004 before any collective of the save; rank 1, waiting in one,
    fails when rank 0 leaves, and ends with exit 1 too (no hang, no traceback)."""
    directory, make_read_only, make_writable = read_only_mount
    ckpt = os.path.join(directory, "ckpt")
    shutil.copytree(saved_at_2, ckpt)
    before = _snapshot(ckpt)
    make_read_only()
    try:
        proc = _run("pretrain_gpt_let.py", [*gpt_args, *SAVES, "--save", ckpt, "--load", ckpt, "--no-load-rng"],
                    world_size=2)
    finally:
        make_writable()
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    _failed_at_4(proc, ckpt, before, reason, "it left no partial files")
    _resumes_from_2(gpt_args, ckpt)


HYBRID = ["--hybrid-layer-pattern", "*-*-"]


def test_file_size_limit_during_save_hybrid(tmp_path):
    """pretrain_hybrid_let.py runs the same loop and the same wrapper (no LET here: it protects every run)."""
    pytest.importorskip("megatron.core.models.hybrid", reason="HybridModel needs megatron-core >= 0.19 (Python 3.12)")
    args = [*MEGATRON_LM_BODY, *HYBRID]  # no --num-layers: the pattern sets the depth
    ckpt = str(tmp_path / "ckpt")
    first = _run("pretrain_hybrid_let.py", [*args, *SAVES, "--save", ckpt, "--exit-interval", 2])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _snapshot(ckpt)
    proc = _run("pretrain_hybrid_let.py", [*args, *SAVES, "--save", ckpt, "--load", ckpt], preexec=_limit_file_size)
    _failed_at_4(proc, ckpt, before, "[Errno 27] File too large", program="pretrain_hybrid_let.py")
