"""Probe cost relative to one decoder layer of the same model, measured side by side."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def bench(model_dir: Any, probe_dir: Optional[Any] = None, tokens: int = 2048, repeats: int = 7,
          model_and_tokenizer: Any = None) -> Dict[str, Any]:
    """Time one checkpoint probe (``risk_at``), all probes in one call (``bank(h)``) and decoder layer
    ``L // 2`` (with its attention over the ``tokens``-long prefix) on the same ``[tokens, hidden]`` input."""
    from sedac_monitor.api import find_layout, load_model

    from .io import load
    from .probe import LREProbe, ProbeBank

    model, _ = model_and_tokenizer or load_model(model_dir)
    layout = find_layout(model)
    H, L = layout.hidden_size, layout.num_layers
    if probe_dir is not None:
        bank = load(probe_dir, model_config=model.config).bank
    else:
        torch.manual_seed(0)
        bank = ProbeBank.from_probes({layer: LREProbe(H, 64) for layer in (L // 4, L // 2, 3 * L // 4)})
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    captured: Dict[str, Any] = {}
    mid = L // 2

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = layout.layers[mid].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    layer = layout.layers[mid]
    h = captured["args"][0]
    flat = h.reshape(-1, H)
    with torch.no_grad():
        layer_ms = _best_ms(lambda: layer(*captured["args"], **captured["kwargs"]), repeats)
        probe_ms = _best_ms(lambda: bank.logit_at(0, flat), repeats * 3)
        bank_ms = _best_ms(lambda: bank(flat), repeats * 3)
        # a fused gate's per-checkpoint work: the probe, the similarity of consecutive streams, the gate
        prev = flat.roll(1, 0)
        positions = torch.arange(flat.shape[0])
        fused = ProbeBank(bank.layers, H, bank.rank, "fusion")
        fused.load_state_dict(bank.state_dict(), strict=False)
        from sedac_monitor.api import similarity

        def gate():
            s = similarity(flat, prev)
            return fused.fused_risk_at(0, flat, s, s, positions)
        gate_ms = _best_ms(gate, repeats * 3)
    head_dim = getattr(model.config, "head_dim", None) or H // model.config.num_attention_heads
    lens = (H * model.config.vocab_size) / (H * (2 * model.config.num_attention_heads * head_dim
                                                  + 2 * model.config.num_key_value_heads * head_dim)
                                            + 3 * H * model.config.intermediate_size)
    return {"tokens": tokens, "hidden_size": H, "rank": bank.rank, "checkpoints": len(bank.layers),
            "layer_ms": layer_ms, "probe_ms": probe_ms, "bank_ms": bank_ms, "fused_gate_ms": gate_ms,
            "probe_vs_layer": probe_ms / layer_ms, "bank_vs_layer": bank_ms / layer_ms,
            "fused_gate_vs_layer": gate_ms / layer_ms,
            # a logit-lens top-1 per checkpoint (LM head) in MACs relative to a decoder layer's linear work
            "logit_lens_flops_vs_layer": lens,
            "torch_threads": torch.get_num_threads(),
            "flops_ratio_one_probe": _flops_ratio(model.config, H, bank.rank)}


def _flops_ratio(config: Any, hidden: int, rank: int) -> float:
    """MACs of one probe (per token) over the linear MACs of one decoder layer."""
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return (hidden * rank + rank) / (hidden * (2 * q + 2 * kv) + 3 * hidden * config.intermediate_size)
