"""``sedac-monitor calibrate``: find the V7 setting that skips the most MLP work within a risk budget.

Risk is the fraction of tokens whose teacher-forced top-1 prediction differs
from the unmodified model's. The search has two stages:

1. **Replay** (``sedac_core.replay``) over a grid of tau, K, min_layer,
   protect_last and scope, on the similarity trace of the unmodified model and
   per-token "safe to cascade from layer p" labels (one forced-exit forward
   per layer). This estimates skipped work and risk for every grid point.
2. **Measurement**: the most promising settings are run for real (the model
   patched, teacher-forced) and their measured risk decides. With
   ``confidence``, the text is split: the search uses the first half and
   the measurement the second, and a setting passes only if the one-sided
   Clopper–Pearson upper bound of its risk, at ``1 - (1 - confidence) / B``
   for B measured settings (Bonferroni), is within the budget.

A setting must also keep the distribution: its ΔPPL against the unmodified model (the perplexity of the
text's own next tokens, teacher-forced) within ``max_delta_ppl`` (default 2%), bounded like the risk when
``confidence`` is given (Student's t over blocks of 128 tokens, see :func:`sedac_monitor.bound.delta_ppl_upper`).
The top-1 alone would let a setting through that keeps the argmax but moves the probabilities, which everyone
who samples with a temperature sees.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import sedac_core

from .accelerator import monitor_rule
from .cost import expected_speedups, measure_model, recommendation
from .decide import NO_EXIT_TAU, MonitorDecider, RecordingDecider
from .layouts import DecoderLayout, find_layout, model_identity
from .loading import InputError, drop_last_position, load_model, read_text, split_windows, token_windows
from .sparsity import ChannelSparsity, channel_path, measure_channels
from .teacher import cascade_labels_for, compared, first_order_changes, teacher_forced

__all__ = [
    "BUDGET_NOT_MET", "CHANNELS_NOT_MET", "DEFAULT_MAX_DELTA_PPL", "FORMAT_VERSION", "Grid", "NEVER_EXIT",
    "ORIGINAL_DEFAULTS", "SIGNAL_EDGES", "STRATEGIES", "calibrate", "candidate_list", "measure", "measured_search",
    "calibrate_channels", "record_trace", "replay_grid", "rule_dict", "signal_histogram", "within_budget",
    "write_config",
]

STRATEGIES = {"conservative": 0.05, "balanced": 0.15, "aggressive": 0.30}
"""Default max-risk per strategy (``--max-risk`` overrides)."""
DEFAULT_MAX_DELTA_PPL = 0.02
"""The distribution budget: the largest ΔPPL a chosen setting may cost (``--max-delta-ppl`` overrides)."""


def ppl_text(x: float) -> str:
    """A relative perplexity change for people: ``+0.81%``; from +1000% on, the factor (``×4.6e+05``), which
    a percentage with eight digits hides."""
    return f"×{1 + x:.3g}" if abs(x) >= 10 else f"{x:+.2%}"


def measured_text(m: Dict[str, Any], bounded: bool) -> str:
    """``3.86% (bound 4.93%), ΔPPL +0.00% (bound +0.47%)``: a measured setting's risk and ΔPPL for the log."""
    risk = f"{m['measured_risk']:.2%}" + (f" (bound {m['risk_upper_bound']:.2%})" if bounded else "")
    ppl = ppl_text(m["delta_ppl"]) + (f" (bound {ppl_text(m['delta_ppl_upper_bound'])})" if bounded else "")
    return f"{risk}, ΔPPL {ppl}"


ORIGINAL_DEFAULTS = {"tau": 0.98, "consecutive_k": 2, "min_layer": 0, "protect_last": 0, "scope": "cascade"}
"""The V7 defaults of the original SEDAC documents (no protected first token there)."""
DEFAULT_TAUS = (0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.9925, 0.995, 0.9975, 0.999)
DEFAULT_KS = (1, 2, 3)
DEFAULT_PROTECT = (0, 2)
FORMAT_VERSION = 1

Log = Callable[[str], None]


