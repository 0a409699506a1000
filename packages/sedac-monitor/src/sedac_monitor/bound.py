"""Upper confidence bounds without scipy: exact binomial (Clopper–Pearson) for the top-1 risk, Student's t over
blocks of tokens for ΔPPL."""

from __future__ import annotations

import math
from typing import Any


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 0.0 if k >= n else -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(errors: int, n: int, confidence: float) -> float:
    """The one-sided upper bound u with P(Binomial(n, u) <= errors) = 1 - confidence.

    If tokens were independent draws and the true risk were above u, seeing
    ``errors`` or fewer errors in ``n`` tokens would happen with probability
    at most ``1 - confidence``.
    """
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n <= 0 or errors < 0 or errors > n:
        raise ValueError(f"need 0 <= errors <= n and n > 0, got errors={errors}, n={n}")
    if errors == n:
        return 1.0
    target = math.log1p(-confidence)
    lo, hi = errors / n, 1.0
    for _ in range(100):  # bisection: the CDF decreases in p
        mid = (lo + hi) / 2
        if _log_binom_cdf(errors, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (p in (0.5, 1)), by bisection on
    the CDF (Simpson's rule on the density)."""
    import numpy as np

    if not (0.5 < p < 1.0) or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        h = x / 4000
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return hi


def delta_ppl_upper(nll: Any, base_nll: Any, confidence: float, block: int = 128) -> float:
    """A one-sided upper confidence bound on ΔPPL = exp(mean(nll) - mean(base_nll)) - 1.

    The paired per-token differences of the negative log-likelihoods (same tokens, patched and unmodified)
    are averaged over blocks of ``block`` consecutive tokens (neighbouring tokens are not independent;
    blocks are treated as if they were), and the bound is Student's t over the block means:
    exp(mean + t(confidence, blocks - 1) * sd / sqrt(blocks)) - 1. Infinite with fewer than two blocks
    (nothing can be certified)."""
    import numpy as np

    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(nll, dtype=np.float64).ravel() - np.asarray(base_nll, dtype=np.float64).ravel()
    blocks = d.size // block
    if blocks < 2:
        return math.inf
    means = d[: blocks * block].reshape(blocks, block).mean(1)
    means[-1] = d[(blocks - 1) * block:].mean()  # the tail joins the last block
    sd = float(means.std(ddof=1))
    if confidence <= 0.5:
        return math.expm1(float(means.mean()))
    return math.expm1(float(means.mean()) + student_t_quantile(confidence, blocks - 1) * sd / math.sqrt(blocks))
