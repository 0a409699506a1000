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
import torch

import sedac_core

Plan = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
"""(skip, keep): ``skip`` bool[rows] (None: no row skips), ``keep`` float[rows]
fraction of MLP channels to compute for rows that do not skip (None: all)."""


EPS = 1e-8


def similarity(stream: torch.Tensor, previous: torch.Tensor, previous_norm2: Optional[torch.Tensor] = None,
               stream_norm2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S = (cos(h_l, h_{l-1}) + 1) / 2 per row, in float32 (rows = tokens).

    cos = <a, b> / max(|a| |b|, 1e-8), as ``torch.nn.functional.cosine_similarity``; squared norms may
    be passed in (a layer's stream norm is the next layer's previous norm), which saves work per layer.
    """
    a, b = stream.float(), previous.float()
    na = torch.linalg.vecdot(a, a) if stream_norm2 is None else stream_norm2
    nb = torch.linalg.vecdot(b, b) if previous_norm2 is None else previous_norm2
    cos = torch.linalg.vecdot(a, b) / torch.clamp_min(torch.sqrt(na * nb), EPS)
    return cos * 0.5 + 0.5


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
        self._prev_norm2: Optional[torch.Tensor] = None
        self.run: Optional[torch.Tensor] = None
        self.exit_layer: Optional[torch.Tensor] = None
        self.exited: Optional[torch.Tensor] = None  # cascade: exited at a layer already seen

    def begin(self, stream: torch.Tensor) -> None:
        rows = stream.shape[0]
        self._prev = stream
        self._prev_norm2 = None
        self.start(rows, stream.device)

    def start(self, rows: int, device: Optional[torch.device] = None) -> None:
        self.run = torch.zeros(rows, dtype=torch.int32, device=device)
        self.exit_layer = torch.full((rows,), -1, dtype=torch.int32, device=device)
        self.exited = torch.zeros(rows, dtype=torch.bool, device=device)

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        a = stream.float()
        norm2 = torch.linalg.vecdot(a, a)
        s = similarity(a, self._prev, self._prev_norm2, norm2)
        self._prev, self._prev_norm2 = a, norm2
        self.update(layer, s)

    def update(self, layer: int, s: torch.Tensor) -> None:
        """Advance the rule by one layer given that layer's similarity column."""
        rule = self.rule
        if layer >= rule.min_layer:
            if self._tau_t is None or self._tau_t.device != s.device:
                self._tau_t = torch.tensor(self.tau, dtype=torch.float32, device=s.device)
            self.run = (self.run + 1) * (s >= self._tau_t)
        if rule.mode == "cascade" and layer >= rule.min_layer + rule.k - 1:
            newly = (self.run >= rule.k) & ~self.exited
            self.exit_layer.masked_fill_(newly, layer)
            self.exited = self.exited | newly  # a new tensor: plans handed out earlier must not change

    def plan(self, layer: int) -> Plan:
        """Rows whose MLP at ``layer`` is skipped (decided from layers < ``layer``)."""
        rule = self.rule
        if layer >= self._end or layer < rule.min_layer + rule.k:
            return None, None  # nothing can skip here: no mask, no host sync
        if rule.mode == "cascade":
            return self.exited, None  # exits decided at layers < `layer`
        return self.run >= rule.k, None
