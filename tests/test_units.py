"""Pure pieces: schedule, config validation and flags, CP/SP slicing, projectors, teacher output."""

import argparse
import math

import pytest
import torch

from megatron_let.config import LETConfigError, add_let_args, let_config_from_args
from megatron_let.loss.parallel import cp_shard, cp_unshard, sp_shard
from megatron_let.loss.projector import build_projector
from megatron_let.weight.schedule import let_lambda


def test_linear_schedule_is_the_papers():
    assert let_lambda(0, 0.1, 100) == pytest.approx(0.1)
    assert let_lambda(50, 0.1, 100) == pytest.approx(0.05)
    assert let_lambda(99, 0.1, 100) == pytest.approx(0.001)
    assert let_lambda(100, 0.1, 100) == 0.0 and let_lambda(10**6, 0.1, 100) == 0.0


def test_constant_and_cosine_schedules():
    assert let_lambda(99, 0.3, 100, "constant") == 0.3 and let_lambda(100, 0.3, 100, "constant") == 0.0
    assert let_lambda(50, 0.2, 100, "cosine") == pytest.approx(0.1)
    values = [let_lambda(s, 1.0, 100, "cosine") for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == 0.0


def _parse(*flags):
    parser = add_let_args(argparse.ArgumentParser())
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--train-iters", type=int, default=1000)
    return parser.parse_args(list(flags))


def test_flags_build_a_validated_config():
    config = let_config_from_args(_parse("--let-teacher", "/t", "--let-target-layer", "4", "--let-lambda", "0.3",
                                         "--let-stop-fraction", "0.5", "--let-projector", "mlp"))
    assert (config.teacher, config.target_layer, config.lambda0, config.projector) == ("/t", 4, 0.3, "mlp")
    assert config.resolve_stop_iter(1000) == 500
    assert let_config_from_args(_parse()) is None


@pytest.mark.parametrize("flags,message", [
    (["--let-target-layer", "4"], "--let-target-layer given without --let-teacher"),
    (["--let-teacher", "/t"], "--let-teacher needs --let-target-layer"),
    (["--let-teacher", "/t", "--let-target-layer", "0"], "--let-target-layer must be a layer number >= 1"),
    (["--let-teacher", "/t", "--let-target-layer", "25"], "beyond the model's --num-layers 24"),
    (["--let-teacher", "/t", "--let-target-layer", "4", "--let-lambda", "-1"], "--let-lambda must be"),
    (["--let-teacher", "/t", "--let-target-layer", "4", "--let-lambda", "nan"], "--let-lambda must be"),
    (["--let-teacher", "/t", "--let-target-layer", "4", "--let-stop-iter", "0"], "--let-stop-iter must be > 0"),
    (["--let-teacher", "/t", "--let-target-layer", "4", "--let-stop-iter", "5", "--let-stop-fraction", "0.1"],
     "give one of --let-stop-iter, --let-stop-samples, --let-stop-fraction"),
])
def test_bad_flags_are_refused_with_the_flag_named(flags, message):
    with pytest.raises(LETConfigError, match=message.replace("(", r"\(")):
        let_config_from_args(_parse(*flags))


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_shard_matches_megatron_layout(megatron_world1, cp_size, monkeypatch):
    import torch.distributed as dist

    from megatron_let.megatron_versions import batch_on_this_cp_rank

    class FakeGroup:  # only its size and this rank's index are read
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return cp_size

        def rank(self):
            return self._rank

    # megatron-core 0.19 asks torch.distributed for them (0.16 asks the group): answer for the stand-in group
    for name, method in (("get_world_size", "size"), ("get_rank", "rank")):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda group=None, _real=real, _method=method:
                            getattr(group, _method)() if isinstance(group, FakeGroup) else _real(group))

    tokens = torch.arange(3 * 8 * cp_size).view(3, 8 * cp_size)
    parts = []
    for rank in range(cp_size):
        expected = batch_on_this_cp_rank({"tokens": tokens.clone()}, cp_group=FakeGroup(rank))["tokens"]
        assert torch.equal(cp_shard(tokens, cp_size, rank, seq_dim=1), expected)
        hidden = tokens.t().unsqueeze(-1).float()  # [s, b, 1]: the teacher output layout
        assert torch.equal(cp_shard(hidden, cp_size, rank, seq_dim=0)[..., 0].t(), expected)
        parts.append(expected)
    assert torch.equal(cp_unshard(parts, seq_dim=1), tokens)


def test_sp_shard_slices_sequence_and_rejects_indivisible():
    full = torch.arange(8).view(8, 1, 1)
    assert sp_shard(full, 2, 1).flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="not divisible"):
        sp_shard(torch.zeros(7, 1, 1), 2, 0)


def test_interp_projector_is_parameter_free_and_keeps_endpoints():
    projector = build_projector("interp", target_size=10, teacher_size=4)
    teacher = torch.randn(3, 2, 4)
    out = projector(teacher)
    assert out.shape == (3, 2, 10) and not list(projector.parameters())
    assert torch.allclose(out[..., 0], teacher[..., 0]) and torch.allclose(out[..., -1], teacher[..., -1])
    assert projector.projects_teacher
    assert build_projector("interp", 4, 4)(teacher) is teacher


def test_learned_projectors_are_seeded_privately():
    state = torch.random.get_rng_state()
    a, b = build_projector("mlp", 8, 6, seed=3), build_projector("mlp", 8, 6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert build_projector("linear", 8, 6)(torch.randn(5, 8)).shape == (5, 6)
    assert len(list(a.parameters())) == 6 and not a.projects_teacher


def test_teacher_hidden_states_match_hf_output(tiny_teacher):
    from transformers import AutoModelForCausalLM

    from megatron_let.teachers.huggingface import HFTeacher

    tokens = torch.randint(0, 128, (2, 12))
    states = HFTeacher(tiny_teacher).hidden_states(tokens)
    reference = AutoModelForCausalLM.from_pretrained(tiny_teacher)(tokens, output_hidden_states=True)
    assert states.shape == (12, 2, 48)
    torch.testing.assert_close(states, reference.hidden_states[-1].transpose(0, 1))
    middle = HFTeacher(tiny_teacher, layer=1).hidden_states(tokens)
    torch.testing.assert_close(middle, reference.hidden_states[1].transpose(0, 1))
    assert math.isfinite(states.sum().item())


def test_resume_reads_the_let_state_of_the_checkpoint_megatron_lm_loads(tmp_path, monkeypatch):
    """Megatron-LM resumes from the tracker's latest iteration, or from ``--ckpt-step N``: LET's saved state (stop
    step, settings, auto-lambda EMA) must come from that same checkpoint directory, not from the newest one. (The
    reader of the common state is megatron-core's, replaced here by one that names the directory it was given: the
    iteration choice is what is tested; reading real checkpoints: tests/test_megatron_lm.py.)"""
    import argparse
    import os

    from megatron.core import dist_checkpointing

    from megatron_let.resume import read_saved_let_state as _saved_let_state

    for iteration in (2, 4):
        (tmp_path / f"iter_{iteration:07d}").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict",
                        lambda directory: {"let": {"read": os.path.basename(directory)}})

    def saved(**overrides):
        return _saved_let_state(argparse.Namespace(**{"load": str(tmp_path), "finetune": False, "ckpt_step": None,
                                                      **overrides}))

    assert saved() == ({"read": "iter_0000004"}, 4)
    assert saved(ckpt_step=2) == ({"read": "iter_0000002"}, 2)
    assert saved(finetune=True) == ({}, None)