@dataclass
class Grid:
    taus: Sequence[float] = DEFAULT_TAUS
    ks: Sequence[int] = DEFAULT_KS
    min_layers: Optional[Sequence[int]] = None  # default: every ~L/10 layers
    protect: Sequence[int] = DEFAULT_PROTECT
    scopes: Sequence[str] = ("cascade", "per_layer")

    def rules(self, num_layers: int) -> List[sedac_core.MonitorRule]:
        mins = self.min_layers
        if mins is None:
            mins = sorted(set(range(0, num_layers - 1, max(1, num_layers // 10))))
        return [monitor_rule(num_layers, t, k, m, p, scope)
                for scope, p, m, k, t in itertools.product(self.scopes, self.protect, mins, self.ks, self.taus)
                if m + k <= num_layers - p]


@dataclass
class Trace:
    """What replay needs, for the search windows."""

    similarity: np.ndarray  # float32 [tokens, layers]
    safe: Dict[int, np.ndarray]  # protect_last -> uint8 [tokens, layers]
    top1: torch.Tensor
    nll: torch.Tensor


def record_trace(layout: DecoderLayout, windows: torch.Tensor, protect: Sequence[int], batch_size: int,
                 log: Log, protect_first: int = 1) -> Trace:
    """Similarity of the unmodified model, plus forced-exit labels for each protect_last value."""
    L = layout.num_layers
    n, length = windows.shape
    sims: List[torch.Tensor] = []
    safe: Dict[int, np.ndarray] = {}
    if protect:
        t0 = time.perf_counter()
        base, labels = cascade_labels_for(layout, windows, range(L), protect, batch_size,
                                          desc="labels protect_last=" + ",".join(str(p) for p in protect),
                                          on_batch=lambda sl, d: sims.append(torch.stack(d.sims, 1)),
                                          protect_first=protect_first)
        safe = {p: v.numpy() for p, v in labels.items()}
        log(f"  similarity trace and cascade labels for protect_last={','.join(str(p) for p in protect)} in "
            f"{time.perf_counter() - t0:.0f} s")
    else:
        base = teacher_forced(layout, windows, RecordingDecider(L), batch_size, desc="similarity trace",
                              on_batch=lambda sl, d: sims.append(torch.stack(d.sims, 1)))
    sim = torch.cat(sims).view(n, length, L)
    sim[:, :protect_first] = 0.0  # protected first tokens never exit; replay must not count them
    similarity = drop_last_position(sim.reshape(n * length, L), n, length).numpy().astype(np.float32)
    return Trace(similarity, safe, base.top1, base.nll)


def replay_grid(trace: Trace, rules: Sequence[sedac_core.MonitorRule]) -> List[Dict[str, Any]]:
    """sedac_core.replay of every rule; per_layer rows carry the risk estimate of their cascade twin."""
    rows: List[Dict[str, Any]] = []
    by_protect: Dict[int, List[sedac_core.MonitorRule]] = {}
    for r in rules:
        by_protect.setdefault(r.protect_last, []).append(r)
    for p, group in by_protect.items():
        t = sedac_core.Trace.similarity(trace.similarity, safe=trace.safe.get(p), protect_last=p)
        twins = [sedac_core.MonitorRule(r.tau, r.k, r.min_layer, p, "cascade") for r in group]
        table = sedac_core.replay(t, group)
        twin_table = sedac_core.replay(t, twins)
        for i, r in enumerate(group):
            rows.append({"rule": r, "skipped_mlp": float(table["skipped_mlp"][i]),
                         "exit_rate": float(table["exit_rate"][i]),
                         "estimated_risk": float(twin_table["disagreement"][i])})
    return rows


def rule_dict(rule: sedac_core.MonitorRule, protect_first: int = 1) -> Dict[str, Any]:
    return {"tau": float(rule.tau), "consecutive_k": rule.k, "min_layer": rule.min_layer,
            "protect_last": rule.protect_last, "scope": rule.scope, "protect_first": protect_first}


def measure(layout: DecoderLayout, windows: torch.Tensor, rule: sedac_core.MonitorRule, base_top1: torch.Tensor,
            base_nll: torch.Tensor, batch_size: int, confidence: Optional[float] = None,
            protect_first: int = 1) -> Dict[str, Any]:
    """Run the patched model teacher-forced; risk, ΔPPL and skipped work as measured."""
    run = teacher_forced(layout, windows, MonitorDecider(rule, layout.num_layers), batch_size,
                         desc=f"measure {rule.scope} tau={rule.tau} k={rule.k}", protect_first=protect_first)
    L = layout.num_layers
    assert run.row_skips is not None and run.first_skip is not None  # teacher_forced ran with a decider
    q = compared(run, base_top1, base_nll, confidence)
    return {
        **rule_dict(rule),
        **q,
        "skipped_mlp_fraction": float(run.row_skips.sum()) / (q["tokens"] * L),
        "exit_rate": float((run.first_skip < L).double().mean()),
        "per_layer_skip_rate": list(run.stats["per_layer_skip_rate"]) if run.stats else [0.0] * L,
    }


def within_budget(m: Dict[str, Any], max_risk: float, max_delta_ppl: float, bounded: bool) -> bool:
    """Both numbers within budget: the top-1 risk and ΔPPL (their upper bounds when ``bounded``)."""
    risk = m["risk_upper_bound"] if bounded else m["measured_risk"]
    dppl = m["delta_ppl_upper_bound"] if bounded else m["delta_ppl"]
    return risk <= max_risk and dppl <= max_delta_ppl


def candidate_list(rows: Sequence[Dict[str, Any]], max_risk: float) -> List[Dict[str, Any]]:
    """Grid rows worth measuring, from most to least skipped work.

    Replay's risk is optimistic (it treats tokens independently, while an
    exited token also changes what later tokens attend to), so it only
    filters: cascade settings need an estimate within the budget; per-layer
    settings, which skip a subset of their cascade twin's layers, need their
    twin's estimate within twice the budget. Settings with identical replay
    results behave alike and are measured once.
    """
    keep = [r for r in rows if r["skipped_mlp"] > 0 and r["estimated_risk"]
            <= (max_risk if r["rule"].scope == "cascade" else 2 * max_risk)]
    keep.sort(key=lambda r: (-r["skipped_mlp"], r["estimated_risk"]))
    seen, out = set(), []
    for r in keep:
        key = (r["rule"].scope, r["skipped_mlp"], r["estimated_risk"], r["exit_rate"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def measured_search(count: int, passes: Callable[[int], bool], budget: int) -> Optional[int]:
    """The index of the most aggressive candidate that passes, by binary search over ``count`` candidates
    ordered from most to least aggressive, with at most ``budget`` calls of ``passes`` (each one runs
    the model). ``None`` when no measured candidate passed — the caller must then not use any of them.

    Shared by ``sedac-monitor calibrate`` and ``sedac-probes calibrate --model``: measured risk falls
    roughly monotonically along such an order (it is measured, not assumed: a candidate counts only if
    it passed when run)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    lo, hi, best, runs = 0, count - 1, None, 0
    while lo <= hi and runs < budget:
        mid = (lo + hi) // 2
        runs += 1
        if passes(mid):
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return best


BUDGET_NOT_MET = "no setting met the budget (top-1 risk and ΔPPL); exits are disabled"
"""The ``status`` a calibration writes when nothing it measured met the budget."""
NEVER_EXIT = {"tau": NO_EXIT_TAU, "consecutive_k": 1, "min_layer": 0, "protect_last": 0, "scope": "cascade"}
"""An exit rule that never exits (tau above any similarity)."""
CHANNELS_NOT_MET = "no channel sparsity met the budget (top-1 risk and ΔPPL); every channel is computed"


def calibrate(model_dir: Any, text_file: Any, strategy: str = "balanced", max_risk: Optional[float] = None,
              confidence: Optional[float] = None, tokens: int = 4096, max_length: int = 512, batch_size: int = 4,
              budget: int = 8, grid: Optional[Grid] = None, log: Log = print,
              model_and_tokenizer: Any = None, protect_first: int = 1,
              max_delta_ppl: float = DEFAULT_MAX_DELTA_PPL, channels: bool = False,
              signal_weight: float = 0.0) -> Dict[str, Any]:
    """Search, measure and return the ``sedac_config.json`` content (see module docstring).

    ``channels``: spend the budget on channel soft exit instead of exits (see
    :mod:`sedac_monitor.sparsity`): the config's exit rule never exits and its ``channels`` object holds the
    per-layer thresholds chosen; ``signal_weight`` > 0 scales each token's thresholds by SEDAC's signal."""
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if max_risk is None:
        max_risk = STRATEGIES[strategy]
    if not (0.0 <= max_risk < 1.0) or max_risk != max_risk:
        raise InputError(f"--max-risk must be in [0, 1), got {max_risk}")
    if not (max_delta_ppl >= 0.0 and math.isfinite(max_delta_ppl)):
        raise InputError(f"--max-delta-ppl must be a finite number >= 0, got {max_delta_ppl}")
    if confidence is not None and not (0.0 < confidence < 1.0):
        raise InputError(f"--confidence must be in (0, 1), got {confidence}")
    if budget < 1:
        raise InputError(f"--budget must be >= 1, got {budget}")
    if tokens < max_length:
        raise InputError(f"--tokens ({tokens}) must be at least --max-length ({max_length})")
    t_start = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_model(model_dir)
    layout = find_layout(model)
    L = layout.num_layers
    text = read_text(text_file)
    windows = token_windows(tokenizer, text, max_length, samples=max(1, tokens // max_length), source=str(text_file))
    if confidence is not None:
        if windows.shape[0] < 2:
            raise InputError(f"--confidence splits the text in two; {text_file} gives only one window of "
                             f"{max_length} tokens (lower --max-length or raise --tokens)")
        search_sl, certify_sl = split_windows(windows.shape[0], 0.5)
        search, certify = windows[search_sl], windows[certify_sl]
    else:
        search = certify = windows
    if channels:
        return _channel_config(layout, model_dir, text_file, search, certify, strategy, max_risk, max_delta_ppl,
                               confidence, budget, batch_size, protect_first, log, t_start, signal_weight)
    grid = grid or Grid()
    rules = grid.rules(L)
    log(f"calibrating {type(model).__name__} ({L} layers) on {text_file}: {search.numel()} search tokens, "
        f"{certify.numel()} measurement tokens, {len(rules)} grid settings, max risk {max_risk:.3f}, "
        f"max ΔPPL {max_delta_ppl:+.2%}")
    trace = record_trace(layout, search, sorted(set(grid.protect)), batch_size, log, protect_first)
    rows = replay_grid(trace, rules)

    if certify is search:
        base_top1, base_nll = trace.top1, trace.nll
    else:
        base = teacher_forced(layout, certify, None, batch_size, desc="unmodified (measurement text)")
        base_top1, base_nll = base.top1, base.nll

    candidates = candidate_list(rows, max_risk)
    level = None if confidence is None else 1.0 - (1.0 - confidence) / budget
    measured: List[Dict[str, Any]] = []

    def passes(index: int) -> bool:
        row = candidates[index]
        m = measure(layout, certify, row["rule"], base_top1, base_nll, batch_size, level, protect_first)
        m["replay_skipped_mlp"] = row["skipped_mlp"]
        m["replay_estimated_risk"] = row["estimated_risk"]
        m["passes"] = within_budget(m, max_risk, max_delta_ppl, level is not None)
        measured.append(m)
        log(f"  {m['scope']:9s} tau={m['tau']:<7g} K={m['consecutive_k']} min_layer={m['min_layer']:<2d} "
            f"protect_last={m['protect_last']}: skipped {m['skipped_mlp_fraction']:.2%}, risk "
            f"{measured_text(m, bool(level))} -> {'ok' if m['passes'] else 'over budget'}")
        return m["passes"]

    # candidates run from most to least skipped work
    found = measured_search(len(candidates), passes, budget)
    passing = [m for m in measured if m["passes"]]
    # the original documents' defaults as they define them: no protected first token
    original = measure(layout, certify, monitor_rule(L, **ORIGINAL_DEFAULTS), base_top1, base_nll, batch_size,
                       confidence, protect_first=0)
    if found is not None:
        best = max(passing, key=lambda m: (m["skipped_mlp_fraction"], -m["measured_risk"]))
        chosen = rule_dict(monitor_rule(L, best["tau"], best["consecutive_k"], best["min_layer"],
                                        best["protect_last"], best["scope"]), protect_first)
        status = "ok"
    else:
        # nothing met the budget: a setting that never exits, so that using the file is safe
        best = None
        chosen = {**NEVER_EXIT, "protect_first": protect_first}
        status = BUDGET_NOT_MET
    # what the setting would gain on this machine: the MLP's cost and the forward's time, measured here
    log("timing the MLP and the forward on this machine (expected speed-up) ...")
    costs = measure_model(layout)
    for m in measured + [original]:
        m["expected_speedup"] = expected_speedups(costs, m["per_layer_skip_rate"])
    expected = best["expected_speedup"] if best is not None else {k: 1.0 for k in original["expected_speedup"]}
    advice = recommendation(expected, [m for m in measured if not m["passes"]])
    log(advice)
    histogram = signal_histogram(trace.similarity, int(chosen["min_layer"]))
    correction = online_correction(layout, certify, best, batch_size, protect_first, log)
    return {
        "format": "sedac_config",
        "format_version": FORMAT_VERSION,
        **chosen,
        "strategy": strategy,
        "max_risk": max_risk,
        "max_delta_ppl": max_delta_ppl,
        "confidence": confidence,
        "status": status,
        "model": {**model_identity(model), "path": str(model_dir)},
        "evidence": {
            **_evidence_head(text_file, int(trace.top1.numel()), int(base_top1.numel())),
            "chosen": best,
            "measured": measured,
            "original_defaults": original,
            "grid_settings": len(rules),
            # what the similarity signal looks like on this text (sedac-vllm's drift detector compares with it)
            "signal_histogram": histogram,
            # the chosen setting's measured top-1 errors over what a first-order shadow check counts on the
            # same text: sedac-vllm's online calibration scales its estimate by the factor
            "online_correction": correction,
            # expected speed-up of the chosen setting on the machine that calibrated (prefill of 512 tokens,
            # decode at batch 1/4/16/64), from its per-layer skip rates and the MLP and forward times measured
            "expected_speedup": expected,
            "recommendation": advice,
            "mlp_cost": costs["cost"].to_json(),
            "forward_seconds": costs["forward_seconds"],
            "seconds": round(time.perf_counter() - t_start, 1),
        },
    }


def online_correction(layout: DecoderLayout, windows: torch.Tensor, best: Optional[Dict[str, Any]],
                      batch_size: int, protect_first: int, log: Log) -> Optional[Dict[str, Any]]:
    """What sedac-vllm's online estimate needs to track the measured risk of the chosen setting.

    A first-order shadow check (add a token's skipped MLP outputs back to its own final stream) sees only
    damage to the exiting token itself; most of the measured top-1 errors fall on later tokens, through
    attention to the exited tokens' altered states (on SmolLM2: one of 14). So the online estimate is the
    larger of the shadow check's and the traffic's exit fraction x ``errors_per_exit``, the measured top-1
    errors per exiting token of the chosen setting on ``windows``. None when nothing was chosen (a setting
    that never exits has nothing to estimate)."""
    if best is None:
        return None
    rule = monitor_rule(layout.num_layers, best["tau"], best["consecutive_k"], best["min_layer"],
                        best["protect_last"], best["scope"])
    counts = first_order_changes(layout, windows, MonitorDecider(rule, layout.num_layers), batch_size, protect_first)
    errors = int(best["errors"])
    per_exit = errors / counts["exited"] if counts["exited"] else None
    log(f"online estimate: {errors} top-1 errors measured, {counts['exited']} of {counts['tokens']} tokens exited, "
        f"a first-order check sees {counts['changed']} -> " + (f"{per_exit:.2f} errors per exit" if per_exit is not None
                                                              else "no exits"))
    return {"tokens": counts["tokens"], "exited": counts["exited"], "first_order_changed": counts["changed"],
            "measured_errors": errors, "errors_per_exit": per_exit}


def _evidence_head(text_file: Any, search_tokens: int, measurement_tokens: int) -> Dict[str, Any]:
    return {
        "text": str(text_file),
        "text_sha256": hashlib.sha256(Path(text_file).read_bytes()).hexdigest(),
        "search_tokens": search_tokens,
        "measurement_tokens": measurement_tokens,
        "risk_definition": "fraction of tokens whose teacher-forced top-1 differs from the unmodified model",
        "delta_ppl_definition": "perplexity of the text's next tokens, teacher-forced, over the unmodified "
                                "model's, minus 1",
    }


def _channel_config(layout: DecoderLayout, model_dir: Any, text_file: Any, search: torch.Tensor,
                    certify: torch.Tensor, strategy: str, max_risk: float, max_delta_ppl: float,
                    confidence: Optional[float], budget: int, batch_size: int, protect_first: int, log: Log,
                    t_start: float, signal_weight: float) -> Dict[str, Any]:
    """``calibrate(channels=True)``: channel soft exit within the budget, exits off."""
    log(f"calibrating channel soft exit ({layout.num_layers} layers) on {text_file}: {search.numel()} search "
        f"tokens, {certify.numel()} measurement tokens, max risk {max_risk:.3f}, max ΔPPL {max_delta_ppl:+.2%}")
    base = teacher_forced(layout, certify, None, batch_size, desc="unmodified (measurement text)")
    chosen, measured = calibrate_channels(layout, search, certify, base.top1, base.nll, max_risk, max_delta_ppl,
                                          budget, confidence, batch_size, log, signal_weight)
    best = None
    if chosen is not None:
        best = max((m for m in measured if m["passes"]), key=lambda m: m["mlp_work_saved"])
        advice = (f"channel soft exit within budget skips {best['mlp_work_saved']:.1%} of MLP FLOPs (at one "
                  "token per forward, as much of the MLP weights read); the masked path computes the dense "
                  "matrices, so time is saved only by a kernel that reads the active channels' weights alone")
    else:
        advice = ("no channel sparsity met the budget on this text: a looser --max-risk/--max-delta-ppl or a "
                  "bigger model would be needed")
    log(advice)
    return {
        "format": "sedac_config",
        "format_version": FORMAT_VERSION,
        **NEVER_EXIT,
        "protect_first": protect_first,
        "strategy": strategy,
        "max_risk": max_risk,
        "max_delta_ppl": max_delta_ppl,
        "confidence": confidence,
        "status": "ok" if chosen is not None else CHANNELS_NOT_MET,
        "model": {**model_identity(layout.model), "path": str(model_dir)},
        **({"channels": chosen.to_json()} if chosen is not None else {}),
        "evidence": {
            **_evidence_head(text_file, int(search.numel()), int(base.top1.numel())),
            "selection": "per-token magnitude thresholds per layer on the MLP input and the down projection's "
                         "input; levels allocated greedily across layers by output error per FLOP"
                         + (f"; thresholds scaled per token by the stream distance (signal weight {signal_weight})"
                            if signal_weight else ""),
            "chosen": best,
            "measured": measured,
            "recommendation": advice,
            "seconds": round(time.perf_counter() - t_start, 1),
        },
    }


def calibrate_channels(layout: DecoderLayout, search: torch.Tensor, certify: torch.Tensor,
                       base_top1: torch.Tensor, base_nll: torch.Tensor, max_risk: float, max_delta_ppl: float,
                       budget: int = 8, confidence: Optional[float] = None, batch_size: int = 4,
                       log: Callable[[str], None] = print, weight: float = 0.0
                       ) -> Tuple[Optional[ChannelSparsity], List[Dict[str, Any]]]:
    """The channel sparsity that saves the most MLP work with the measured top-1 risk and ΔPPL on
    ``certify`` within budget (their upper bounds, Bonferroni over ``budget`` measurements, when
    ``confidence`` is given); ``None`` when no measured candidate passed. Returns it and every measurement."""
    _, candidates = channel_path(layout, search, batch_size, weight=weight)
    level = None if confidence is None else 1.0 - (1.0 - confidence) / budget
    measured: List[Dict[str, Any]] = []

    def passes(index: int) -> bool:
        s = candidates[index]
        m = measure_channels(layout, certify, s, base_top1, base_nll, batch_size, level,
                             desc=f"measure channels {s.mlp_work_saved:.0%}")
        m["passes"] = within_budget(m, max_risk, max_delta_ppl, level is not None)
        m["candidate"] = index
        measured.append(m)
        log(f"  channels at {s.mlp_work_saved:.1%} of MLP work: saved {m['mlp_work_saved']:.2%}, risk "
            f"{measured_text(m, bool(level))} -> {'ok' if m['passes'] else 'over budget'}")
        return bool(m["passes"])

    found = measured_search(len(candidates), passes, budget)
    return (candidates[found] if found is not None else None), measured


SIGNAL_EDGES = tuple([0.0] + [round(0.9 + 0.0025 * i, 4) for i in range(41)])
"""Histogram bins of the similarity signal: [0, 0.9) and 40 bins of 0.0025 up to 1.0."""


def signal_histogram(similarity: np.ndarray, min_layer: int) -> Dict[str, Any]:
    """Counts of the similarity signal at layers >= ``min_layer`` of the tokens that may exit (protected
    tokens carry zeros in the trace and are left out)."""
    sim = np.asarray(similarity, dtype=np.float64)
    sim = sim[sim.max(axis=1) > 0] if sim.size else sim
    values = sim[:, min_layer:].ravel() if sim.size else sim.ravel()
    values = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    counts, _ = np.histogram(values, bins=np.asarray(SIGNAL_EDGES))
    return {"edges": list(SIGNAL_EDGES), "counts": counts.astype(int).tolist(), "min_layer": int(min_layer)}


def write_config(config: Dict[str, Any], out: Any) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path
