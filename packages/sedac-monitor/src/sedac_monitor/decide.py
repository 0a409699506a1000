"""V7 decisions in torch: the consecutive-similarity rule, one layer at a time.

This is the one place the V7 rule is written for use inside a model forward;
sedac-vllm and the HF accelerator both use it. It gives the same decisions as
``sedac_core.consecutive_exit`` (cascade) and ``sedac_core.replay`` (per-layer
skip counts) on the same similarity matrix — tested property by property.

Positions follow sedac_core: ``S_l`` compares the residual stream after
decoder layer ``l`` with the stream entering it; a cascade exit at ``l`` skips
the MLPs of layers ``l+1 .. num_layers-protect_last-1``. In ``per_layer``
mode a layer's MLP is skipped while the run of ``S >= tau`` ending at the
previous layer is at least ``k`` long.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import sedac_core
import torch
import torch.nn.functional as F

Plan = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
"""(skip, keep): ``skip`` bool[rows] (None: no row skips), ``keep`` float[rows]
fraction of MLP channels to compute for rows that do not skip (None: all)."""


def similarity(stream: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """S = (cos(h_l, h_{l-1}) + 1) / 2 per row, in float32 (rows = tokens)."""
    cos = F.cosine_similarity(stream.float(), previous.float(), dim=-1, eps=1e-8)
    return (cos + 1.0) * 0.5


class MonitorDecider:
    """Per-row V7 state for one forward pass over ``rows`` tokens.

    Call :meth:`begin` with the stream entering layer 0, then for each layer
    :meth:`plan` (before its MLP) and :meth:`after_layer` (with the stream
    after it). :meth:`update` takes a similarity column directly (for tests
    and replay parity).
    """

    def __init__(self, rule: sedac_core.MonitorRule, num_layers: int) -> None:
        if not isinstance(rule, sedac_core.MonitorRule):
            raise TypeError(f"rule must be a sedac_core.MonitorRule, got {type(rule).__name__}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.rule = rule
        self.num_layers = int(num_layers)
        self.tau = float(np.float32(rule.tau))  # sedac_core compares in float32
        self._tau_t: Optional[torch.Tensor] = None
        self._end = max(self.num_layers - rule.protect_last, 0)
        self._prev: Optional[torch.Tensor] = None
        self.run: Optional[torch.Tensor] = None
        self.exit_layer: Optional[torch.Tensor] = None

    def begin(self, stream: torch.Tensor) -> None:
        rows = stream.shape[0]
        self._prev = stream
        self.start(rows, stream.device)

    def start(self, rows: int, device: torch.device = torch.device("cpu")) -> None:
        self.run = torch.zeros(rows, dtype=torch.int32, device=device)
        self.exit_layer = torch.full((rows,), -1, dtype=torch.int32, device=device)

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        s = similarity(stream, self._prev)
        self._prev = stream
        self.update(layer, s)

    def update(self, layer: int, s: torch.Tensor) -> None:
        """Advance the rule by one layer given that layer's similarity column."""
        rule = self.rule
        if layer >= rule.min_layer:
            if self._tau_t is None or self._tau_t.device != s.device:
                self._tau_t = torch.tensor(self.tau, dtype=torch.float32, device=s.device)
            self.run = (self.run + 1) * (s >= self._tau_t)
        if rule.mode == "cascade" and layer >= rule.min_layer + rule.k - 1:
            self.exit_layer.masked_fill_((self.exit_layer < 0) & (self.run >= rule.k), layer)

    def plan(self, layer: int) -> Plan:
        """Rows whose MLP at ``layer`` is skipped (decided from layers < ``layer``)."""
        rule = self.rule
        if layer >= self._end or layer < rule.min_layer + rule.k:
            return None, None  # nothing can skip here: no mask, no host sync
        if rule.mode == "cascade":
            return (self.exit_layer >= 0) & (self.exit_layer < layer), None
        return self.run >= rule.k, None
