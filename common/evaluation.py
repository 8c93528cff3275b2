"""Loss and accuracy of a model on a labelled tensor set (used by the server's global test and by each site)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; (nan, nan) on an empty set."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / len(labels), correct / len(labels)
