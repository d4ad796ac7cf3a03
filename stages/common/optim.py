"""Optimiser pieces shared by the Stage 1 and Stage 2 training steps (plain PyTorch)."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_ratio` x the base
    rate at `total_steps` (held there after). One factor for every parameter group, so a group
    with its own base rate (RSCA's alphas) keeps its ratio to the others."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(warmup_steps + 1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimisation_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, parameters,
                      grad_clip: float) -> float:
    """Backward, clip the gradient norm to `grad_clip` (0: no clipping), step the optimiser and
    its schedule; the learning rate the step used."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return float(lr)
