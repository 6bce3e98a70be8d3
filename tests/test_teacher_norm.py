"""--let-teacher-norm: the statistics are the teacher's own, the same in every layout (TP+SP, PP, VPP, DP),
survive a resume bit for bit, and nothing of it runs after the stop step."""

import gc

import pytest
import torch

from megatron_let import LateToEarlyTraining, LETConfig
from megatron_let.loss.teacher_norm import TeacherFeatureNorm, feature_energy_report
from let_testing import (LEAN_LAYOUTS as LAYOUTS, assert_same_logs, lean_let_flags as let_flags, make_tiny_llama,
                         tiny_transformer_config, train_lean as train)

NORM = {"--let-teacher-norm": "standardize", "--let-teacher-norm-iters": 3}


def test_energy_report_names_the_top_dimensions():
    x = torch.ones(4, 2, 32)
    x[..., 5] = 10.0  # one massive dimension: 100 of 131 per token
    report = feature_energy_report(x, torch.ones(4, 2))
    assert report == "top 1 / top 16 of 32 dims hold 76% / 88% of the energy, the mean state 100%"
    x[::2] *= -1  # every other token flipped: the same energy, none of it constant over tokens
    assert feature_energy_report(x, torch.ones(4, 2)).endswith("88% of the energy, the mean state 0%")
    assert feature_energy_report(x, torch.zeros(4, 2)).startswith("top 1 / top 16 of 32 dims hold 0%")


def test_standardize_keeps_float64_statistics_through_bf16_casts():
    norm = TeacherFeatureNorm("standardize", 8).bfloat16()  # what Float16Module does to the chunk
    assert {b.dtype for b in norm.buffers()} == {torch.float64}
    assert list(dict(norm.state_dict())) == ["token_count", "feature_sum", "feature_sq_sum"]
    assert list(TeacherFeatureNorm("none", 8).state_dict()) == []  # nothing saved without standardize


def test_layernorm_normalises_each_token_and_keeps_no_state():
    x = torch.randn(5, 3, 16) * torch.linspace(0.1, 30, 16) + 4
    y = TeacherFeatureNorm("layernorm", 16)(x, torch.ones(5, 3))
    torch.testing.assert_close(y.mean(-1), torch.zeros(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5, 3), atol=1e-3, rtol=0)
    assert TeacherFeatureNorm("none", 16)(x, torch.ones(5, 3)) is x


def test_center_subtracts_the_teachers_mean_and_keeps_each_dimensions_scale():
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 30, 16)
    first, second = (torch.randn(5, 3, 16, generator=gen) * scales + 4 for _ in range(2))
    mask = torch.ones(5, 3)
    mask[0, 0] = 0  # a masked token is not counted
    norm = TeacherFeatureNorm("center", 16, estimate_iters=1)
    assert list(dict(norm.state_dict())) == ["token_count", "feature_sum", "feature_sq_sum"]
    norm.begin_iteration(0)
    assert norm(first, mask) is None  # the first iteration only measures
    norm.begin_iteration(1)
    mean = first.reshape(-1, 16)[mask.reshape(-1) > 0].double().mean(0).float()
    torch.testing.assert_close(norm(second, mask), second - mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm._mean, mean, rtol=1e-6, atol=1e-6)
    assert norm.token_count.item() == 14  # frozen after --let-teacher-norm-iters 1: iteration 1 added nothing


def _run(model, let, iteration, tokens, mask):
    let.begin_iteration(iteration, 1)
    let.set_microbatch(tokens, mask)
    model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=tokens).sum().backward()
    return let.report()


