"""V7 decisions in torch: the consecutive-similarity rule, one layer at a time.

This is the one place the V7 rule is written for use inside a model forward;
sedac-vllm and the HF accelerator both use it. It gives the same decisions as
``sedac_core.consecutive_exit`` (cascade) and ``sedac_core.replay`` (per-layer
skip counts) on the same similarity matrix — tested property by property.

Positions follow sedac_core: ``S_l`` compares the residual stream after
decoder layer ``l`` with the stream entering it; a cascade exit at ``l`` skips
the MLPs of layers ``l+1 .. num_layers-protect_last-1``. In ``per_layer``
scope a layer's MLP is skipped while the run of ``S >= tau`` ending at the
previous layer is at least ``k`` long.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch

import sedac_core

Plan = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
"""(skip, keep): ``skip`` bool[rows] (None: no row skips), ``keep`` float[rows]
fraction of MLP channels to compute for rows that do not skip (None: all)."""


EPS = 1e-8


NO_EXIT_TAU = 1.5
"""A V7 threshold no similarity reaches (:func:`similarity` is at most 1): with it no token exits."""


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


@runtime_checkable
class Decider(Protocol):
    """What SEDAC's runtimes ask of a decider (the V7 monitor, the V6 probes, the benchmark's baselines).

    One protocol, functional: the state of a forward is a value the caller keeps and passes back, so the
    Hugging Face hooks (:class:`sedac_monitor.api.SkipRuntime`) and vLLM's compiled forward
    (sedac-vllm) drive a decider the same way::

        state = decider.start(stream)              # the stream entering layer 0, [rows, hidden]
        for layer in range(num_layers):
            skip, keep = decider.plan(layer, state)    # before the layer's MLP
            ...                                        # the layer, its MLP under the plan
            if decider.step_layers is None or layer in decider.step_layers:
                state = decider.step(layer, stream, state)  # the stream the layer produced

    For a compiled forward, ``start``, ``step`` and ``plan`` must be pure torch on tensors: no host reads,
    no data-dependent shapes. Declared properties:

    * ``monotone``: a row skipped at a layer stays skipped at every later layer that can skip (a cascade);
    * ``wants_positions``: ``start(stream, positions)`` takes the rows' sequence positions (int64 ``[rows]``);
    * ``step_layers``: the layers after which ``step`` must see the stream (None: every layer); a compiled
      forward forms the residual stream only there.
    """

    # read-only for the type checker: a decider may declare them as class attributes of a narrower type
    # (``step_layers = frozenset()``) or as properties
    @property
    def monotone(self) -> bool: ...

    @property
    def wants_positions(self) -> bool: ...

    @property
    def step_layers(self) -> Optional[FrozenSet[int]]: ...

    # start(stream), or start(stream, positions) when wants_positions: one signature cannot say both
    @property
    def start(self) -> Callable[..., Any]: ...

    def step(self, layer: int, stream: torch.Tensor, state: Any) -> Any: ...

    def plan(self, layer: int, state: Any) -> Plan: ...


class MonitorDecider:
    """The V7 rule over the rows (tokens) of one forward pass, as a :class:`Decider`.

    ``monotone`` is True in the cascade scope: a row skipped at a layer stays skipped
    at every later layer that can skip (the runtime may reuse a compaction).
    :meth:`advance` takes a similarity column directly (tests, replay parity).
    """

    wants_positions = False

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
        self.monotone = rule.scope == "cascade"
        self._end = max(self.num_layers - int(rule.protect_last), 0)
        # the layers whose similarity a plan reads: S_l for min_layer <= l <= end - 2 (the last plan, at end - 1,
        # reads the state after end - 2), which needs the stream after min_layer - 1 too. A compiled forward
        # forms the residual stream and its similarity only there (every layer: sedac-vllm, when it keeps
        # every layer's signal for online calibration or the decision log)
        self.step_layers: Optional[FrozenSet[int]] = frozenset(range(max(self.min_layer - 1, 0), self._end - 1))

    def start(self, stream: torch.Tensor) -> Dict[str, torch.Tensor]:
        """State before layer 0, from the stream entering it (``[rows, hidden]``)."""
        a = stream.float()
        rows = a.shape[0]
        return {"prev": a, "prev_norm2": torch.linalg.vecdot(a, a),
                "run": torch.zeros(rows, dtype=torch.int32, device=a.device),
                "exited": torch.zeros(rows, dtype=torch.bool, device=a.device)}

    def step(self, layer: int, stream: torch.Tensor, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """State after ``layer``, given the stream it produced (``s``: that layer's similarity column)."""
        a = stream.float()
        norm2 = torch.linalg.vecdot(a, a)
        s = similarity(a, state["prev"], state["prev_norm2"], norm2)
        run, exited = self.advance(layer, s, state["run"], state["exited"])
        return {"prev": a, "prev_norm2": norm2, "run": run, "exited": exited, "s": s}

    def advance(self, layer: int, s: torch.Tensor, run: torch.Tensor, exited: torch.Tensor):
        """(run, exited) after ``layer`` given that layer's similarity column ``s``."""
        if layer >= self.min_layer:
            run = (run + 1) * (s >= (self.tau if self.tau_t is None else self.tau_t))
        if self.monotone and layer >= self.min_layer + self.k - 1:
            exited = exited | (run >= self.k)
        return run, exited

    def plan(self, layer: int, state: Dict[str, torch.Tensor]) -> Plan:
        """Rows whose MLP at ``layer`` is skipped (decided from layers < ``layer``); ``(None, None)``
        where no row can skip, known without looking at the data."""
        if layer >= self._end or layer < self.min_layer + self.k:
            return None, None
        if self.monotone:
            return state["exited"], None  # exits decided at layers < `layer`
        return state["run"] >= self.k, None


class RecordingDecider:
    """Never skips; records the similarity S_l after every layer, and optionally
    the residual stream at some layers (for probes and the logit lens). A
    :class:`~sedac_monitor.decide.Decider` whose state is the previous stream;
    what it records is kept on the object (``sims``, ``streams``: the last
    forward's), for the Hugging Face passes that read it."""

    monotone = False
    wants_positions = False
    step_layers = None

    def __init__(self, num_layers: int, keep_layers: Iterable[int] = ()) -> None:
        self._similarity = similarity
        self.num_layers = num_layers
        self.keep_layers = set(keep_layers)
        self.sims: List[torch.Tensor] = []
        self.streams: Dict[int, torch.Tensor] = {}

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        self.sims = []
        self.streams = {}
        return stream

    def plan(self, layer: int, state: torch.Tensor) -> Tuple[None, None]:
        return None, None

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.sims.append(self._similarity(stream, state))
        if layer in self.keep_layers:
            self.streams[layer] = stream
        return stream


class ForcedExitDecider:
    """Every row skips the MLPs of layers ``exit_layer+1 .. num_layers-protect_last-1``."""

    monotone = False
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()  # decides from the layer index alone

    def __init__(self, num_layers: int, exit_layer: int, protect_last: int = 0) -> None:
        self.end = num_layers - protect_last
        self.exit_layer = exit_layer

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        return torch.ones(stream.shape[0], dtype=torch.bool, device=stream.device)

    def plan(self, layer: int, state: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        return (state, None) if self.exit_layer < layer < self.end else (None, None)

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state
