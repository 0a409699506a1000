"""``sedac-probes evaluate``: per-layer metrics of trained probes (or a fused gate) on collected data."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from .collect import load_data, load_probes_for
from .fusion import evaluate_fusion
from .train import evaluate_probe

Log = Callable[[str], None]


def evaluate(probe_dir: Any, data_dir: Any, log: Log = print) -> Dict[str, Dict[str, float]]:
    """Per-layer metrics of trained probes on collected data (e.g. a held-out text)."""
    data = load_data(data_dir)
    meta = data["meta"]
    probes = load_probes_for(probe_dir, data)
    if probes.target == "fusion":
        return evaluate_fusion(probe_dir, data_dir, log=log)
    rows = torch.nonzero(data["position"] >= meta.get("protect_first", 0)).squeeze(1)
    out: Dict[str, Dict[str, float]] = {}
    for i, layer in enumerate(probes.layers):
        metrics = evaluate_probe(probes.bank.probe(i), data["hidden"][layer][rows], data["entropy"][layer][rows],
                                 data["cascade_safe"][layer][rows])
        out[str(layer)] = metrics
        log(f"  layer {layer:3d} ({probes.target}) on {meta['text']}: " + ", ".join(
            f"{k} {metrics[k]:.3f}" for k in ("r2", "spearman", "auroc_unsafe") if k in metrics))
    return out
