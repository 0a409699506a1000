"""SEDAC's custom ops for vLLM's compiled graphs, registered when this module is imported.

:func:`sedac_vllm.plugin.register` imports it when ``SEDAC_ENABLED=1``, before vLLM builds or
traces the model, so no op is ever registered while a graph is traced.

* ``sedac::skip_mlp(x, skip, keep, key, layer) -> Tensor`` (defined in
  :mod:`sedac_monitor.engine`, shared with the HF runtime): one layer's MLP with the plan applied.
  Its output feeds the residual stream, so the compiler keeps it.
* ``sedac::finish(counter!, last_hidden, positions, risk, key) -> ()``: end of a forward —
  statistics, trace, adaptive thresholds. It has no output anyone uses, so it declares a mutation of
  ``counter`` (a one-element tensor: the forward count), which dead-code elimination must keep; and it
  reads the last layer's output, so it runs after every MLP of the forward.
"""

from __future__ import annotations

import torch

from sedac_monitor.engine import register_op  # importing the engine registers sedac::skip_mlp

from . import runtime as rt_mod

SPLITTING_OPS = ["sedac::skip_mlp", "sedac::finish"]
"""The ops vLLM's piecewise (GPU) compilation must split the graph at: they run eagerly, between
CUDA-graph pieces, because their work depends on the data."""


def _finish(counter: torch.Tensor, last_hidden: torch.Tensor, positions: torch.Tensor, risk: torch.Tensor,
            key: str) -> None:
    rt_mod.get(key).end_of_forward(positions, risk if risk.numel() else None)
    counter += 1


def _finish_fake(counter, last_hidden, positions, risk, key):
    return None


register_op("finish", "(Tensor(a!) counter, Tensor last_hidden, Tensor positions, Tensor risk, str key) -> ()",
            _finish, _finish_fake)
