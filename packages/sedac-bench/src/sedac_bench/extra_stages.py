"""The full size's extra stages of :class:`~sedac_bench.run.Bench`: greedy generation agreement,
speculative drafts, the HF eager wall-clock and serving under load."""

from __future__ import annotations

import time

import torch

from .methods import (
    Method,
    StaticDropDecider,
)
from .metrics import compute_summary, mean_context, realized_vs_ideal
from .quality import greedy_agreement
from .stages import BenchState


class ExtraStages(BenchState):
    """A mixin of :class:`~sedac_bench.run.Bench`: it reads the bench's model, texts, size and results."""

    def generation(self) -> None:
        prompts = [w[:48] for w in self.eval_windows[: self.size["gen_prompts"]]]
        n = self.size["gen_tokens"]
        with self.timed("greedy generation agreement"):
            ref = greedy_agreement(self.layout, prompts, None, n)["generated"]
            for m, row in zip(self.methods(), self.rows):
                g = greedy_agreement(self.layout, prompts, m, n, ref)
                row["generation"] = {k: g[k] for k in ("identical_prefix_mean", "fully_identical")}
            drop = next(r for r in self.rows if r["name"].startswith("static drop"))
            layers = drop["settings"]["layers"]
            g = greedy_agreement(self.layout, prompts, Method("drop", "baseline", lambda: StaticDropDecider(layers),
                                                              protect_first=0), n, ref)
            drop["generation"] = {k: g[k] for k in ("identical_prefix_mean", "fully_identical")}
        self.results["generation"] = {"prompts": len(prompts), "prompt_tokens": 48, "new_tokens": n}

    def speculative(self) -> None:
        """SEDAC's exits as a self-speculative draft vs prompt lookup (see sedac_bench.spec)."""
        from . import spec

        with self.timed("speculative drafts (acceptance and implied speed-up)"):
            self.results["speculative"] = spec.measure(self.layout, self.eval_windows, self.base.top1,
                                                       (7, 14, 21, 25), log=self.log)

    def wallclock_hf(self) -> None:
        """HF eager: prefill (1 x 2048 and 4 x 512 tokens) and greedy decode (batch 1 and 8, 64 tokens),
        SEDAC off vs on, alternating, best of N."""
        from sedac_monitor.api import HFAttachment, SkipRuntime, read_text, token_windows

        text = read_text(self.texts["lee_news"])
        long = token_windows(self.tok, text, 2048, 1, source="lee_news")
        short = token_windows(self.tok, text, 512, 4, source="lee_news")
        prompts = token_windows(self.tok, text, 128, 8, source="lee_news")
        chosen = {r["name"]: r for r in self.rows}
        names = [self.best["name"], "V7 original defaults"]
        methods = {m.name: m for m in self.methods()}
        out = {}
        reps = self.size["hf_repeats"]

        def timeit(fn):
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        with self.timed("HF eager wall-clock"), torch.no_grad():
            cases = {
                "prefill 1x2048": (lambda: self.model(input_ids=long, use_cache=False), 2048, False),
                "prefill 4x512": (lambda: self.model(input_ids=short, use_cache=False), 512, False),
                "decode b1 64 tokens": (lambda: self.model.generate(prompts[:1], max_new_tokens=64, min_new_tokens=64,
                                                                    do_sample=False, pad_token_id=0), 160, True),
                "decode b8 64 tokens": (lambda: self.model.generate(prompts, max_new_tokens=64, min_new_tokens=64,
                                                                    do_sample=False, pad_token_id=0), 160, True),
            }
            for case, (fn, ctx, logits) in cases.items():
                fn()  # warm-up
                res = {"off_s": timeit(fn)}
                for name in names:
                    m = methods[name]
                    rt = SkipRuntime(m.make(), self.L, m.protect_first)
                    att = HFAttachment(self.layout, rt, m.soft_exit)
                    try:
                        on = timeit(fn)
                        skipped = rt.stats.as_dict()["skipped_mlp_fraction"] if rt.stats else 0.0
                    finally:
                        att.detach()
                    ideal = compute_summary(self.shape, skipped * self.L, mean_context(ctx) if not logits else ctx,
                                            logits)["ideal_speedup"]
                    speed = res["off_s"] / on
                    res[name] = {"on_s": on, "speedup": speed, "skipped_mlp_fraction": skipped,
                                 "ideal_speedup": ideal, **realized_vs_ideal(speed, ideal)}
                out[case] = res
                self.log(f"  {case}: off {res['off_s']:.3f} s; " + "; ".join(
                    f"{n}: {res[n]['speedup']:.3f}x (ideal {res[n]['ideal_speedup']:.3f}x)" for n in names))
        self.results["wallclock_hf"] = {"methods": names, "cases": out,
                                        "quality": {n: {k: chosen[n][k] for k in ("risk", "delta_ppl")}
                                                    for n in names}}

    def serving_load(self) -> None:
        """`sedac-vllm serve` with the calibrated V7 config under load and malformed requests, then SIGTERM
        under load (``sedac-bench load`` with its defaults; see :mod:`sedac_bench.load_bench`)."""
        from . import load_bench

        with self.timed("serving under load and faults"):
            self.results["serving_load"] = load_bench.measure(
                self.root, self.out, self.out / "sedac_config.json", 1024, 256, 32, 32, self.log, self.command)
