"""The quality stages of :class:`~sedac_bench.run.Bench`: the held-out trace, every method's held-out top-1
risk and ΔPPL, the baselines at equal compute (random tokens, static drop, the oracle) and the replay
sweeps."""

from __future__ import annotations

import itertools
from typing import Any, Dict, List

import numpy as np
import torch

import sedac_core
from sedac_monitor.calibrate import ppl_text

from .methods import (
    Method,
    PlannedExitDecider,
    RandomSkipDecider,
    StaticDropDecider,
    layers_for_fraction,
    monitor_method,
    oracle_exits,
    probe_method,
    shortgpt_order,
)
from .metrics import MAX_RISK
from .quality import evaluate
from .stages import BenchState

PARETO_GOAL = {"skipped": 0.021, "delta_ppl": 0.05}
"""At <= 5% held-out risk: at least 3x the 0.70% of MLP work the calibrated V7 monitor skipped before the
V6.1 roadmap's options, with ΔPPL <= 5% (and lower risk and ΔPPL than random skipping at equal rates)."""


class QualityStages(BenchState):
    """A mixin of :class:`~sedac_bench.run.Bench`: it reads the bench's model, texts, size and results."""

    def held_out_trace(self) -> None:
        """Unmodified pass on the held-out text, with similarities, probe risks and cascade labels for every
        layer (protect_last 0): what replay sweeps and the oracle need."""
        from sedac_monitor.api import cascade_labels, drop_last_position

        risks: Dict[str, List[torch.Tensor]]
        sims, risks = [], {t: [] for t in self.size["probe_targets"]}
        layers = self.probes["safety"].layers

        def on_batch(sl, rec):
            sims.append(torch.stack(rec.sims, 1))
            for t in risks:
                bank = self.probes[t].bank
                risks[t].append(torch.stack([bank.risk_at(i, rec.streams[layer]) for i, layer in enumerate(layers)], 1))

        with self.timed("held-out trace and cascade labels"):
            self.base, safe = cascade_labels(self.layout, self.eval_windows, range(self.L), 0, 4,
                                             keep_layers=layers, on_batch=on_batch)
        n, length = self.eval_windows.shape
        sim = torch.cat(sims).view(n, length, self.L)
        sim[:, :1] = 0.0  # the first token never exits
        self.trace_sim = drop_last_position(sim.reshape(-1, self.L), n, length).numpy()
        self.trace_risk = {t: drop_last_position(torch.cat(v), n, length).numpy() for t, v in risks.items()}
        for t in self.trace_risk:
            self.trace_risk[t].reshape(n, length - 1, -1)[:, 0] = np.inf
        self.trace_safe = safe.numpy()
        self.protected = (np.arange(n * (length - 1)) % (length - 1)) == 0

    def methods(self) -> List[Method]:
        L = self.L
        cfg = self.monitor_cfg
        ms = [
            monitor_method("V7 calibrated (max risk 5%)", "V7", L, cfg["tau"], cfg["consecutive_k"], cfg["min_layer"],
                           cfg["protect_last"], cfg["scope"], note="sedac-monitor calibrate on enwiki"),
            monitor_method("V7 original defaults", "V7", L, 0.98, 2, protect_first=0,
                           note="tau 0.98, K 2, cascade from layer 0, no protected token"),
            monitor_method("V7 tau 0.995 K 2", "V7", L, 0.995, 2),
            monitor_method("V7 tau 0.99 K 1 min_layer 10", "V7", L, 0.99, 1, 10),
            monitor_method("V7 tau 0.995 K 1 min_layer 10 per_layer", "V7", L, 0.995, 1, 10, 2, "per_layer"),
        ]
        for target in self.size["probe_targets"]:
            p = self.probes[target]
            ms.append(probe_method(f"V6.0 {target} probe (max risk 5%)", "V6.0", p, L, p.thresholds,
                                   note="sedac-probes calibrate --max-risk 0.05 on enwiki"))
        p = self.probes["safety"]
        weights = (0.3, 0.4, 0.3)
        for soft in (False, True):
            ms.append(probe_method(f"V6.1 safety probe, soft exit {'on' if soft else 'off'}", "V6.1", p, L,
                                   p.thresholds, "confidence", p.exit_rates, weights, 0.9, soft,
                                   note="confidence accumulation; targets = calibrated exit rates"))
        for strategy in ("conservative", "balanced", "aggressive"):
            q = self.probes.get(f"preset_{strategy}")
            if q is not None:
                ms.append(probe_method(f"preset {strategy} (V6.0 safety probe)", "preset", q, L, q.thresholds))
        ms += self.roadmap_methods()
        return ms

    def roadmap_methods(self) -> List[Method]:
        """The V6.1 roadmap's options, each against the same setting without it (family "V6.1 roadmap")."""
        L = self.L
        out = []
        f = self.probes.get("fusion")
        if f is not None:
            out.append(probe_method("V6.0 fused gate (max risk 5%)", "V6.0", f, L, f.thresholds,
                                    note="sedac-probes train --target fusion; calibrate --max-risk 0.05 on enwiki"))
        p = self.probes["safety"]
        weights = (0.3, 0.4, 0.3)
        out.append(probe_method("V6.1 safety probe, adaptive decay", "V6.1 roadmap", p, L, p.thresholds,
                                "confidence", p.exit_rates, weights, 0.9, False, adaptive_decay=True,
                                note="vs 'V6.1 safety probe, soft exit off'"))
        if not self.size["extras"]:
            return out
        if not hasattr(self, "_activation_orders"):
            from sedac_monitor.api import activation_magnitudes, channel_order, read_text, token_windows

            cal = token_windows(self.tok, read_text(self.texts["enwiki"]), 512, 2, source="enwiki")
            acts = activation_magnitudes(self.layout, cal, 2)
            self._activation_orders = [channel_order(layer.mlp, a) for layer, a in zip(self.layout.layers, acts)]
        for k in (2.0, 8.0, 16.0):
            out.append(probe_method(f"V6.1 safety probe, soft exit k={k:g}", "V6.1 roadmap", p, L, p.thresholds,
                                    "confidence", p.exit_rates, weights, 0.9, True, soft_k=k,
                                    note="vs soft exit on (k=4, the original tanh)"))
        for k in (4.0, 16.0):
            out.append(probe_method(f"V6.1 safety probe, soft exit k={k:g}, activation order", "V6.1 roadmap", p, L,
                                    p.thresholds, "confidence", p.exit_rates, weights, 0.9, True, soft_k=k,
                                    soft_orders=self._activation_orders,
                                    note="channels ordered by mean |activation| x |W_down| on enwiki"))
        return out

    def quality(self) -> None:
        rows = []
        with self.timed("held-out quality of every method"):
            for m in self.methods():
                r = evaluate(self.layout, self.eval_windows, m, self.base, self.shape)
                rows.append(r)
                self.log(f"  {m.name:45s} skipped {r['skipped_mlp_fraction']:6.2%}  risk {r['risk']:6.2%}  "
                         f"ΔPPL {ppl_text(r['delta_ppl'])}")
        # the headline SEDAC setting is the calibrated V7 one: chosen on the calibration text (max risk 5%),
        # never on the held-out text it is judged on; baselines get its compute
        best = rows[0]
        self.best = best
        with self.timed("baselines at equal compute"):
            rows += self.baselines(best)
        # the best any SEDAC setting did within the risk budget on the held-out text (chosen on it, so an
        # optimistic reading), and random skipping at its per-layer rates
        within = [r for r in rows if r["family"] != "baseline" and r["risk"] <= MAX_RISK
                  and r["skipped_mlp_fraction"] > 0]
        target = None
        if within:
            top = max(within, key=lambda r: r["skipped_mlp_fraction"])
            twin = rows[[r["name"] for r in rows].index("random tokens, same per-layer skip rates")]
            if top is not best:
                twin = evaluate(self.layout, self.eval_windows, Method(
                    f"random tokens, {top['name']}'s per-layer rates", "baseline",
                    lambda: RandomSkipDecider(top["per_layer_skip_rate"], seed=0), {"matched_to": top["name"]},
                    protect_first=1), self.base, self.shape)
                rows.append(twin)
            target = {"best": top["name"], "skipped_mlp_fraction": top["skipped_mlp_fraction"], "risk": top["risk"],
                      "delta_ppl": top["delta_ppl"], "random": twin["name"], "random_risk": twin["risk"],
                      "random_delta_ppl": twin["delta_ppl"], "goal_skipped": PARETO_GOAL["skipped"],
                      "goal_delta_ppl": PARETO_GOAL["delta_ppl"],
                      "met": {"skipped": top["skipped_mlp_fraction"] >= PARETO_GOAL["skipped"],
                              "delta_ppl": top["delta_ppl"] <= PARETO_GOAL["delta_ppl"],
                              "beats_random": top["risk"] < twin["risk"] and top["delta_ppl"] < twin["delta_ppl"]}}
        self.rows = rows
        self.results["quality"] = {"text": "lee_news", "tokens": int(self.base.top1.numel()),
                                   "ppl_base": rows[0]["ppl_base"], "best_sedac": best["name"], "rows": rows,
                                   "pareto_target": target}

    def baselines(self, best: Dict[str, Any]) -> List[Dict[str, Any]]:
        L = self.L
        out = []
        # ShortGPT-style static dropping: mean input/output cosine per layer on the calibration text
        sim_cal = np.asarray(self.monitor_layer_similarity())
        order = shortgpt_order(sim_cal)
        drop = layers_for_fraction(order, best["skipped_mlp_fraction"], L)
        out.append(evaluate(self.layout, self.eval_windows, Method(
            f"static drop {len(drop)} MLP(s) (ShortGPT-style)", "baseline", lambda: StaticDropDecider(drop),
            {"layers": drop, "matched_to": best["name"]}, protect_first=0), self.base, self.shape))
        # random tokens, each layer skipped with the best method's per-layer skip rate
        rates = best["per_layer_skip_rate"]
        out.append(evaluate(self.layout, self.eval_windows, Method(
            "random tokens, same per-layer skip rates", "baseline", lambda: RandomSkipDecider(rates, seed=0),
            {"matched_to": best["name"]}, protect_first=1), self.base, self.shape))
        # oracle: earliest independently-safe cascade exit per token
        orc = oracle_exits(self.trace_safe, L, 0, self.protected)
        replayed = float(np.maximum(L - 1 - orc[orc >= 0], 0).sum() / (orc.size * L))
        out.append(evaluate(self.layout, self.eval_windows, Method(
            "oracle (earliest safe exit per token)", "baseline",
            lambda: PlannedExitDecider(self._full_rows(orc), L), {"replay_skipped_mlp": replayed,
                                                                 "replay_risk": 0.0}, protect_first=1,
            note="labels judge each token alone; running all exits together changes what tokens attend to"),
            self.base, self.shape))
        return out

    def _full_rows(self, per_token: np.ndarray, fill=-1) -> np.ndarray:
        """Per-token arrays (last position of each window dropped) -> every position (last ones = fill)."""
        n, length = self.eval_windows.shape
        full = np.full((n, length), fill, dtype=per_token.dtype)
        full[:, :-1] = per_token.reshape(n, length - 1)
        return full.reshape(-1)

    def monitor_layer_similarity(self) -> List[float]:
        """Mean cosine between each layer's input and output residual stream on calibration text (enwiki)."""
        from sedac_monitor.api import RecordingDecider, read_text, teacher_forced, token_windows

        windows = token_windows(self.tok, read_text(self.texts["enwiki"]), 512, 2, source="enwiki")
        sims = []
        teacher_forced(self.layout, windows, RecordingDecider(self.L), 2,
                       on_batch=lambda sl, d: sims.append(torch.stack(d.sims, 1)))
        return (torch.cat(sims) * 2 - 1).mean(0).tolist()

    def sweeps(self) -> None:
        """Replay Pareto fronts on the held-out trace (estimated risk; tokens judged independently)."""
        from sedac_monitor.calibrate import Grid

        with self.timed("replay sweeps"):
            rules = Grid(protect=(0,)).rules(self.L)
            t = sedac_core.Trace.similarity(self.trace_sim, safe=self.trace_safe, protect_last=0)
            cascade = [r for r in rules if r.scope == "cascade"]
            table = sedac_core.replay(t, cascade)
            v7 = [{"tau": r.tau, "k": r.k, "min_layer": r.min_layer, "skipped_mlp": float(s), "risk": float(d)}
                  for r, s, d in zip(cascade, table["skipped_mlp"], table["disagreement"])]
            layers = self.probes["safety"].layers
            safe = self.trace_safe[:, layers]
            probe = {}
            grid = np.linspace(0, 0.95, 20)
            for target, risk in self.trace_risk.items():
                quant = np.stack([np.quantile(risk[:, i][np.isfinite(risk[:, i])], grid)
                                  for i in range(len(layers))], 1)
                configs = [sedac_core.ProbeRule(tuple(float(max(quant[j, i], 1e-6)) for i, j in enumerate(combo)))
                           for combo in itertools.product(range(0, 20, 2), repeat=len(layers))]
                tr = sedac_core.Trace.risk(risk, layers, self.L, safe=safe, protect_last=0)
                tab = sedac_core.replay(tr, configs)
                probe[target] = [{"skipped_mlp": float(s), "risk": float(d)}
                                 for s, d in zip(tab["skipped_mlp"], tab["disagreement"])]
        self.results["sweeps"] = {"v7": v7, "probe": probe, "text": "lee_news",
                                  "note": "replay estimates: tokens judged independently (optimistic)"}
