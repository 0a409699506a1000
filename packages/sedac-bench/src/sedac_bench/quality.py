"""Teacher-forced quality, compute and greedy-generation agreement of methods on held-out text (HF eager)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from sedac_monitor.api import HFAttachment, Pass, SkipRuntime, teacher_forced

from .methods import Method
from .metrics import ModelShape, compute_summary, delta_ppl, identical_prefix, mean_context, perplexity


def evaluate(layout, windows: torch.Tensor, method: Method, base: Pass, shape: ModelShape,
             batch_size: int = 4) -> Dict[str, Any]:
    """Run ``method`` teacher-forced on ``windows`` and compare with the unmodified pass ``base``."""
    run = teacher_forced(layout, windows, method.make(), batch_size, desc=method.name,
                         protect_first=method.protect_first, soft_exit=method.soft_exit,
                         soft_orders=method.soft_orders)
    assert run.row_skips is not None and run.first_skip is not None  # teacher_forced ran with a decider
    n = int(base.top1.numel())
    risk = float((run.top1 != base.top1).double().mean())
    skipped_per_token = float(run.row_skips.double().mean())
    L = shape.layers
    hist = np.bincount(run.first_skip.numpy(), minlength=L + 1)
    out = {
        "name": method.name, "family": method.family, "settings": method.settings, "note": method.note,
        "tokens": n,
        "ppl": perplexity(run.nll.numpy()),
        "ppl_base": perplexity(base.nll.numpy()),
        "delta_ppl": delta_ppl(base.nll.numpy(), run.nll.numpy()),
        "top1_agreement": 1.0 - risk,
        "risk": risk,
        "exit_rate": float((run.first_skip < L).double().mean()),
        # exit layer = first skipped layer - 1; the last bin counts tokens that never skipped
        "exit_layer_histogram": hist.tolist(),
        "per_layer_skip_rate": run.stats["per_layer_skip_rate"] if run.stats else None,
        **compute_summary(shape, skipped_per_token, mean_context(windows.shape[1]), logits=True),
    }
    out["_first_skip"] = run.first_skip.numpy()
    return out


def greedy_agreement(layout, prompts: Sequence[torch.Tensor], method: Optional[Method], new_tokens: int,
                     reference: Optional[List[List[int]]] = None) -> Dict[str, Any]:
    """Greedy generation with the method (KV cache on); identical-prefix length against ``reference``."""
    model = layout.model
    att = None
    if method is not None:
        runtime = SkipRuntime(method.make(), layout.num_layers, method.protect_first)
        att = HFAttachment(layout, runtime, method.soft_exit, method.soft_orders)
    outs: List[List[int]] = []
    try:
        with torch.no_grad():
            for p in prompts:
                g = model.generate(p[None], max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                   pad_token_id=model.config.eos_token_id
                                   if isinstance(model.config.eos_token_id, int) else 0)
                outs.append(g[0, p.numel():].tolist())
    finally:
        if att is not None:
            att.detach()
    res: Dict[str, Any] = {"generated": outs}
    if reference is not None:
        prefix = [identical_prefix(a, b) for a, b in zip(reference, outs)]
        res.update(identical_prefix_mean=float(np.mean(prefix)), identical_prefix=prefix,
                   fully_identical=float(np.mean([p == new_tokens for p in prefix])))
    return res
