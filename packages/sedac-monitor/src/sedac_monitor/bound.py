"""Exact binomial (Clopper–Pearson) upper confidence bounds, without scipy."""

from __future__ import annotations

import math


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
