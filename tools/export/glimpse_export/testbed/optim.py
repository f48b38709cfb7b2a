"""Testbed optimisation helpers: the learning-rate schedule, one optimizer step, the adaptive question-type
curriculum."""

from __future__ import annotations

import math

import numpy as np
import torch


def lr_at(step, total, base, warm=60):
    """Linear warm-up, then cosine decay to 5% of ``base``."""
    if step < warm:
        return base * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_step(opt, loss, params, lr: float | None = None) -> None:
    """Set every group's learning rate to ``lr`` (None: keep the groups' own), backward, clip at 1, step."""
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def update_type_weights(err: np.ndarray, ok_t: np.ndarray, n_t: np.ndarray) -> np.ndarray:
    """Adaptive curriculum: update the running error per question type (in place) from this step's counts and return
    the sampling weights (0.15 + running error)."""
    seen = n_t > 0
    err[seen] = 0.95 * err[seen] + 0.05 * (1 - ok_t[seen] / n_t[seen])
    return 0.15 + err
