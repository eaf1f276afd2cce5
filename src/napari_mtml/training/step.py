"""One optimiser step, as the fold loop and the time budget's measurement take it."""

from __future__ import annotations

import torch

__all__ = ["train_step"]


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: torch.dtype | None,
) -> torch.Tensor:
    """The forward pass (under autocast to `amp` when it is a dtype, else in float32), the MSE
    against the soft labels (in float32), backward and the optimiser's step.

    Parameters
    ----------
    net : the model (or its DistributedDataParallel wrapper), in training mode.
    optimizer : the optimiser of its parameters.
    images, labels : float32 tensors `(B, 1, *frame)` on the model's device.
    amp : `torch.bfloat16`, `torch.float16` or None (`napari_mtml.devices.autocast_dtype`).

    Returns
    -------
    torch.Tensor
        The batch's loss, 0-d, not yet synchronised with the host.
    """
    with torch.autocast(images.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        pred = net(images)
    loss = torch.nn.functional.mse_loss(pred.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
