"""Watching SEDAC while it serves: a sampled decision log, and online calibration with drift detection.

Both are off by default and run inside SEDAC's ops (eager Python, once per layer or once per forward),
so they work in vLLM's compiled graph too.

* :class:`DecisionLog` (``SEDAC_DECISION_LOG``): for a sampled fraction of tokens, one JSON line with
  the token's position, id, exit layer and, per layer, the signal, the threshold and (probes) the
  accumulated confidence. The file stops growing at ``decision_log_max_mb`` (a SEDAC_CONFIG setting).
* :class:`OnlineCalibrator` (``SEDAC_ONLINE=1``, monitor mode; the V6.1 roadmap's dual-metric
  calibration):

  - **shadow check**: for a sampled fraction (``shadow_rate``) of rows, every MLP SEDAC skips is
    also computed, without being applied, and summed; at the end of the forward the model's top-1 from
    the served residual stream is compared with the top-1 from that stream plus the skipped MLP outputs.
    It is a first-order estimate (it does not replay how the skipped work would have changed later
    attention inputs), cheap: the extra work is the shadow fraction of the skipped work plus the LM head
    on the checked rows. Its estimate = changed / checked × the fraction of tokens that exit, over a
    window of ``online_window`` checked rows. It sees only damage to the exiting token itself, and most
    top-1 errors fall on later tokens, through attention to the exited ones (on SmolLM2 at the calibrated
    setting the shadow check saw one of 14 measured errors; through vLLM it read 3-8x below the measured
    risk on held-out news). So the **running risk estimate** is the larger of that and the fraction of
    tokens that exit × ``errors_per_exit``, the top-1 errors per exiting token measured by ``sedac-monitor
    calibrate`` for the chosen setting (the config's ``evidence.online_correction``): the exit fraction is
    read on every row, so it tracks the traffic without sampling noise.
  - **threshold control**: when the estimate exceeds ``SEDAC_RISK_TOLERANCE``, tau rises (fewer exits);
    when it is under half the tolerance, tau falls back, never below the calibrated tau (by default online
    calibration only tightens: the estimate is first order and can read low, so it must never make SEDAC
    less safe than the offline calibration) and never above 1. ``online_margin`` > 0 lets tau go that
    far below the calibrated value: a throughput option, taken on an estimate whose error is not bounded.
  - **drift detection**: the histogram of the similarity signal of recent tokens is compared with the
    calibration text's (written by ``sedac-monitor calibrate`` into ``sedac_config.json``) by KL
    divergence, once it holds ``DRIFT_SIGNALS_PER_BIN`` signals per bin and half the signals it spans
    (:func:`drift_min_signals`: a young histogram is noise); above
    ``drift_threshold`` SEDAC falls back to no exits until the divergence drops below half of it.

Every state change is logged; the statistics file (and so ``/metrics``) carries the running estimate,
the drift score, the current tau and the number of fallbacks.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from sedac_monitor.api import NO_EXIT_TAU

logger = logging.getLogger("sedac_vllm")

EPS = 1e-4
# The recent histogram is compared once it holds this many signals per bin: a sample of n signals drawn from
# the calibration text's own distribution over B bins has an expected KL of about (B - 1) / (2n) from it,
# under 0.01 here, a tenth of the default drift_threshold; a younger histogram would be noise.
DRIFT_SIGNALS_PER_BIN = 50
# ... and half of what it spans (it decays over online_window x 30 signals): one sequence's signals are
# alike, so a histogram of a few sequences is young whatever its count. With only the count above, held-out
# news served through vLLM tripped the detector on its first prompts (KL over 0.1, then 0.02-0.04 once a
# few thousand tokens were in).
DRIFT_SPAN_FRACTION = 0.5


def drift_min_signals(bins: int, window: int) -> float:
    """Signals the recent histogram must hold before it is compared with the calibration text's."""
    return max(DRIFT_SIGNALS_PER_BIN * bins, DRIFT_SPAN_FRACTION * window * 30.0)


