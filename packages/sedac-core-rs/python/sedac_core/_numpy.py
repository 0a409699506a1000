"""The numpy backend: the same kernels as ``sedac_core._native``, same signatures.

Every float operation is written in the same order and precision as the Rust
code (float32 throughout, no fused multiply-add, quantiles interpolated in
float64), so that decisions agree bit for bit. Keep the two in step: the
property tests in ``tests/test_parity.py`` compare them on generated inputs.
"""

from __future__ import annotations

import threading

import numpy as np

MIN_THRESHOLD = np.float32(1e-6)
_F32 = np.float32


def _check_out(name, arr, dtype, ndim):
    if (
        not isinstance(arr, np.ndarray)
        or arr.dtype != dtype
        or arr.ndim != ndim
        or not arr.flags.c_contiguous
    ):
        raise TypeError(f"{name}: expected a C-contiguous {ndim}-D {np.dtype(dtype).name} array")
    if not arr.flags.writeable:
        raise ValueError(f"{name}: output array is read-only")


def clamp01(x):
    """Clamp to [0, 1], keeping NaN (as the Rust code: both comparisons fail)."""
    return np.where(x < 0, _F32(0), np.where(x > 1, _F32(1), x)).astype(_F32)


def _accumulate(risk, thresholds, weights, decay, adaptive=None):
    """C_i = C_{i-1} * gamma_i + ((thr_i - r_i) / thr_i) * w_i for every column; gamma_i = decay, or with
    ``adaptive = (bonus, history)``: clamp01(decay * (1 - clamp01(r_i / thr_i * 0.5)) * (1 + bonus * history))."""
    n, c = risk.shape
    conf = np.empty((n, c), dtype=_F32)
    acc = np.zeros(n, dtype=_F32)
    with np.errstate(all="ignore"):
        for i in range(c):
            local = (thresholds[i] - risk[:, i]) / thresholds[i]
            if adaptive is None:
                gamma = decay
            else:
                bonus, history = adaptive
                u = clamp01(risk[:, i] / thresholds[i] * _F32(0.5))
                gamma = clamp01(decay * (_F32(1) - u) * (_F32(1) + bonus * history))
            acc = acc * gamma + local * weights[i]
            conf[:, i] = acc
    return conf


def _first_true(hits):
    """Index of the first True per row, -1 where none (int32)."""
    if hits.shape[1] == 0:
        return np.full(hits.shape[0], -1, dtype=np.int32)
    first = np.argmax(hits, axis=1).astype(np.int32)
    first[~hits.any(axis=1)] = -1
    return first


def _exit_checkpoint(risk, thresholds, targets, conf, rule_code):
    if rule_code == 0:
        hits = risk < thresholds[None, :]
    elif rule_code == 1:
        hits = conf >= targets[None, :]
    else:
        raise ValueError(f"unknown rule code {rule_code}")
    return _first_true(hits)


def skip_fraction(conf, k=4.0):
    """1 / (1 + exp(0.5k - kC)) (k = 4: tanh(2C - 1) * 0.5 + 0.5); zero unless C > 0."""
    k = _F32(k)
    with np.errstate(all="ignore"):
        ratio = _F32(1) / (_F32(1) + np.exp(_F32(0.5) * k - k * conf))
    return np.where(conf > 0, ratio, _F32(0)).astype(_F32)


def evaluate(risk, thresholds, targets, weights, decay, rule_code, soft, soft_k, adaptive_decay, decay_bonus,
             history, out_exit, out_conf, out_soft):
    decay = _F32(decay)
    adaptive = (_F32(decay_bonus), _F32(history)) if adaptive_decay else None
    conf = _accumulate(risk, thresholds, weights, decay, adaptive)
    out_exit[:] = _exit_checkpoint(risk, thresholds, targets, conf, rule_code)
    out_conf[...] = conf
    out_soft[...] = skip_fraction(conf, soft_k) if soft else 0


