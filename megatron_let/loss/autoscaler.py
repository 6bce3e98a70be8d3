"""Inject an auxiliary loss's gradient through an activation (megatron-core's MoE/MTP pattern)."""

import torch


class LETLossAutoScaler(torch.autograd.Function):
    """Identity on ``activation``; its backward also starts ``aux_loss``'s backward with ``scale``.

    This lets a loss computed on any pipeline stage join the schedule's single
    backward pass without touching the schedule. ``scale`` plays the role the
    schedule gives the LM loss: grad scaler, 1/num_microbatches, CP size.
    """

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None


class MeasuredLETLossAutoScaler(torch.autograd.Function):
    """:class:`LETLossAutoScaler` that also hands ``grad_output`` -- the gradient arriving at the activation
    from everything above it, i.e. without the aux loss's own -- to ``probe`` (``--let-lambda auto``)."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor, probe):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        ctx.probe = probe
        return activation

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        ctx.probe(grad_output)
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None, None


def aux_loss_scale(config, num_microbatches: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """The factor megatron-core's schedule applies to an aux loss for one micro-batch.

    Mirrors ``forward_step_calc_loss`` for MoE aux losses: the optimizer's loss
    scale (``config.grad_scale_func``), and unless per-token loss is on,
    ``cp_size / num_microbatches`` (DDP averages gradients over DP x CP).
    """
    scale = torch.ones(1, device=device)
    if getattr(config, "grad_scale_func", None) is not None:
        scale = config.grad_scale_func(scale)
    if not getattr(config, "calculate_per_token_loss", False):
        scale = scale * (cp_size / num_microbatches)
    return scale.reshape(())
