"""Speculative decoding with SEDAC's early exits as the draft, measured on the bundled model.

Self-speculative decoding (Leviathan et al., 2023) drafts ``gamma`` tokens with a cheap model and
verifies them with the full one in a single pass; with per-token acceptance ``alpha`` and a draft that
costs ``c`` of a full forward, the expected speed-up of greedy decoding is

    (1 - alpha^(gamma + 1)) / ((1 - alpha) * (gamma * c + 1)).

Here the draft is the model itself with the MLPs after an exit layer skipped (a forced cascade exit of
every token, as SEDAC's exits do; attention always runs), and, for comparison, prompt lookup (an n-gram
draft: the token that followed the last occurrence of the current two tokens, cost ~0). ``alpha`` is the
fraction of held-out positions where the draft's top-1 equals the full model's (teacher-forced: each
token judged with the true prefix), ``c`` the measured time of a batch-1 greedy decode with the draft over
the time without it.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch


def implied_speedup(alpha: float, cost: float, max_gamma: int = 8) -> Dict[str, float]:
    """The best expected speed-up over draft lengths 1..max_gamma, and that length."""
    best, best_gamma = 1.0, 0
    for gamma in range(1, max_gamma + 1):
        if alpha >= 1.0:
            s = (gamma + 1) / (gamma * cost + 1)
        else:
            s = (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * cost + 1))
        if s > best:
            best, best_gamma = s, gamma
    return {"speedup": best, "gamma": best_gamma}


def required_alpha(cost: float, target: float = 1.1, max_gamma: int = 8) -> float:
    """The smallest acceptance at which a draft of this cost reaches ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if implied_speedup(mid, cost, max_gamma)["speedup"] >= target:
            hi = mid
        else:
            lo = mid
    return hi


def ngram_proposals(ids: np.ndarray, n: int = 2) -> np.ndarray:
    """Prompt lookup per position of one window: the token that followed the most recent earlier
    occurrence of the last ``n`` tokens, -1 where there is none."""
    out = np.full(len(ids), -1, dtype=np.int64)
    last: Dict[tuple, int] = {}
    for t in range(len(ids)):
        if t + 1 >= n:
            key = tuple(ids[t + 1 - n:t + 1].tolist())
            if key in last:
                out[t] = ids[last[key] + 1]
            if t + 1 < len(ids):
                last[key] = t
    return out


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            best = min(best, time.perf_counter() - t)
    return best


def measure(layout, windows: torch.Tensor, base_top1: torch.Tensor, exit_layers: Sequence[int],
            new_tokens: int = 32, log=print) -> Dict[str, Any]:
    from sedac_monitor.api import ForcedExitDecider, HFAttachment, SkipRuntime, teacher_forced

    L = layout.num_layers
    rows: List[Dict[str, Any]] = []
    prompt = windows[:1, :64]
    full_s = decode_seconds(layout.model, prompt, new_tokens)
    for e in exit_layers:
        run = teacher_forced(layout, windows, ForcedExitDecider(L, e), 4, desc=f"draft exit {e}", protect_first=0)
        alpha = float((run.top1 == base_top1).double().mean())
        att = HFAttachment(layout, SkipRuntime(ForcedExitDecider(L, e), L, 0))
        try:
            draft_s = decode_seconds(layout.model, prompt, new_tokens)
        finally:
            att.detach()
        cost = draft_s / full_s
        rows.append({"draft": f"SEDAC exit after layer {e} (MLPs {e + 1}..{L - 1} skipped)", "acceptance": alpha,
                     "cost": cost, **implied_speedup(alpha, cost)})
        log(f"  draft exit {e}: acceptance {alpha:.3f}, cost {cost:.3f}, implied speed-up "
            f"{rows[-1]['speedup']:.3f}x (gamma {rows[-1]['gamma']})")
    # prompt lookup on the same windows and the same full-model top-1
    n, length = windows.shape
    top1 = base_top1.view(n, length - 1).numpy()
    hits = proposals = 0
    for w in range(n):
        prop = ngram_proposals(windows[w, :-1].numpy())
        hits += int((prop == top1[w]).sum())
        proposals += int((prop >= 0).sum())
    alpha = hits / top1.size
    rows.append({"draft": "prompt lookup (2-gram)", "acceptance": alpha, "cost": 0.0,
                 "proposal_rate": proposals / top1.size, **implied_speedup(alpha, 0.0)})
    log(f"  prompt lookup: acceptance {alpha:.3f}, implied speed-up {rows[-1]['speedup']:.3f}x")
    best_sedac = max((r for r in rows if r["draft"].startswith("SEDAC")), key=lambda r: r["speedup"])
    return {"rows": rows, "full_decode_s": full_s, "new_tokens": new_tokens, "batch": 1,
            "best_sedac": best_sedac["draft"], "best_sedac_speedup": best_sedac["speedup"],
            "build_proposer": best_sedac["speedup"] > 1.1,
            "required_alpha": {f"{c:.1f}": required_alpha(c) for c in (0.2, 0.4, 0.6, 0.8)}}
