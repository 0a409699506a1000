"""SEDAC's custom ops for vLLM's compiled graphs, registered when this module is imported.

:func:`sedac_vllm.plugin.register` imports it when ``SEDAC_ENABLED=1``, before vLLM builds or
traces the model, so no op is ever registered while a graph is traced.

* ``sedac::skip_mlp(x, skip, keep, key, layer) -> Tensor`` (defined in
  :mod:`sedac_monitor.runtime`, shared with the HF runtime): one layer's MLP with the plan applied.
  Its output feeds the residual stream, so the compiler keeps it.
* ``sedac::finish(counter!, stream, positions, risk, signals, conf, first, row_skips, skipped, full, key)
  -> ()``: end of a forward, with the per-row and per-layer results the graph kept —
  statistics, trace, adaptive thresholds, decision log, online calibration. It has no output anyone
  uses, so it declares a mutation of ``counter`` (a one-element tensor: the forward count), which
  dead-code elimination must keep; and it reads the residual stream after the last layer, so it runs
  after every MLP of the forward. ``risk`` / ``signals`` / ``conf`` are empty unless a feature reads them.
"""

from __future__ import annotations

import torch

from sedac_monitor.runtime import register_op  # sedac-monitor defines sedac::skip_mlp on import

from . import runtime as rt_mod

SPLITTING_OPS = ["sedac::skip_mlp", "sedac::finish"]
"""The ops vLLM's piecewise (GPU) compilation must split the graph at: they run eagerly, between
CUDA-graph pieces, because their work depends on the data."""


def _finish(counter: torch.Tensor, stream: torch.Tensor, positions: torch.Tensor, risk: torch.Tensor,
            signals: torch.Tensor, conf: torch.Tensor, first: torch.Tensor, row_skips: torch.Tensor,
            skipped: torch.Tensor, full: torch.Tensor, key: str) -> None:
    rt_mod.get(key).end_of_forward(positions, risk if risk.numel() else None, stream, signals, conf,
                                   (first, row_skips, skipped, full))
    counter += 1


def _finish_fake(counter, stream, positions, risk, signals, conf, first, row_skips, skipped, full, key):
    return None


register_op("finish", "(Tensor(a!) counter, Tensor stream, Tensor positions, Tensor risk, Tensor signals, "
            "Tensor conf, Tensor first, Tensor row_skips, Tensor skipped, Tensor full, str key) -> ()",
            _finish, _finish_fake)
