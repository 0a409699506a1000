"""Exit statistics: how many tokens a runtime saw, where each first skipped an MLP, and how much MLP work
was skipped per layer."""

from __future__ import annotations

from typing import Any, Dict

import torch


class ExitStats:
    """Running counts over the valid (non-padding) tokens a runtime has seen.

    ``exit_hist[j]`` counts tokens whose first skipped MLP was at layer ``j``
    (their exit layer is ``j - 1``); ``exit_hist[num_layers]`` counts tokens
    that never skipped. ``skipped[l]`` counts skipped MLP blocks at layer ``l``
    (a soft exit that computes a fraction ``f`` of the channels counts ``1 - f``).
    Counts stay on the model's device until read.
    """

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.exit_hist = torch.zeros(num_layers + 1, dtype=torch.int64, device=device)
        self.skipped = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.full_skips = torch.zeros(num_layers, dtype=torch.int64, device=device)

    @staticmethod
    def empty(num_layers: int) -> Dict[str, Any]:
        """:meth:`as_dict` before any token was seen."""
        return ExitStats(num_layers, torch.device("cpu")).as_dict()

    def as_dict(self) -> Dict[str, Any]:
        tokens = int(self.tokens)
        skipped = self.skipped.tolist()
        hist = self.exit_hist.tolist()
        total = tokens * self.num_layers
        return {
            "tokens": tokens,
            "skipped_mlp_blocks": float(sum(skipped)),
            "skipped_mlp_fraction": float(sum(skipped)) / total if total else 0.0,
            "per_layer_skip_rate": [s / tokens if tokens else 0.0 for s in skipped],
            # exit layer e = first skipped layer - 1; key "none" = no skip
            "exit_layer_histogram": {**{str(j - 1): c for j, c in enumerate(hist[:-1]) if c}, "none": hist[-1]},
            "exited_fraction": (tokens - hist[-1]) / tokens if tokens else 0.0,
        }
