"""SEDAC statistics on vLLM's Prometheus ``/metrics``.

The model runs in vLLM's worker process; ``/metrics`` is served by the API
server process. The worker writes its statistics to ``SEDAC_METRICS_FILE``
(JSON, replaced atomically at most five times a second, from a background thread and read on every scrape);
the API server exposes them through a collector registered in
prometheus_client's default registry by :func:`sedac_vllm.plugin.register`.
With several API servers (``--api-server-count > 1``, Prometheus
multiprocess metrics) vLLM serves another registry: read the JSON file instead.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Optional

_installed: Optional[str] = None


def read_stats(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


class SedacCollector:
    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = read_stats(self.path)
        if s is None:
            return
        yield CounterMetricFamily("sedac_tokens", "Tokens that went through SEDAC decisions", value=s["tokens"])
        yield CounterMetricFamily("sedac_skipped_mlp_blocks", "MLP blocks skipped (soft exits count fractionally)",
                                  value=s["skipped_mlp_blocks"])
        yield CounterMetricFamily("sedac_forwards", "Model forward passes seen by SEDAC", value=s["forwards"])
        yield GaugeMetricFamily("sedac_skipped_mlp_fraction", "Skipped MLP blocks / (tokens x layers)",
                                value=s["skipped_mlp_fraction"])
        yield GaugeMetricFamily("sedac_exited_fraction", "Fraction of tokens that skipped at least one MLP",
                                value=s["exited_fraction"])
        rate = GaugeMetricFamily("sedac_layer_skip_rate", "Fraction of tokens whose MLP was skipped, per layer",
                                 labels=["layer"])
        for i, r in enumerate(s["per_layer_skip_rate"]):
            rate.add_metric([str(i)], r)
        yield rate
        exits = CounterMetricFamily("sedac_exits", "Tokens by exit layer (layer before the first skipped MLP)",
                                    labels=["layer"])
        for layer, count in s["exit_layer_histogram"].items():
            exits.add_metric([layer], count)
        yield exits
        online = s.get("online")
        if online:
            for name, key, doc in (
                    ("sedac_online_risk_estimate", "risk_estimate", "Shadow-checked estimate of the top-1 risk"),
                    ("sedac_online_tau", "tau", "Current V7 tau under online calibration"),
                    ("sedac_drift_kl", "drift_kl", "KL divergence of recent vs calibration signal histograms"),
                    ("sedac_drift_fallback", "fallback", "1 while drift has disabled exits")):
                if online.get(key) is not None:
                    yield GaugeMetricFamily(name, doc, value=float(online[key]))
            yield CounterMetricFamily("sedac_drift_fallbacks", "Times drift disabled exits",
                                      value=online.get("fallbacks", 0))
            yield CounterMetricFamily("sedac_online_checked_rows", "Rows shadow-checked (decayed window)",
                                      value=online.get("checked_rows", 0.0))
        if "thresholds" in s:
            thr = GaugeMetricFamily("sedac_threshold", "Current probe risk threshold", labels=["layer"])
            for layer, t in zip(s["probe_layers"], s["thresholds"]):
                thr.add_metric([str(layer)], t)
            yield thr


def install_collector(path: str) -> None:
    """Register the collector in prometheus_client's default registry (once per process)."""
    global _installed
    if _installed is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # prometheus_client comes with vLLM; without it there is no /metrics to serve
        return
    REGISTRY.register(SedacCollector(path))
    _installed = path
