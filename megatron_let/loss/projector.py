"""Projectors that bring target and teacher hidden states to a common width, and the loss."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class InterpolationProjector(nn.Module):
    """Parameter-free: linearly interpolates the *teacher* vector to the target width."""

    projects_teacher = True

    def __init__(self, target_size: int, teacher_size: int):
        super().__init__()
        self.target_size = target_size
        self.teacher_size = teacher_size

    def forward(self, teacher_hidden: torch.Tensor) -> torch.Tensor:
        if self.teacher_size == self.target_size:
            return teacher_hidden
        flat = teacher_hidden.reshape(-1, 1, self.teacher_size)
        out = F.interpolate(flat, size=self.target_size, mode="linear", align_corners=True)
        return out.reshape(*teacher_hidden.shape[:-1], self.target_size)


class LinearProjector(nn.Linear):
    """Learned map from the target width to the teacher width (trains with the target)."""

    projects_teacher = False

    def __init__(self, target_size: int, teacher_size: int):
        super().__init__(target_size, teacher_size, bias=True)


class MLPProjector(nn.Sequential):
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear on the target side."""

    projects_teacher = False

    def __init__(self, target_size: int, teacher_size: int, hidden_size: Optional[int] = None):
        hidden_size = hidden_size or target_size
        super().__init__(
            nn.Linear(target_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, teacher_size),
        )


def build_projector(kind: str, target_size: int, teacher_size: int,
                    hidden_size: Optional[int] = None, seed: int = 0) -> nn.Module:
    """Build a projector with weights drawn from a private generator.

    A private generator keeps the global RNG stream (and so the target's own
    initialisation and dropout) identical with and without LET.
    """
    if kind == "interp":
        return InterpolationProjector(target_size, teacher_size)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global stream
        if kind == "linear":
            projector = LinearProjector(target_size, teacher_size)
        elif kind == "mlp":
            projector = MLPProjector(target_size, teacher_size, hidden_size)
        else:
            raise ValueError(f"unknown projector {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in projector.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features ** 0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()
    return projector


def cosine_alignment_terms(target_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                           projector: nn.Module, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(1 - cos) * mask`` summed (with grad) and ``cos * mask`` summed (no grad), in fp32.

    ``target_hidden``: [s, b, h_M]; ``teacher_hidden``: [s, b, h_T]; ``mask``: [s, b].
    """
    student = target_hidden.float()
    teacher = teacher_hidden.float()
    if projector.projects_teacher:
        teacher = projector(teacher)
    else:  # learned projectors follow the model's param dtype (bf16 under Float16Module)
        weight_dtype = next(projector.parameters()).dtype
        student = projector(target_hidden.to(weight_dtype)).float()
    cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    mask = mask.to(cos.dtype)
    return ((1.0 - cos) * mask).sum(), (cos.detach() * mask).sum()
