"""The LET gradient injected through the autoscaler equals the gradient of the summed losses
written out by hand, with several micro-batches, a loss scale, and in per-token-loss mode."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func

from let_testing import padded_microbatches, tiny_transformer_config
from megatron_let import LateToEarlyTraining, LETConfig
from megatron_let.training.model import build_gpt_chunks
from megatron_let.training.step import forward_step

VOCAB, SEQ, MBS, M, LAMBDA, LOSS_SCALE = 128, 16, 2, 3, 0.7, 4.0


def _microbatches():
    return padded_microbatches(M, 7, VOCAB, SEQ, MBS)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("projector", ["linear", "interp"])
def test_let_gradient_equals_hand_summed_losses(megatron_world1, tiny_teacher, per_token, projector):
    config = tiny_transformer_config(calculate_per_token_loss=per_token)
    let = LateToEarlyTraining(LETConfig(teacher=tiny_teacher, target_layer=1, lambda0=LAMBDA,
                                        stop_iter=10, projector=projector))
    (model,) = build_gpt_chunks(config, VOCAB, SEQ, let=let)
    config.grad_scale_func = lambda loss: loss * LOSS_SCALE

    # Megatron's schedule with the LET hook and autoscaler.
    let.begin_iteration(0, M)
    get_forward_backward_func()(forward_step_func=lambda it, m: forward_step(it, m, let=let),
                                data_iterator=_microbatches(), model=[model], num_microbatches=M,
                                seq_length=SEQ, micro_batch_size=MBS)
    scheduled = _grads(model)
    model.zero_grad(set_to_none=True)

    # The same losses summed by hand, LET hook silenced.
    let.current_lambda = 0.0
    captured = {}
    handle = model.decoder.layers[0].register_forward_hook(lambda mod, a, out: captured.update(h=out[0]))
    total = 0.0
    for batch in _microbatches():
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"]
        teacher = let.teacher.hidden_states(batch["tokens"]).float()
        student = captured["h"].float()
        projector_module = model.let_alignment.projector
        if projector == "interp":
            teacher = projector_module(teacher)
        else:
            student = projector_module(student)
        one_minus_cos = (1 - F.cosine_similarity(student, teacher, dim=-1)) * mask.t()
        if per_token:
            total = total + (losses * mask).sum() + LAMBDA * one_minus_cos.sum()
        else:
            total = total + ((losses * mask).sum() + LAMBDA * one_minus_cos.sum()) / mask.sum() / M
    handle.remove()
    (total * LOSS_SCALE).backward()
    by_hand = _grads(model)

    assert scheduled.keys() == by_hand.keys()
    if projector == "linear":
        assert any("let_alignment" in name for name in by_hand)
    for name in by_hand:
        scale = by_hand[name].abs().max().item()
        torch.testing.assert_close(scheduled[name], by_hand[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