class DecisionLog:
    """Sampled, size-bounded per-token decision records as JSON lines, never a partial one: each forward's
    records are one ``write`` on a file opened for appending (the kernel appends it whole, so a process
    killed between forwards leaves whole lines); a write the disk cut short is truncated back, and a torn
    last line found at start (a crash of something else writing there) is cut off, with a warning."""

    def __init__(self, path: str, rate: float, max_bytes: int, seed: int = 0) -> None:
        self.path, self.rate, self.max_bytes = path, float(rate), int(max_bytes)
        self.rng = np.random.default_rng(seed)
        self.written = _whole_lines(path)
        self.full = self.written >= self.max_bytes
        self.records = 0

    def write(self, forward: int, positions: torch.Tensor, tokens: Optional[torch.Tensor], first_skip: torch.Tensor,
              signals: Optional[np.ndarray], signal_layers: List[int], thresholds: List[float],
              confidences: Optional[np.ndarray], num_layers: int, kind: str) -> int:
        """Append records for a sample of this forward's rows; returns how many were written."""
        if self.full:
            return 0
        rows = positions.shape[0]
        picked = np.flatnonzero(self.rng.random(rows) < self.rate)
        if picked.size == 0:
            return 0
        pos = positions.reshape(-1).tolist()
        tok = tokens.reshape(-1).tolist() if tokens is not None and tokens.numel() == rows else None
        first = first_skip.tolist()
        lines = []
        for r in picked.tolist():
            layers = []
            for j, layer in enumerate(signal_layers):
                entry: Dict[str, Any] = {"layer": layer, "signal": _num(signals[r, j]) if signals is not None else None,
                                         "threshold": thresholds[j] if j < len(thresholds) else thresholds[-1]}
                if confidences is not None:
                    entry["confidence"] = _num(confidences[r, j])
                layers.append(entry)
            exit_layer = first[r] - 1 if first[r] < num_layers else None
            lines.append(json.dumps({"forward": forward, "pos": pos[r], "tok": None if tok is None else tok[r],
                                     "kind": kind, "decision": "exit" if exit_layer is not None else "stay",
                                     "exit_layer": exit_layer, "layers": layers}))
        data = "\n".join(lines) + "\n"
        if self.written + len(data) > self.max_bytes:
            self.full = True
            logger.warning("SEDAC decision log %s reached its size bound (%d bytes); no more records",
                           self.path, self.max_bytes)
            return 0
        raw = data.encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            done = os.write(fd, raw)
            if done != len(raw):  # the disk took part of it: take that back, write no more
                os.ftruncate(fd, start)
                self.full = True
                logger.warning("SEDAC decision log %s: a write was cut short (%d of %d bytes; disk full?); "
                               "it was taken back and no more records are written", self.path, done, len(raw))
                return 0
        finally:
            os.close(fd)
        self.written += len(raw)
        self.records += len(lines)
        return len(lines)


