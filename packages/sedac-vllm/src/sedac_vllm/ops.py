"""SEDAC's custom ops for vLLM's compiled graphs, registered when this module is imported.

:func:`sedac_vllm.plugin.register` imports it when ``SEDAC_ENABLED=1``, before vLLM builds or
traces the model, so no op is ever registered while a graph is traced.

* ``sedac::skip_mlp(x, skip, keep, key, layer) -> Tensor``: one layer's MLP with the plan applied by
  the gather path (:meth:`VllmSedac.gather <sedac_vllm.state.VllmSedac.gather>`: the active rows only).
  Its output feeds the residual stream, so the compiler keeps it.
* ``sedac::channel_mlp(x, key, layer) -> Tensor``: one layer's MLP through channel soft exit's kernel
  (:meth:`VllmSedac.kernel_mlp <sedac_vllm.state.VllmSedac.kernel_mlp>`: reads only the weights of the
  channels some row keeps; CPU only, never in a GPU graph).
* ``sedac::finish(counter!, stream, positions, risk, signals, conf, first, row_skips, skipped, full, key)
  -> ()``: end of a forward, with the per-row and per-layer results the graph kept —
  statistics, trace, adaptive thresholds, decision log, online calibration. It has no output anyone
  uses, so it declares a mutation of ``counter`` (a one-element tensor: the forward count), which
  dead-code elimination must keep; and it reads the residual stream after the last layer, so it runs
  after every MLP of the forward. ``risk`` / ``signals`` / ``conf`` are empty unless a feature reads them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import state as state_mod

LIBRARY = torch.library.Library("sedac", "FRAGMENT")
"""The ``sedac`` op namespace."""


def register_op(name: str, schema: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> None:
    """Define ``sedac::<name>`` with a schema, a CPU/CUDA implementation and a fake (shape) implementation.

    Registered on a ``torch.library.Library`` directly, as vLLM registers its own ops
    (``direct_register_custom_op``): a call costs about 6 µs, against about 23 µs for a
    ``torch.library.custom_op`` (which adds Python wrappers and alias checks on every call). The schema
    declares every mutated argument (``Tensor(a!)``), which is what keeps an op without used outputs from
    being dead-code eliminated.
    """
    LIBRARY.define(f"{name}{schema}")
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sedac::{name}", fake, lib=LIBRARY)


def _skip_mlp(x: torch.Tensor, skip: Optional[torch.Tensor], keep: Optional[torch.Tensor], key: str,
              layer: int) -> torch.Tensor:
    return state_mod.get(key).gather(layer, x, skip, keep)


def _skip_mlp_fake(x, skip, keep, key, layer):
    return torch.empty_like(x)


def _channel_mlp(x: torch.Tensor, key: str, layer: int) -> torch.Tensor:
    return state_mod.get(key).kernel_mlp(layer, x)


def _channel_mlp_fake(x, key, layer):
    return torch.empty_like(x)

SPLITTING_OPS = ["sedac::skip_mlp", "sedac::finish"]
"""The ops vLLM's piecewise (GPU) compilation must split the graph at: they run eagerly, between
CUDA-graph pieces, because their work depends on the data."""


def _finish(counter: torch.Tensor, stream: torch.Tensor, positions: torch.Tensor, risk: torch.Tensor,
            signals: torch.Tensor, conf: torch.Tensor, first: torch.Tensor, row_skips: torch.Tensor,
            skipped: torch.Tensor, full: torch.Tensor, key: str) -> None:
    state_mod.get(key).end_of_forward(positions, risk if risk.numel() else None, stream, signals, conf,
                                   (first, row_skips, skipped, full))
    counter += 1


def _finish_fake(counter, stream, positions, risk, signals, conf, first, row_skips, skipped, full, key):
    return None


# Opaque to the compiler: the data-dependent row selection happens inside, and the output is used, so
# dead-code elimination keeps it. Never returns (a view of) ``x``.
register_op("skip_mlp", "(Tensor x, Tensor? skip, Tensor? keep, str key, int layer) -> Tensor", _skip_mlp,
            _skip_mlp_fake)
register_op("channel_mlp", "(Tensor x, str key, int layer) -> Tensor", _channel_mlp, _channel_mlp_fake)
register_op("finish", "(Tensor(a!) counter, Tensor stream, Tensor positions, Tensor risk, Tensor signals, "
            "Tensor conf, Tensor first, Tensor row_skips, Tensor skipped, Tensor full, str key) -> ()",
            _finish, _finish_fake)
