"""Channel soft exit: per token, the MLP skips the weight columns its small activations would multiply.

In layer ``i`` an entry of the MLP's input with ``|x| < input_thresholds[i]`` is treated as zero (gate and
up skip that column of their weights), and an entry of the down projection's input (``act(gate(x)) *
up(x)``) with ``|h| < inner_thresholds[i]`` too (down skips that column). The thresholds are elementwise,
so every token chooses its own channels and every tensor-parallel rank decides identically on its shard.

SEDAC's signal can scale the thresholds per token (``signal_weight`` > 0): a token whose residual stream
moved little through the previous layer (the V7 monitor's similarity, as a distance ``d = 1 - cos(h_l,
h_{l-1})``) gets a larger threshold, ``t * clamp((d_ref / d) ** signal_weight, 1/4, 4)``, with ``d_ref``
the layer's median distance on the calibration text; settled tokens compute fewer channels, moving ones
more. The levels below are quantiles of the scaled magnitudes ``|x| / scale``, so a level means the same
fraction of entries zeroed whatever the weight; ``signal_weight`` 0 is one fixed threshold per layer
(TEAL-like), the baseline the signal must beat.

:func:`calibrate_channels` fits the thresholds on calibration text: one threshold per layer and matrix for
each sparsity level (the quantiles of the recorded magnitudes), a greedy allocation of levels across layers
and matrices (the move that adds the least MLP-output error per FLOP saved, the error measured on the
recorded inputs relative to the residual stream), and the measured search of ``sedac-monitor calibrate``
along that path: the most MLP work whose teacher-forced top-1 risk and ΔPPL are within the budget.

Here the masked entries are zeroed (the dense matrices still run: this measures quality and the work a
kernel could skip); :func:`attach_channels` hooks an HF model's ``gate_proj``/``up_proj``/``down_proj``, so
rows an exit already removed are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layouts import DecoderLayout
from .loading import InputError, batches, progress

__all__ = [
    "INPUT_SHARE", "LEVELS", "SIGNAL_CLAMP", "ChannelCounts", "ChannelSparsity", "Recording", "attach_channels",
    "channel_path", "greedy_path", "local_errors", "measure_channels", "propagation", "record", "sparsity_at",
    "stream_distance", "token_scale", "uniform",
]

LEVELS = tuple(round(0.05 * i, 2) for i in range(19))
"""Sparsity levels the allocation moves through (0 to 90% of a matrix's input entries, 5% apart)."""
INPUT_SHARE = 2.0 / 3.0
"""Share of a gate/up/down MLP's FLOPs (and weight bytes) behind its input: gate and up, two of three
equal matrices; the down projection's input carries the remaining third."""


@dataclass(frozen=True)
class ChannelSparsity:
    """Per-layer magnitude thresholds (0 leaves a matrix dense) and the sparsity each gave on the
    calibration text."""

    input_thresholds: Tuple[float, ...]
    inner_thresholds: Tuple[float, ...]
    input_sparsity: Tuple[float, ...]
    inner_sparsity: Tuple[float, ...]
    signal_weight: float = 0.0
    signal_reference: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.input_thresholds)
        w = self.signal_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InputError(f"channels.signal_weight must be a finite number >= 0, got {w!r}")
        if w > 0 and len(self.signal_reference) != n:
            raise InputError(f"channels.signal_reference has {len(self.signal_reference)} entries, "
                             f"channels.input_thresholds has {n}: one per layer when signal_weight > 0")
        for i, d in enumerate(self.signal_reference):
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
                raise InputError(f"channels.signal_reference[{i}] must be a finite number > 0, got {d!r}")
        for name in ("inner_thresholds", "input_sparsity", "inner_sparsity"):
            if len(getattr(self, name)) != n:
                raise InputError(f"channels.{name} has {len(getattr(self, name))} entries, "
                                 f"channels.input_thresholds has {n}: one per layer in each")
        for name in ("input_thresholds", "inner_thresholds"):
            for i, t in enumerate(getattr(self, name)):
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                    raise InputError(f"channels.{name}[{i}] must be a finite number >= 0, got {t!r}")
        for name in ("input_sparsity", "inner_sparsity"):
            for i, s in enumerate(getattr(self, name)):
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
                    raise InputError(f"channels.{name}[{i}] must be a fraction in [0, 1], got {s!r}")

    @property
    def num_layers(self) -> int:
        return len(self.input_thresholds)

    @property
    def mlp_work_saved(self) -> float:
        """Expected fraction of the MLPs' FLOPs (and, for one token, weight bytes) skipped."""
        return sum(INPUT_SHARE * a + (1 - INPUT_SHARE) * b
                   for a, b in zip(self.input_sparsity, self.inner_sparsity)) / max(self.num_layers, 1)

    def to_json(self) -> Dict[str, Any]:
        return {"input_thresholds": list(self.input_thresholds), "inner_thresholds": list(self.inner_thresholds),
                "input_sparsity": list(self.input_sparsity), "inner_sparsity": list(self.inner_sparsity),
                "signal_weight": self.signal_weight, "signal_reference": list(self.signal_reference)}

    @classmethod
    def from_json(cls, data: Any, num_layers: Optional[int] = None) -> "ChannelSparsity":
        """Validate a config's ``channels`` object; errors name the key."""
        keys = ("input_thresholds", "inner_thresholds", "input_sparsity", "inner_sparsity")
        optional = ("signal_weight", "signal_reference")
        if not isinstance(data, dict):
            raise InputError(f"channels must be an object with {', '.join(keys)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(keys) - set(optional))
        if unknown:
            raise InputError(f"channels has unknown keys {unknown}; expected {', '.join(keys + optional)}")
        for k in keys:
            if not isinstance(data.get(k), list):
                raise InputError(f"channels.{k} must be a list of numbers, one per layer, got {data.get(k)!r}")
        if not isinstance(data.get("signal_reference", []), list):
            raise InputError(f"channels.signal_reference must be a list of numbers, one per layer, got "
                             f"{data.get('signal_reference')!r}")
        out = cls(tuple(data["input_thresholds"]), tuple(data["inner_thresholds"]), tuple(data["input_sparsity"]),
                  tuple(data["inner_sparsity"]), data.get("signal_weight", 0.0),
                  tuple(data.get("signal_reference", [])))
        if num_layers is not None and out.num_layers != num_layers:
            raise InputError(f"channels has thresholds for {out.num_layers} layers, the model has {num_layers}")
        return out


@dataclass
class ChannelCounts:
    """What :func:`attach_channels` masked: per layer, rows that reached each matrix and entries zeroed."""

    input_rows: List[int]
    input_zeroed: List[int]
    inner_rows: List[int]
    inner_zeroed: List[int]
    widths: Tuple[int, int] = (0, 0)  # hidden size, intermediate size
    # with group_rows > 0, also count in groups of that many consecutive rows the columns every row of the group
    # zeroed (weight bytes at batch > 1): (matrix "input" or "inner", layer) -> (columns seen, columns zeroed)
    group_rows: int = 0
    union: Dict[Tuple[str, int], Tuple[int, int]] = field(default_factory=dict)

    def add(self, layer: int, inner: bool, small: torch.Tensor) -> None:
        """Count one masked input: ``small`` is its bool mask (``[..., width]``, True = zeroed)."""
        width = small.shape[-1]
        flat = small.reshape(-1, width)
        (self.inner_rows if inner else self.input_rows)[layer] += flat.shape[0]
        (self.inner_zeroed if inner else self.input_zeroed)[layer] += int(flat.sum())
        groups = flat.shape[0] // self.group_rows if self.group_rows else 0
        if groups:
            every = flat[:groups * self.group_rows].reshape(groups, self.group_rows, width).all(dim=1)
            key = ("inner" if inner else "input", layer)
            seen, zeroed = self.union.get(key, (0, 0))
            self.union[key] = (seen + groups * width, zeroed + int(every.sum()))

    def group_sparsity(self) -> float:
        """Share of the MLP's weights whose column every row of a group skipped (0 without group counting)."""
        L = len(self.input_rows)

        def share(kind: str, i: int) -> float:
            seen, zeroed = self.union.get((kind, i), (0, 0))
            return zeroed / seen if seen else 0.0
        return sum(INPUT_SHARE * share("input", i) + (1 - INPUT_SHARE) * share("inner", i)
                   for i in range(L)) / max(L, 1)

    def sparsity(self) -> Tuple[List[float], List[float]]:
        """Per layer, the fraction of entries zeroed at the MLP's input and at the down projection's."""
        h, inter = self.widths
        return ([z / max(r * h, 1) for r, z in zip(self.input_rows, self.input_zeroed)],
                [z / max(r * inter, 1) for r, z in zip(self.inner_rows, self.inner_zeroed)])

    def mlp_work_saved(self) -> float:
        s_in, s_mid = self.sparsity()
        return sum(INPUT_SHARE * a + (1 - INPUT_SHARE) * b for a, b in zip(s_in, s_mid)) / max(len(s_in), 1)


SIGNAL_CLAMP = (0.25, 4.0)
"""Bounds of the per-token threshold scale: a token's threshold is at most 4x (at least 1/4 of) its layer's."""


def token_scale(distance: torch.Tensor, reference: float, weight: float) -> torch.Tensor:
    """Per-token threshold scale ``clamp((reference / distance) ** weight, *SIGNAL_CLAMP)``: > 1 for tokens
    whose stream moved less than the layer's median ``reference`` (settled), < 1 for those that moved more."""
    ratio = reference / distance.float().clamp_min(1e-12)
    return ratio.pow(weight).clamp(*SIGNAL_CLAMP)


def stream_distance(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between two residual streams, per row (float32; the V7 monitor's similarity as a distance)."""
    a, b = now.reshape(-1, now.shape[-1]).float(), before.reshape(-1, before.shape[-1]).float()
    return (1.0 - F.cosine_similarity(a, b, dim=-1)).clamp_min(0.0)


class attach_channels:
    """Context manager: the thresholds of ``sparsity`` applied to an HF gate/up/down model's MLPs
    (forward pre-hooks on their linears; with a signal weight, pre-hooks on the decoder layers read each
    token's stream distance too); ``counts`` records what was masked."""

    def __init__(self, layout: DecoderLayout, sparsity: ChannelSparsity) -> None:
        if sparsity.num_layers != layout.num_layers:
            raise InputError(f"channels has thresholds for {sparsity.num_layers} layers, "
                             f"the model has {layout.num_layers}")
        self.layout, self.sparsity = layout, sparsity
        self.reset_counts()
        self._handles: List[Any] = []
        self._stream: Optional[torch.Tensor] = None
        self._scale: List[Optional[torch.Tensor]] = [None] * layout.num_layers

    def reset_counts(self) -> None:
        L = self.layout.num_layers
        old = getattr(self, "counts", None)
        self.counts = ChannelCounts([0] * L, [0] * L, [0] * L, [0] * L, old.widths if old else (0, 0),
                                    old.group_rows if old else 0)

    def _layer_hook(self, i: int):
        weight, ref = self.sparsity.signal_weight, self.sparsity.signal_reference

        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach()
            if i > 0 and self._stream is not None and self._stream.shape == h.shape:
                self._scale[i] = token_scale(stream_distance(h, self._stream), ref[i], weight)
            else:
                self._scale[i] = None  # layer 0, or a new forward's first layer: the layer's own threshold
            self._stream = h
        return hook

    def _hook(self, i: int, inner: bool, count: bool):
        t = (self.sparsity.inner_thresholds if inner else self.sparsity.input_thresholds)[i]

        def hook(module, args):
            x = args[0]
            thr: Any = t
            scale = self._scale[i]
            if scale is not None:
                n = x.numel() // x.shape[-1]
                if scale.numel() != n:
                    raise RuntimeError(f"channel soft exit with a signal weight needs every row at layer {i}'s "
                                       f"MLP ({scale.numel()} rows entered the layer, {n} reached the MLP): "
                                       "use it without exits, or with signal_weight 0")
                thr = t * scale.to(x.dtype).view(*x.shape[:-1], 1)
            small = x.abs() < thr
            if count:
                self.counts.add(i, inner, small)
            return (x.masked_fill(small, 0),) + tuple(args[1:])
        return hook

    def __enter__(self) -> "attach_channels":
        try:
            for i, layer in enumerate(self.layout.layers):
                mlp: Any = layer.mlp
                if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                    raise InputError(f"channel soft exit needs gate_proj/up_proj/down_proj MLPs; layer {i}'s "
                                     f"is {type(mlp).__name__}")
                self.counts.widths = (mlp.gate_proj.weight.shape[1], mlp.gate_proj.weight.shape[0])
                if self.sparsity.signal_weight > 0:
                    self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
                if self.sparsity.input_thresholds[i] > 0:
                    self._handles.append(mlp.gate_proj.register_forward_pre_hook(self._hook(i, False, True)))
                    self._handles.append(mlp.up_proj.register_forward_pre_hook(self._hook(i, False, False)))
                if self.sparsity.inner_thresholds[i] > 0:
                    self._handles.append(mlp.down_proj.register_forward_pre_hook(self._hook(i, True, True)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stream = None
        self._scale = [None] * self.layout.num_layers


@dataclass
class Recording:
    """Per layer: a sample of MLP input rows with their residual stream's squared norm and stream distance
    (:func:`stream_distance`, NaN at layer 0), and, over a larger sample of rows, the magnitudes of the MLP's
    input and of the down projection's input with those rows' distances: what thresholds are fitted on."""

    inputs: List[torch.Tensor]
    residual_sq: List[torch.Tensor]
    distance: List[torch.Tensor]
    input_abs: List[torch.Tensor]
    inner_abs: List[torch.Tensor]
    abs_distance: List[torch.Tensor]
    _levels: Dict[float, Tuple[List[List[float]], List[List[float]]]] = field(default_factory=dict, repr=False)

    def reference(self) -> Tuple[float, ...]:
        """Per layer, the median stream distance (layer 0, which has none: 1.0)."""
        return tuple(1.0 if i == 0 else max(float(d.median()), 1e-9) for i, d in enumerate(self.abs_distance))

    def scales(self, i: int, weight: float, rows: str = "sample") -> Optional[torch.Tensor]:
        """Per-row threshold scales at layer ``i`` (None: every row 1) for the sampled rows or the
        magnitude rows (``rows="abs"``)."""
        if weight == 0 or i == 0:
            return None
        d = self.distance[i] if rows == "sample" else self.abs_distance[i]
        return token_scale(d, self.reference()[i], weight)

    def levels(self, weight: float) -> Tuple[List[List[float]], List[List[float]]]:
        """Per layer, the threshold of every level in :data:`LEVELS` for the MLP's input and the down
        projection's: quantiles of ``|x| / scale`` (computed once per weight)."""
        if weight in self._levels:
            return self._levels[weight]
        lv_in, lv_mid = [], []
        for i in range(len(self.inputs)):
            scale = self.scales(i, weight, rows="abs")
            a, b = self.input_abs[i], self.inner_abs[i]
            if scale is not None:
                a, b = a / scale[:, None], b / scale[:, None]
            lv_in.append(_quantiles(a, LEVELS))
            lv_mid.append(_quantiles(b, LEVELS))
        self._levels[weight] = (lv_in, lv_mid)
        return lv_in, lv_mid


def _quantiles(values: torch.Tensor, levels: Sequence[float], cap: int = 1 << 22) -> List[float]:
    v = values.reshape(-1).float()
    if v.numel() > cap:  # torch.quantile's input limit; an even subsample keeps the quantiles
        v = v[torch.linspace(0, v.numel() - 1, cap).long()]
    q = torch.quantile(v, torch.tensor([float(s) for s in levels]))
    return [0.0 if s == 0 else float(x) for s, x in zip(levels, q)]


def _mlp_parts(mlp: Any):
    act = getattr(mlp, "act_fn", F.silu)
    return mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float(), act


def record(layout: DecoderLayout, windows: torch.Tensor, batch_size: int = 4, rows_per_layer: int = 1024,
           every: int = 7, seed: int = 0) -> Recording:
    """Run ``windows`` unmodified and keep, per layer, ``rows_per_layer`` MLP input rows (spread over the
    text) with their residual stream, and the magnitudes of every ``every``-th row's MLP input and down
    projection input."""
    L = layout.num_layers
    total = windows.numel()
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:rows_per_layer].sort().values
    inputs: List[List[torch.Tensor]] = [[] for _ in range(L)]
    resid: List[List[torch.Tensor]] = [[] for _ in range(L)]
    dist: List[List[torch.Tensor]] = [[] for _ in range(L)]
    all_in: List[List[torch.Tensor]] = [[] for _ in range(L)]
    all_mid: List[List[torch.Tensor]] = [[] for _ in range(L)]
    all_dist: List[List[torch.Tensor]] = [[] for _ in range(L)]
    offset = [0]
    previous: List[Optional[torch.Tensor]] = [None]

    def pick(n: int) -> torch.Tensor:
        lo = offset[0]
        return keep[(keep >= lo) & (keep < lo + n)] - lo

    def layer_hook(i):
        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach()
            flat = h.reshape(-1, h.shape[-1]).float()
            d = (stream_distance(flat, previous[0]) if i > 0 and previous[0] is not None
                 else torch.full((flat.shape[0],), float("nan")))
            previous[0] = flat
            sel = pick(flat.shape[0])
            resid[i].append(flat[sel].pow(2).sum(-1))
            dist[i].append(d[sel])
            all_dist[i].append(d[::every])
        return hook

    def mlp_hook(i):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            inputs[i].append(x[pick(x.shape[0])])
            all_in[i].append(x[::every].abs())
        return hook

    def down_hook(i):
        def hook(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            all_mid[i].append(h[::every].abs())
        return hook

    handles = []
    try:
        for i, layer in enumerate(layout.layers):
            mlp: Any = layer.mlp
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
            handles.append(mlp.register_forward_pre_hook(mlp_hook(i)))
            handles.append(mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        with torch.no_grad():
            for sl in progress(list(batches(windows.shape[0], batch_size)), desc="channel statistics"):
                ids = windows[sl]
                previous[0] = None
                layout.model(input_ids=ids, use_cache=False)
                offset[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return Recording([torch.cat(x) for x in inputs], [torch.cat(r) for r in resid], [torch.cat(d) for d in dist],
                     [torch.cat(v) for v in all_in], [torch.cat(v) for v in all_mid],
                     [torch.cat(d) for d in all_dist])


def local_errors(layout: DecoderLayout, rec: Recording, weight: float = 0.0
                 ) -> Tuple[List[List[float]], List[List[float]]]:
    """Per layer and level, the MLP-output error of masking one matrix's input at that level (the other
    dense) on the recorded rows: ``sum ||y' - y||^2 / sum ||residual||^2``."""
    err_in, err_mid = [], []
    lv_in, lv_mid = rec.levels(weight)
    with torch.no_grad():
        for i, layer in enumerate(layout.layers):
            gate, up, down, act = _mlp_parts(layer.mlp)
            x, denom = rec.inputs[i], float(rec.residual_sq[i].sum())
            scale = rec.scales(i, weight)
            col = 1.0 if scale is None else scale[:, None]
            h = act(x @ gate.T) * (x @ up.T)
            y = h @ down.T
            row_in, row_mid = [], []
            for t in lv_in[i]:
                xs = x.masked_fill(x.abs() < t * col, 0)
                row_in.append(float(((act(xs @ gate.T) * (xs @ up.T)) @ down.T - y).pow(2).sum()) / denom)
            for t in lv_mid[i]:
                hs = h.masked_fill(h.abs() < t * col, 0)
                row_mid.append(float((hs @ down.T - y).pow(2).sum()) / denom)
            err_in.append(row_in)
            err_mid.append(row_mid)
    return err_in, err_mid


def greedy_path(err_in: Sequence[Sequence[float]], err_mid: Sequence[Sequence[float]],
                max_work: float = 0.6) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Level allocations (per layer: input level, inner level), from dense up to ``max_work`` of the MLP
    FLOPs saved, each adding the one move (a layer's matrix, one level up) of least error per FLOP."""
    L = len(err_in)
    a, b = [0] * L, [0] * L
    path = [(tuple(a), tuple(b))]
    step_in, step_mid = INPUT_SHARE * 0.05 / L, (1 - INPUT_SHARE) * 0.05 / L
    work = 0.0
    top = len(LEVELS) - 1
    while work < max_work:
        best: Optional[Tuple[float, int, bool]] = None
        for i in range(L):
            if a[i] < top:
                c = (err_in[i][a[i] + 1] - err_in[i][a[i]]) / step_in
                if best is None or c < best[0]:
                    best = (c, i, False)
            if b[i] < top:
                c = (err_mid[i][b[i] + 1] - err_mid[i][b[i]]) / step_mid
                if best is None or c < best[0]:
                    best = (c, i, True)
        if best is None:
            break
        _, i, inner = best
        if inner:
            b[i] += 1
            work += step_mid
        else:
            a[i] += 1
            work += step_in
        path.append((tuple(a), tuple(b)))
    return path


def sparsity_at(rec: Recording, levels: Tuple[Sequence[int], Sequence[int]], weight: float = 0.0
                ) -> ChannelSparsity:
    """The thresholds of per-layer level indices ``(input levels, inner levels)``."""
    a, b = levels
    lv_in, lv_mid = rec.levels(weight)
    return ChannelSparsity(tuple(lv_in[i][k] for i, k in enumerate(a)), tuple(lv_mid[i][k] for i, k in enumerate(b)),
                           tuple(LEVELS[k] for k in a), tuple(LEVELS[k] for k in b), float(weight),
                           rec.reference() if weight > 0 else ())


def uniform(rec: Recording, input_level: float, inner_level: float) -> ChannelSparsity:
    """The same sparsity in every layer, one threshold per layer and matrix (TEAL's uniform setting)."""
    def index(s: float) -> int:
        if s not in LEVELS:
            raise InputError(f"sparsity levels are multiples of 0.05 in [0, {LEVELS[-1]}], got {s}")
        return LEVELS.index(s)
    L = len(rec.inputs)
    return sparsity_at(rec, ((index(input_level),) * L, (index(inner_level),) * L))


def measure_channels(layout: DecoderLayout, windows: torch.Tensor, sparsity: ChannelSparsity,
                     base_top1: torch.Tensor, base_nll: torch.Tensor, batch_size: int = 4,
                     confidence: Optional[float] = None, desc: str = "measure channels") -> Dict[str, Any]:
    """Teacher-forced top-1 risk, ΔPPL and MLP work saved of ``sparsity`` on ``windows``, as measured."""
    from .teacher import compared, teacher_forced

    with attach_channels(layout, sparsity) as att:
        run = teacher_forced(layout, windows, None, batch_size, desc=desc)
    s_in, s_mid = att.counts.sparsity()
    return {**compared(run, base_top1, base_nll, confidence), "mlp_work_saved": att.counts.mlp_work_saved(),
            "expected_mlp_work_saved": sparsity.mlp_work_saved, "input_sparsity": s_in, "inner_sparsity": s_mid}


def _logprobs(layout: DecoderLayout, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for sl in batches(windows.shape[0], batch_size):
            out.append(torch.log_softmax(layout.model(input_ids=windows[sl], use_cache=False).logits.float(), -1))
    return torch.cat(out)


def propagation(layout: DecoderLayout, windows: torch.Tensor, rec: Recording, err_in: Sequence[Sequence[float]],
                err_mid: Sequence[Sequence[float]], reference: Tuple[float, float] = (0.25, 0.4),
                batch_size: int = 4, weight: float = 0.0) -> Tuple[List[float], List[float]]:
    """Per layer and matrix, how much the model's output moves per unit of local error: the mean KL of
    the next-token distribution (against the unmodified model, on ``windows``) with only that matrix of
    that layer masked at the ``reference`` level, over its local error there. Local error alone ranks a
    layer by its own output; this measures what reaches the logits."""
    base = _logprobs(layout, windows, batch_size)
    L = layout.num_layers
    k_in: List[float] = []
    k_mid: List[float] = []
    dense = (0,) * L
    for i in progress(range(L), total=L, desc="channel sensitivity"):
        for inner, ks, errs in ((False, k_in, err_in), (True, k_mid, err_mid)):
            level = LEVELS.index(reference[1] if inner else reference[0])
            one = tuple(level if j == i else 0 for j in range(L))
            s = sparsity_at(rec, (dense, one) if inner else (one, dense), weight)
            with attach_channels(layout, s):
                lp = _logprobs(layout, windows, batch_size)
            kl = float((base.exp() * (base - lp)).sum(-1).mean())
            ks.append(max(kl, 0.0) / max(errs[i][level], 1e-12))
    return k_in, k_mid


def channel_path(layout: DecoderLayout, search: torch.Tensor, batch_size: int = 4, max_work: float = 0.5,
                 increment: float = 0.01, weight: float = 0.0, rec: Optional[Recording] = None,
                 sensitivity_tokens: int = 128) -> Tuple[Recording, List[ChannelSparsity]]:
    """The candidates a calibration measures: points of the greedy allocation (errors scaled by
    :func:`propagation`, measured on the first ``sensitivity_tokens`` of the search text: two forwards per
    layer) every ``step`` of MLP work saved, from most to least aggressive; ``weight`` is the signal weight
    (0: one threshold per layer)."""
    rec = rec if rec is not None else record(layout, search, batch_size)
    err_in, err_mid = local_errors(layout, rec, weight)
    k_in, k_mid = propagation(layout, search[:1, :sensitivity_tokens], rec, err_in, err_mid,
                              batch_size=batch_size, weight=weight)
    path = greedy_path([[k * e for e in row] for k, row in zip(k_in, err_in)],
                       [[k * e for e in row] for k, row in zip(k_mid, err_mid)], max_work)
    points, target = [], increment
    for levels in path:
        s = sparsity_at(rec, levels, weight)
        if s.mlp_work_saved >= target - 1e-9:
            points.append(s)
            target += increment
    return rec, points[::-1]
