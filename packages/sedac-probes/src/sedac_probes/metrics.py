"""Held-out metrics (no scipy) and the by-window train / held-out split that training and fusion share."""

from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np
import torch

from sedac_monitor.api import InputError


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def r2(pred: Any, target: Any) -> float:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    ss = float(((target - target.mean()) ** 2).sum())
    return 1.0 - float(((target - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def auroc(score: Any, positive: Any) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney)."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(score) + 1.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def split_window_ids(n_windows: int, val_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train window ids, held-out window ids) from a seeded permutation."""
    if not (0.0 < val_fraction < 1.0):
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if n_windows < 2:
        raise InputError("training needs at least 2 collected windows (one for the held-out split)")
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, min(n_windows - 1, round(n_windows * val_fraction)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def window_rows(window_ids: torch.Tensor, per_window: int, keep: torch.Tensor) -> torch.Tensor:
    """The rows (tokens) of the given windows in collected data, those ``keep`` marks."""
    rows = (window_ids[:, None] * per_window + torch.arange(per_window)[None, :]).reshape(-1)
    return rows[keep[rows]]
