"""Quality and compute metrics, as pure functions (tested on constructed cases with known answers).

Compute model (per token, multiply-accumulates; a FLOP is 2 MACs):

* per layer: attention projections ``H*(q + 2*kv + q)`` where q = heads*head_dim,
  kv = kv_heads*head_dim; attention scores and values ``2 * context * q``
  (``context`` = the token's position + 1, causal); MLP ``3 * H * I``;
* the LM head ``H * V`` only where logits are computed (every position in
  teacher-forced evaluation and in decoding; only the last prompt token in a
  vLLM prefill).

Skipping a layer's MLP for a token saves ``3 * H * I`` MACs; a soft exit that
computes a fraction ``f`` of the channels saves ``(1 - f) * 3 * H * I``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

MAX_RISK = 0.05
"""The benchmark's top-1 risk budget: calibration, probes and the online tolerance all use it."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(int(text.hidden_size), int(text.intermediate_size), int(text.num_hidden_layers), heads,
                   int(getattr(text, "num_key_value_heads", heads) or heads), head_dim, int(text.vocab_size))

    @property
    def mlp_macs(self) -> int:
        return 3 * self.hidden * self.intermediate

    def layer_macs(self, context: float) -> float:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 2 * context * q + self.mlp_macs

    def token_macs(self, context: float, logits: bool) -> float:
        return self.layers * self.layer_macs(context) + (self.hidden * self.vocab if logits else 0)


def mean_context(length: int) -> float:
    """Average causal context of the tokens of a ``length``-token sequence."""
    return (length + 1) / 2


def compute_summary(shape: ModelShape, skipped_blocks_per_token: float, context: float,
                    logits: bool = True) -> Dict[str, float]:
    """Skipped MLP fraction, effective layers per token, FLOPs saved and the ideal speed-up they imply."""
    total = shape.token_macs(context, logits)
    saved = skipped_blocks_per_token * shape.mlp_macs
    return {
        "skipped_mlp_fraction": skipped_blocks_per_token / shape.layers,
        # a layer whose MLP is skipped still runs attention: count it as its non-MLP share of a layer
        "effective_layers": shape.layers - skipped_blocks_per_token * shape.mlp_macs / shape.layer_macs(context),
        "flops_saved_fraction": saved / total,
        "ideal_speedup": total / (total - saved),
    }


def perplexity(nll: ArrayLike) -> float:
    values = np.asarray(nll, dtype=np.float64)
    return float(math.exp(values.mean())) if values.size else float("nan")


def delta_ppl(base_nll: ArrayLike, nll: ArrayLike) -> float:
    """Relative perplexity change, ppl / ppl_base - 1."""
    return perplexity(nll) / perplexity(base_nll) - 1.0


def top1_agreement(base_top1: Sequence[int], top1: Sequence[int]) -> float:
    a, b = np.asarray(base_top1), np.asarray(top1)
    if a.shape != b.shape:
        raise ValueError(f"top-1 arrays differ in shape: {a.shape} vs {b.shape}")
    return float((a == b).mean()) if a.size else float("nan")


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two generated token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def latency_percentiles(latencies: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(latencies, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "n": int(v.size)}


def realized_vs_ideal(speedup: float, ideal: float) -> Dict[str, Optional[float]]:
    """Two ways to compare: the speed-up ratio, and the share of the ideal time saving realized."""
    saved_ideal = 1 - 1 / ideal
    return {"speedup_ratio": speedup / ideal,
            "time_saving_ratio": (1 - 1 / speedup) / saved_ideal if saved_ideal > 1e-9 else None}
