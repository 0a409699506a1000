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

from typing import Dict, Optional, Tuple

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
    """The V7 rule over the rows (tokens) of one forward pass.

    Two ways to drive it, one rule:

    * functional, for code that compiles the forward (sedac-vllm): ``state =
      init(stream)``, then per layer ``plan(layer, state)`` before its MLP and
      ``state = step(layer, stream, state)`` after it. Pure torch on tensors,
      no data-dependent shapes and no host reads, so the whole rule compiles
      into the model's graph;
    * stateful, for Hugging Face hooks: :meth:`begin`, :meth:`plan` (one
      argument), :meth:`after_layer` keep the state on the object.
      :meth:`update` takes a similarity column directly (tests, replay parity).

    ``monotone`` is True in cascade mode: a row skipped at a layer stays skipped
    at every later layer that can skip (the runtime may reuse a compaction).
    """

    def __init__(self, rule: sedac_core.MonitorRule, num_layers: int, tau_tensor: bool = False) -> None:
        if not isinstance(rule, sedac_core.MonitorRule):
            raise TypeError(f"rule must be a sedac_core.MonitorRule, got {type(rule).__name__}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.rule = rule
        self.num_layers = int(num_layers)
        # plain Python values: what a compiled graph bakes in (sedac_core compares in float32)
        self.tau = float(np.float32(rule.tau))
        # a tensor instead of a constant: a compiled graph reads it on every call, so tau can be moved at run
        # time (sedac-vllm's online calibration); same comparisons either way
        self.tau_t: Optional[torch.Tensor] = torch.tensor(self.tau, dtype=torch.float32) if tau_tensor else None
        self.k, self.min_layer = int(rule.k), int(rule.min_layer)
        self.cascade = rule.scope == "cascade"
        self.monotone = self.cascade
        self._end = max(self.num_layers - int(rule.protect_last), 0)
        self.state: Optional[Dict[str, torch.Tensor]] = None
        self.exit_layer: Optional[torch.Tensor] = None  # stateful use: layer each row exited at (-1: none)

    # -- functional ------------------------------------------------------------
    def init(self, stream: torch.Tensor) -> Dict[str, torch.Tensor]:
        """State before layer 0, from the stream entering it (``[rows, hidden]``)."""
        a = stream.float()
        rows = a.shape[0]
        return {"prev": a, "prev_norm2": torch.linalg.vecdot(a, a),
                "run": torch.zeros(rows, dtype=torch.int32, device=a.device),
                "exited": torch.zeros(rows, dtype=torch.bool, device=a.device)}

    def step(self, layer: int, stream: torch.Tensor, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """State after ``layer``, given the stream it produced."""
        a = stream.float()
        norm2 = torch.linalg.vecdot(a, a)
        s = similarity(a, state["prev"], state["prev_norm2"], norm2)
        run, exited = self.advance(layer, s, state["run"], state["exited"])
        return {"prev": a, "prev_norm2": norm2, "run": run, "exited": exited, "s": s}

    def advance(self, layer: int, s: torch.Tensor, run: torch.Tensor, exited: torch.Tensor):
        """(run, exited) after ``layer`` given that layer's similarity column ``s``."""
        if layer >= self.min_layer:
            run = (run + 1) * (s >= (self.tau if self.tau_t is None else self.tau_t))
        if self.cascade and layer >= self.min_layer + self.k - 1:
            exited = exited | (run >= self.k)
        return run, exited

    def plan_for(self, layer: int, state: Dict[str, torch.Tensor]) -> Plan:
        """Rows whose MLP at ``layer`` is skipped (decided from layers < ``layer``); ``(None, None)``
        where no row can skip, known without looking at the data."""
        if layer >= self._end or layer < self.min_layer + self.k:
            return None, None
        if self.cascade:
            return state["exited"], None  # exits decided at layers < `layer`
        return state["run"] >= self.k, None

    # -- stateful (Hugging Face hooks, tests) ------------------------------------
    def begin(self, stream: torch.Tensor) -> None:
        self.state = self.init(stream)
        self.exit_layer = torch.full((stream.shape[0],), -1, dtype=torch.int32, device=stream.device)

    def start(self, rows: int, device: Optional[torch.device] = None) -> None:
        """Begin without a stream (drive the rule with :meth:`update`)."""
        self.state = {"run": torch.zeros(rows, dtype=torch.int32, device=device),
                      "exited": torch.zeros(rows, dtype=torch.bool, device=device)}
        self.exit_layer = torch.full((rows,), -1, dtype=torch.int32, device=device)

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        before = self.state["exited"]
        self.state = self.step(layer, stream, self.state)
        self._note_exits(layer, before)

    def update(self, layer: int, s: torch.Tensor) -> None:
        """Advance the rule by one layer given that layer's similarity column."""
        before = self.state["exited"]
        run, exited = self.advance(layer, s, self.state["run"], before)
        self.state = {**self.state, "run": run, "exited": exited}
        self._note_exits(layer, before)

    def _note_exits(self, layer: int, before: torch.Tensor) -> None:
        self.exit_layer = self.exit_layer.masked_fill(self.state["exited"] & ~before, layer)

    @property
    def run(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state["run"]

    @property
    def exited(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state["exited"]

    def plan(self, layer: int) -> Plan:
        return self.plan_for(layer, self.state)