def _whole_lines(path: str) -> int:
    """The size of ``path`` once a torn last line (no newline at its end) is cut off; 0 if it is missing."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return size  # whole lines: nothing more to read (the log may be large)
        fh.seek(0)
        keep = fh.read().rfind(b"\n") + 1
        logger.warning("SEDAC decision log %s ended in a partial line (%d bytes); cut off", path, size - keep)
        fh.truncate(keep)
    return keep


def _num(x: Any) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """KL(p || q) of two histograms over the same bins: each normalised, then smoothed by EPS per bin (never
    infinite; histograms of the same shape at any scale give 0)."""
    return float(np.sum((p := _smoothed(p_counts)) * np.log(p / _smoothed(q_counts))))


def _smoothed(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    c = (c / total if total > 0 else np.full(c.shape, 1.0 / c.size)) + EPS
    return c / c.sum()


def risk_estimate(changed: float, checked: float, exit_fraction: float,
                  errors_per_exit: Optional[float]) -> Optional[float]:
    """The online risk estimate: the larger of the shadow check's (changed / checked shadow rows x the
    fraction of rows that exit) and the exit fraction x ``errors_per_exit``, at most 1; None with neither."""
    if checked <= 0 and errors_per_exit is None:
        return None
    shadow = changed / checked * exit_fraction if checked > 0 else 0.0
    propagated = exit_fraction * errors_per_exit if errors_per_exit is not None else 0.0
    return min(1.0, max(shadow, propagated))


class OnlineCalibrator:
    """Shadow-checked risk estimate, bounded tau control and drift fallback for the V7 monitor."""

    def __init__(self, tau_t: torch.Tensor, tau: float, tolerance: float, shadow_rate: float, window: int,
                 margin: float, drift_threshold: float, histogram: Optional[Dict[str, Any]], min_layer: int,
                 seed: int = 0, tau_increment: float = 0.0005, errors_per_exit: Optional[float] = None) -> None:
        self.tau_t, self.tau_calibrated = tau_t, float(tau)
        self.tau = float(tau)
        if margin > 0:
            logger.warning("SEDAC online calibration may loosen tau to %.4f, %.4f below the calibrated %.4f "
                           "(serving.online_margin): a throughput option; its first-order risk estimate can read "
                           "low, so this can be less safe than the offline calibration", max(0.0, tau - margin),
                           margin, tau)
        self.lo, self.hi = max(0.0, self.tau - margin), 1.0
        self.tolerance, self.shadow_rate, self.window = float(tolerance), float(shadow_rate), int(window)
        self.drift_threshold, self.min_layer = float(drift_threshold), int(min_layer)
        self.tau_increment = float(tau_increment)
        self.errors_per_exit = None if errors_per_exit is None else float(errors_per_exit)
        if self.errors_per_exit is None:
            logger.warning("SEDAC online calibration: the config carries no errors_per_exit (recalibrate with "
                           "sedac-monitor calibrate), so the estimate is the shadow check's alone, which reads low "
                           "(it misses the damage exits do to later tokens)")
        self.generator = torch.Generator(device="cpu").manual_seed(seed)  # same draws on every TP rank
        self.edges = np.asarray(histogram["edges"], dtype=np.float64) if histogram else None
        self.reference = np.asarray(histogram["counts"], dtype=np.float64) if histogram else None
        if histogram is None:
            logger.warning("SEDAC online calibration: the config carries no signal histogram (recalibrate with "
                           "sedac-monitor calibrate), so drift detection is off")
        self.recent = None if self.edges is None else np.zeros(len(self.edges) - 1)
        self.checked = self.changed = 0.0  # decayed counts over about `window` checked rows
        # the same, undecayed, with the rows behind the exit fraction: the estimator's value over any span of
        # traffic is (changed / checked) x (exited / rows) of that span's differences (the benchmark's windows)
        self.totals = {"rows": 0, "exited_rows": 0, "checked_rows": 0, "changed_rows": 0}
        self.exit_fraction = 0.0  # exited / rows, decayed over about `window` rows
        self._rows = self._exited = 0.0
        self.risk_estimate: Optional[float] = None
        self.drift_kl: Optional[float] = None
        self.fallback = False
        self.fallbacks = 0
        self.adjustments = 0
        self._sampled: Optional[torch.Tensor] = None
        self._delta: Optional[torch.Tensor] = None
        self._touched: Optional[torch.Tensor] = None

    # -- inside sedac::skip_mlp ----------------------------------------------------
    def shadow(self, layer: int, flat: torch.Tensor, skip: torch.Tensor, full: Callable) -> None:
        """Compute, without applying, the MLP of sampled rows that skip this layer."""
        rows = flat.shape[0]
        if self._sampled is None or self._sampled.shape[0] != rows:
            self._sampled = (torch.rand(rows, generator=self.generator) < self.shadow_rate).to(flat.device)
            self._delta = torch.zeros_like(flat, dtype=torch.float32)
            self._touched = torch.zeros(rows, dtype=torch.bool, device=flat.device)
        idx = (skip & self._sampled).nonzero().squeeze(1)
        if idx.numel():
            assert self._delta is not None and self._touched is not None  # made with _sampled
            self._delta.index_add_(0, idx, full(flat.index_select(0, idx)).float())
            self._touched[idx] = True

    # -- inside sedac::finish --------------------------------------------------------
    def end_forward(self, stream: torch.Tensor, first_skip: torch.Tensor, num_layers: int,
                    signals: Optional[np.ndarray], final_norm: Callable, compute_logits: Callable,
                    counted: bool) -> None:
        delta, touched = self._delta, self._touched
        self._sampled = self._delta = self._touched = None
        if not counted:
            return
        rows = first_skip.shape[0]
        if rows:
            n_exited = int((first_skip < num_layers).sum())
            keep = max(0.0, 1.0 - rows / self.window)  # weighted by rows: a prefill counts as its tokens
            self._rows = self._rows * keep + rows
            self._exited = self._exited * keep + n_exited
            self.exit_fraction = self._exited / self._rows
            self.totals["rows"] += rows
            self.totals["exited_rows"] += n_exited
        if touched is not None and bool(touched.any()):
            idx = touched.nonzero().squeeze(1)
            served = stream.index_select(0, idx)
            assert delta is not None  # made with touched
            full = served.float() + delta.index_select(0, idx)
            with torch.no_grad():
                top_served = compute_logits(final_norm(served)).argmax(-1)
                top_full = compute_logits(final_norm(full.to(served.dtype))).argmax(-1)
            n, changed = float(idx.numel()), float((top_served != top_full).sum())
            keep = max(0.0, 1.0 - n / self.window)
            self.checked = self.checked * keep + n
            self.changed = self.changed * keep + changed
            self.totals["checked_rows"] += int(n)
            self.totals["changed_rows"] += int(changed)
        if self.checked > 0 or self.errors_per_exit is not None:
            self.risk_estimate = risk_estimate(self.changed, self.checked, self.exit_fraction, self.errors_per_exit)
        if signals is not None and self.edges is not None and signals.size:
            s = signals[:, self.min_layer:] if signals.shape[1] > self.min_layer else signals
            counts, _ = np.histogram(np.clip(s[np.isfinite(s)], self.edges[0], self.edges[-1]), bins=self.edges)
            keep = max(0.0, 1.0 - counts.sum() / (self.window * 30.0))
            self.recent = self.recent * keep + counts
            if self.recent.sum() >= drift_min_signals(self.recent.size, self.window):
                assert self.reference is not None  # read from the histogram with edges
                self.drift_kl = kl_divergence(self.recent, self.reference)
        self._control()

    def _control(self) -> None:
        if self.drift_kl is not None:
            if not self.fallback and self.drift_kl > self.drift_threshold:
                self.fallback = True
                self.fallbacks += 1
                logger.warning("SEDAC drift detected: KL %.3f > %.3f between recent and calibration signal "
                               "histograms; exits disabled until it drops below %.3f", self.drift_kl,
                               self.drift_threshold, self.drift_threshold / 2)
            elif self.fallback and self.drift_kl < self.drift_threshold / 2:
                self.fallback = False
                logger.warning("SEDAC drift over (KL %.3f): exits enabled again at tau %.4f", self.drift_kl, self.tau)
        if self.risk_estimate is not None and (self.checked >= min(self.window, 50) or (
                self.errors_per_exit is not None and self.totals["rows"] >= self.window)):
            if self.risk_estimate > self.tolerance and self.tau < self.hi:
                self.tau = min(self.hi, self.tau + 2 * self.tau_increment)
                self.adjustments += 1
            elif self.risk_estimate < self.tolerance / 2 and self.tau > self.lo:
                self.tau = max(self.lo, self.tau - self.tau_increment)
                self.adjustments += 1
        self.tau_t.fill_(NO_EXIT_TAU if self.fallback else self.tau)

    def stats(self) -> Dict[str, Any]:
        return {"risk_estimate": self.risk_estimate, "checked_rows": self.checked, "changed_rows": self.changed,
                "tolerance": self.tolerance, "drift_kl": self.drift_kl, "drift_threshold": self.drift_threshold,
                "fallback": self.fallback, "fallbacks": self.fallbacks, "tau": self.tau,
                "tau_calibrated": self.tau_calibrated, "tau_bounds": [self.lo, self.hi],
                "adjustments": self.adjustments, "totals": dict(self.totals), "errors_per_exit": self.errors_per_exit}
