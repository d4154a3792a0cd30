"""Knowledge distillation: trained classifiers as one teacher (the mean of their logits) and the
loss that mixes the teacher's soft targets with the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normserve.models.training.run_folder import load_run


class LogitEnsemble(nn.Module):
    """The mean of several classifiers' logits (the teacher of a distillation run)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_teacher(run_dirs: list[str], num_classes: int) -> LogitEnsemble:
    """The trained classifiers in `run_dirs` (what `train` writes: config.json + weights.safetensors), frozen."""
    members = []
    for d in run_dirs:
        spec, model = load_run(d)
        classes = getattr(spec.config, "num_classes", None)
        if spec.kind != "gncnn" or classes != num_classes:
            raise ValueError(f"teacher {d} is a {spec.kind} with {classes} classes; the data has {num_classes}")
        members.append(model)
    return LogitEnsemble(members).eval().requires_grad_(False)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float, smoothing: float
) -> torch.Tensor:
    """(1 - alpha) · cross-entropy with the labels + alpha · T² · KL(teacher ‖ student) at temperature T."""
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1),
        F.log_softmax(teacher / temperature, 1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(student, y, label_smoothing=smoothing)
    return (1 - alpha) * ce + alpha * temperature**2 * kl