def test_standardize_uses_the_teachers_own_statistics_then_freezes_and_stops(megatron_world1, tiny_teacher):
    from megatron_let.training.model import build_gpt_chunks

    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=0.3, stop_iter=4,
                                        teacher_norm="standardize", teacher_norm_iters=2))
    (model,) = build_gpt_chunks(tiny_transformer_config(), 128, 16, let=let)
    norm, layer = model.let_alignment.teacher_norm, model.decoder.layers[0]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (2, 16), generator=gen), (torch.rand(2, 16, generator=gen) > 0.2).float())
               for _ in range(5)]
    first = _run(model, let, 0, *batches[0])
    assert "let loss" not in first  # the first iteration only measures the teacher
    # the sums are exactly the teacher's masked states of iteration 0
    states = let.teacher.hidden_states(batches[0][0]).double()  # [s, b, h]
    mask = batches[0][1].transpose(0, 1).double().unsqueeze(-1)
    assert norm.token_count.item() == batches[0][1].sum().item()
    torch.testing.assert_close(norm.feature_sum, (states * mask).sum((0, 1)), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(norm.feature_sq_sum, (states * states * mask).sum((0, 1)), rtol=1e-12, atol=1e-9)
    second = _run(model, let, 1, *batches[1])
    assert second["let loss"] > 0  # standardised states: aligned from iteration 1 on
    frozen = {k: v.clone() for k, v in norm.state_dict().items()}
    assert frozen["token_count"].item() == batches[0][1].sum().item() + batches[1][1].sum().item()
    _run(model, let, 2, *batches[2])  # iteration 2 >= --let-teacher-norm-iters 2: frozen
    assert all(torch.equal(frozen[k], v) for k, v in norm.state_dict().items())
    # the statistics used are the per-dimension mean / std of those tokens: standardised states have mean 0
    two = torch.cat([let.teacher.hidden_states(b[0]).reshape(-1, 48)[b[1].transpose(0, 1).reshape(-1) > 0]
                     for b in batches[:2]])
    z = norm(let.teacher.hidden_states(batches[0][0]), batches[0][1].transpose(0, 1))
    torch.testing.assert_close(norm._mean, two.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.std(), torch.tensor(1.0), rtol=0.3, atol=0)
    _run(model, let, 3, *batches[3])
    let.begin_iteration(4, 1)  # the stop step: hook gone, teacher freed, statistics never touched again
    gc.collect()
    assert let.finished and let._teacher is None and len(layer._forward_hooks) == 0
    calls = []
    original = TeacherFeatureNorm.forward
    TeacherFeatureNorm.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        _run(model, let, 4, *batches[4])
    finally:
        TeacherFeatureNorm.forward = original
    assert calls == [] and all(torch.equal(frozen[k], v) for k, v in norm.state_dict().items())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("t") / "teacher"), vocab_size=256)


@pytest.mark.parametrize("mode", ["standardize", "center"])
def test_resume_mid_estimation_is_exact(tmp_path, teacher, mode):
    """2N straight == N + --load + N, the checkpoint written while the statistics are still being summed."""
    common = ["--train-iters", 6, "--hidden-dropout", 0.1,
              *let_flags(teacher, **{"--let-stop-iter": 5, **NORM, "--let-teacher-norm": mode,
                                     "--let-teacher-norm-iters": 4})]
    straight = train(1, *common)
    ckpt = str(tmp_path / "ckpt")
    first = train(1, *common, "--save", ckpt, "--save-interval", 3, "--exit-interval", 3)
    second = train(1, *common, "--load", ckpt)
    assert "let loss" not in straight[1] and all("let loss" in straight[i] for i in (2, 3, 4, 5))
    for it, ref in straight.items():
        resumed = (first if it <= 3 else second)[it]
        assert {k: v for k, v in resumed.items() if k != "elapsed time per iteration (ms)"} == \
            {k: v for k, v in ref.items() if k != "elapsed time per iteration (ms)"}, f"iteration {it}"


@pytest.fixture(scope="module")
def after_first_iteration(request, tmp_path_factory, teacher):
    """TP1 checkpoint after iteration 1 (statistics of iteration 0 in it); every layout sums iterations
    1 and 2 in its own way (DP and SP ranks hold different tokens) and must end with the same numbers."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "it1")
    flags = ["--train-iters", 5, "--hidden-dropout", 0,
             *let_flags(teacher, **{**NORM, "--let-teacher-norm": request.param})]
    train(1, *flags, "--save", ckpt, "--save-interval", 1, "--exit-interval", 1)
    reference = train(1, *flags, "--load", ckpt)
    assert all("let loss" in reference[i] for i in (2, 3, 4))
    return ckpt, flags, reference


# standardize in every layout; center sums the same statistics (only its local use differs), so two suffice
NORM_LAYOUTS = [("standardize", name) for name in LAYOUTS] + [("center", "tp2_sp"), ("center", "pp2_vpp")]


@pytest.mark.parametrize("after_first_iteration,layout", [(mode, LAYOUTS[name]) for mode, name in NORM_LAYOUTS],
                         ids=[f"{mode}-{name}" for mode, name in NORM_LAYOUTS], indirect=["after_first_iteration"])
def test_estimated_norm_is_the_same_in_every_layout(after_first_iteration, layout):
    ckpt, flags, reference = after_first_iteration
    got = train(2, *flags, "--load", ckpt, *layout)
    assert_same_logs(got, reference)