def _consecutive(similarity, tau, k, min_layer):
    n, layers = similarity.shape
    out = np.full(n, -1, dtype=np.int32)
    run = np.zeros(n, dtype=np.int64)
    for layer in range(min(min_layer, layers), layers):
        run = np.where(similarity[:, layer] >= tau, run + 1, 0)
        out = np.where((out < 0) & (run >= k), np.int32(layer), out)
    return out


def consecutive_exit(similarity, tau, k, min_layer, out):
    if k < 1:
        raise ValueError("consecutive_exit: k must be >= 1")
    out[:] = _consecutive(similarity, _F32(tau), int(k), int(min_layer))


def gated_mlp(x, gate_up, down, t_in, t_mid, out):
    """The masked dense MLP that ``channel::gated_mlp`` computes reading only the kept channels' weights
    (equal up to float rounding: BLAS sums in another order)."""
    for name, arr in (("x", x), ("gate_up", gate_up), ("down", down)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2 or not arr.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous 2-D float32 array")
    _check_out("out", out, np.float32, 2)
    rows, hidden = x.shape
    inter = down.shape[0]
    if out.shape != x.shape or gate_up.shape != (hidden, 2 * inter) or down.shape != (inter, hidden):
        raise ValueError(f"gate_up must be [hidden, 2*inter] = [{hidden}, {2 * inter}] and down [inter, hidden] = "
                         f"[{inter}, {hidden}] (got {list(gate_up.shape)} and {list(down.shape)})")
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and infinities propagate as in the Rust kernel
        keep_in = ~(np.abs(x) < _F32(t_in))
        h = np.where(keep_in, x, _F32(0)) @ gate_up
        g = h[:, :inter]
        a = (g / (_F32(1) + np.exp(-g))) * h[:, inter:]
        keep_mid = ~(np.abs(a) < _F32(t_mid))
        out[:] = np.where(keep_mid, a, _F32(0)) @ down
    return int(keep_in.any(axis=0).sum()), int(keep_mid.any(axis=0).sum())


def quantile_finite(values, q):
    """Linear-interpolation quantile of the finite values, in float64, rounded to float32."""
    finite = np.sort(values[np.isfinite(values)])
    n = finite.size
    if n == 0:
        return _F32(np.nan)
    pos = np.float64(_F32(q)) * np.float64(n - 1)
    lo = min(int(np.floor(pos)), n - 1)
    frac = pos - np.float64(lo)
    a = np.float64(finite[lo])
    b = np.float64(finite[lo + 1]) if lo + 1 < n else a
    return _F32(a + (b - a) * frac)


def quantiles(risk, rates, out):
    if risk.shape[1] != rates.size:
        raise ValueError(f"quantiles: {risk.shape[1]} columns but {rates.size} rates")
    for i in range(rates.size):
        out[i] = quantile_finite(risk[:, i], rates[i])


def ema(old, target, alpha):
    new = (_F32(1) - alpha) * old + alpha * target
    return np.maximum(new, MIN_THRESHOLD)


class ThresholdState:
    """Adaptive thresholds guarded by a lock (the Rust twin uses atomics)."""

    def __init__(self, thresholds, targets, alpha, warmup_observations, adaptive):
        if len(thresholds) != len(targets):
            raise ValueError(f"{len(thresholds)} thresholds but {len(targets)} target exit rates")
        self._thr = np.asarray(thresholds, dtype=_F32).copy()
        self._targets = np.asarray(targets, dtype=_F32)
        self._alpha = _F32(alpha)
        self._warmup_observations = int(warmup_observations)
        self._adaptive = bool(adaptive)
        self._observations = 0
        self._lock = threading.Lock()

    def thresholds(self):
        with self._lock:
            return [float(t) for t in self._thr]

    def set_thresholds(self, values):
        if len(values) != self._thr.size:
            raise ValueError(f"expected {self._thr.size} thresholds, got {len(values)}")
        with self._lock:
            self._thr[:] = np.asarray(values, dtype=_F32)

    @property
    def observations(self):
        return self._observations

    def set_observations(self, observations):
        with self._lock:
            self._observations = int(observations)

    def observe(self, risk):
        c = self._thr.size
        if risk.ndim != 2 or risk.shape[1] != c:
            raise ValueError(f"observe: buffer of {risk.size} values does not split into {c} checkpoints")
        if risk.shape[0] == 0:
            return False
        with self._lock:
            seen = self._observations
            self._observations += 1
        if not self._adaptive or seen < self._warmup_observations:
            return False
        q = np.array([quantile_finite(risk[:, i], self._targets[i]) for i in range(c)], dtype=_F32)
        updated = False
        with self._lock:
            for i in range(c):
                if np.isfinite(q[i]):
                    self._thr[i] = ema(self._thr[i], q[i], self._alpha)
                    updated = True
        return updated


def _skipped_after(layer, num_layers, protect_last):
    """MLP blocks skipped by exiting after ``layer`` (array-valued)."""
    end = max(num_layers - protect_last, 0)
    return np.maximum(end - (layer + 1), 0)


def _record(exit_layer, skipped, label):
    """(exits, skipped layers, unsafe exits) from per-token exit data."""
    exited = (exit_layer >= 0) & (skipped > 0)
    unsafe = 0 if label is None else int(np.count_nonzero(exited & (label == 0)))
    return int(np.count_nonzero(exited)), int(skipped[exited].sum()), unsafe


def _row_labels(safe, positions):
    """safe[t, positions[t]] (0 where positions is -1)."""
    idx = np.maximum(positions, 0).astype(np.intp)
    return safe[np.arange(safe.shape[0]), idx]


def replay_monitor(similarity, safe, tau, k, min_layer, protect_last, per_layer, out_exits, out_skipped, out_unsafe):
    n, layers = similarity.shape
    if layers == 0:
        raise ValueError("replay: the trace has no positions")
    for i in range(tau.size):
        ki, mi, pi = int(k[i]), int(min_layer[i]), int(protect_last[i])
        if ki < 1:
            raise ValueError("replay: k must be >= 1")
        if per_layer[i]:
            end = max(layers - pi, 0)
            run = np.zeros(n, dtype=np.int64)
            skipped = np.zeros(n, dtype=np.int64)
            for j in range(end):
                skipped += run >= ki
                high = similarity[:, j] >= tau[i] if j >= mi else np.zeros(n, dtype=bool)
                run = np.where(high, run + 1, 0)
            exit_layer = np.where(skipped > 0, 0, -1)
            counts = _record(exit_layer, skipped, None)
        else:
            exit_layer = _consecutive(similarity, tau[i], ki, mi)
            skipped = np.where(exit_layer >= 0, _skipped_after(exit_layer, layers, pi), 0)
            label = None if safe is None else _row_labels(safe, exit_layer)
            counts = _record(exit_layer, skipped, label)
        out_exits[i], out_skipped[i], out_unsafe[i] = counts


def replay_probe(risk, safe, layer_of, num_layers, thresholds, targets, weights, decay, rule, protect_last,
                 out_exits, out_skipped, out_unsafe):
    n, c = risk.shape
    if c == 0:
        raise ValueError("replay: the trace has no positions")
    layer_of = np.asarray(layer_of, dtype=np.int64)
    for i in range(decay.size):
        conf = _accumulate(risk, thresholds[i], weights[i], _F32(decay[i]))
        exit_cp = _exit_checkpoint(risk, thresholds[i], targets[i], conf, int(rule[i]))
        exit_layer = np.where(exit_cp >= 0, layer_of[np.maximum(exit_cp, 0)], -1)
        skipped = np.where(exit_cp >= 0, _skipped_after(exit_layer, int(num_layers), int(protect_last[i])), 0)
        label = None if safe is None else _row_labels(safe, exit_cp)
        out_exits[i], out_skipped[i], out_unsafe[i] = _record(exit_cp, skipped, label)


def num_threads():
    return 1


def set_parallel_for(address):
    """No tasks to place: numpy's matmul computes :func:`gated_mlp` (see ``sedac_core.set_parallel_for``)."""


def parallel_for():
    return "numpy"
