"""``sedac-probes calibrate``: V6 thresholds for trained probes, with the evidence, via sedac_core.

Three ways to choose the thresholds (one per checkpoint, V6.0 rule: exit at
the first checkpoint where risk < threshold):

* ``--exit-rates r1,r2,r3`` — threshold i is the r_i quantile of the risks at
  checkpoint i (``sedac_core.calibrate_thresholds``).
* ``--max-risk r`` — the setting with the most skipped MLP work whose risk
  (tokens exiting where label (b) says the top-1 would change) stays <= r:
  a ``sedac_core.replay`` search over per-checkpoint exit rates, or, with
  ``--strategy``, over one scale factor of that preset's threshold shape.
* ``--strategy`` alone — the original documents' presets: thresholds in the preset's
  proportions, scaled so that the overall exit rate matches the preset's.

Risk here is replay's estimate: it treats tokens independently, while an
exited token also changes what later tokens attend to, so the risk measured
by running the model (sedac-bench, sedac-vllm) is higher. The evidence block
says which number is which.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import numpy as np
import torch

import sedac_core
from sedac_monitor.api import InputError
from sedac_monitor.calibrate import BUDGET_NOT_MET, DEFAULT_MAX_DELTA_PPL, measured_search, ppl_text

from .collect import load_data, load_probes_for
from .io import update_meta

# The original SEDAC documents' strategy table (V6): thresholds and the exit rate they gave there.
PRESETS: Dict[str, Dict[str, Any]] = {
    "conservative": {"thresholds": (0.7, 0.8, 0.9), "exit_rate": 0.10},
    "balanced": {"thresholds": (0.8, 1.0, 1.2), "exit_rate": 0.15},
    "aggressive": {"thresholds": (1.0, 1.3, 1.7), "exit_rate": 0.25},
}
RATE_GRID = tuple(round(x, 2) for x in np.arange(0.0, 0.951, 0.05))
DEFAULT_WEIGHTS = {3: (0.3, 0.4, 0.3)}  # the original documents' layer weights for three checkpoints

Log = Callable[[str], None]


def probe_risk(bank, data: Dict[str, Any], rows: torch.Tensor) -> np.ndarray:
    """[tokens, checkpoints] float32 risks of the bank's probes (or fused gates) on collected data."""
    cols = []
    with torch.no_grad():
        for i, layer in enumerate(bank.layers):
            if bank.target == "fusion":
                from .fusion import checkpoint_features

                cols.append(bank.gate_risk(i, checkpoint_features(bank, data, i, layer, rows)))
                continue
            x = data["hidden"][layer][rows]
            cols.append(torch.cat([bank.risk_at(i, x[j:j + 8192].float()) for j in range(0, x.shape[0], 8192)]))
    return torch.stack(cols, 1).numpy().astype(np.float32)


def shape_for(preset: str, checkpoints: int) -> np.ndarray:
    base = np.array(PRESETS[preset]["thresholds"], dtype=np.float64)
    # other checkpoint counts: interpolate the preset's shape
    return np.interp(np.linspace(0, 1, checkpoints), np.linspace(0, 1, len(base)), base)


def _scaled(risk: np.ndarray, shape: np.ndarray) -> List[float]:
    """Scale factors that put some checkpoint's threshold at each percentile of its risks."""
    scales: Set[float] = set()
    for i in range(risk.shape[1]):
        finite = risk[:, i][np.isfinite(risk[:, i])]
        if finite.size:
            scales.update(float(max(q, 1e-6) / shape[i]) for q in np.quantile(finite, np.linspace(0.0, 0.99, 100)))
    return sorted(scales) or [1.0]


def _rule(thresholds: Sequence[float], protect_last: int) -> sedac_core.ProbeRule:
    return sedac_core.ProbeRule(tuple(float(max(t, sedac_core.MIN_THRESHOLD)) for t in thresholds),
                                rule="threshold", protect_last=protect_last)


def calibrate(probe_dir: Any, data_dir: Any, exit_rates: Optional[Sequence[float]] = None,
              max_risk: Optional[float] = None, strategy: Optional[str] = None, log: Log = print,
              model: Any = None, budget: int = 8, model_and_tokenizer: Any = None,
              max_delta_ppl: float = DEFAULT_MAX_DELTA_PPL) -> Dict[str, Any]:
    """Choose thresholds, measure them by replay (and, with ``model``, by running the model on the
    data's token windows), and write them into the probe metadata.

    With ``model`` and ``max_risk``, the replay-ranked candidates are binary-searched by *measured* risk
    and ΔPPL (at most ``budget`` model runs; both within budget, ΔPPL at most ``max_delta_ppl``): replay
    treats tokens independently and is optimistic, and cannot see the distribution at all.
    """
    if exit_rates is not None and (max_risk is not None or strategy is not None):
        raise InputError("--exit-rates sets the thresholds by itself; it cannot be combined with "
                         "--max-risk or --strategy")
    if exit_rates is None and max_risk is None and strategy is None:
        raise InputError("give --exit-rates, --max-risk or --strategy")
    if strategy is not None and strategy not in PRESETS:
        raise InputError(f"--strategy must be one of {', '.join(PRESETS)}, got {strategy!r}")
    if max_risk is not None and not (0.0 <= max_risk < 1.0):
        raise InputError(f"--max-risk must be in [0, 1), got {max_risk}")
    if not (max_delta_ppl >= 0.0 and math.isfinite(max_delta_ppl)):
        raise InputError(f"--max-delta-ppl must be a finite number >= 0, got {max_delta_ppl}")
    t0 = time.perf_counter()
    data = load_data(data_dir)
    dmeta = data["meta"]
    probes = load_probes_for(probe_dir, data)
    protect_last = int(dmeta["protect_last"])
    if probes.meta.get("protect_last", protect_last) != protect_last:
        raise InputError(f"the probes were trained with protect_last={probes.meta['protect_last']} but "
                         f"{data_dir} was collected with protect_last={protect_last}")
    rows = torch.nonzero(data["position"] >= dmeta.get("protect_first", 0)).squeeze(1)
    measurer = None
    if model is not None or model_and_tokenizer is not None:
        measurer = _Measurer(model, model_and_tokenizer, data, probes, protect_last)
    risk = probe_risk(probes.bank, data, rows)
    safe = np.stack([data["cascade_safe"][layer][rows].numpy() for layer in probes.layers], 1)
    trace = sedac_core.Trace.risk(risk, probes.layers, dmeta["num_layers"], safe=safe, protect_last=protect_last)
    c = len(probes.layers)

    if exit_rates is not None:
        if len(exit_rates) != c:
            raise InputError(f"--exit-rates has {len(exit_rates)} values but the probes have {c} layers "
                             f"({probes.layers})")
        thresholds = sedac_core.calibrate_thresholds(risk, exit_rates).tolist()
        how = f"exit rates {list(exit_rates)} (per-checkpoint risk quantiles)"
    elif max_risk is not None and strategy is None:
        grid = list(itertools.product(RATE_GRID, repeat=c)) if c <= 3 else [(r,) * c for r in RATE_GRID]
        quant = np.stack([np.quantile(risk[:, i][np.isfinite(risk[:, i])], RATE_GRID) for i in range(c)], 1)
        index = {r: j for j, r in enumerate(RATE_GRID)}
        cands = [[quant[index[r], i] for i, r in enumerate(rates)] for rates in grid]
        thresholds = _best(trace, cands, protect_last, max_risk, measurer, budget, log, max_delta_ppl)
        how = f"max risk {max_risk} (replay over {len(cands)} per-checkpoint exit-rate settings)"
    else:
        assert strategy is not None  # exit rates, max risk or a strategy: checked above
        shape = shape_for(strategy, c)
        scales = _scaled(risk, shape)
        cands = [list(shape * s) for s in scales]
        if max_risk is not None:
            thresholds = _best(trace, cands, protect_last, max_risk, measurer, budget, log, max_delta_ppl)
            how = f"max risk {max_risk} along the {strategy} preset's threshold shape {shape.round(3).tolist()}"
        else:
            target = PRESETS[strategy]["exit_rate"]
            table = sedac_core.replay(trace, [_rule(t, protect_last) for t in cands])
            j = int(np.argmin(np.abs(table["exit_rate"] - target)))
            thresholds = cands[j]
            how = f"{strategy} preset: exit rate {target:.0%} with thresholds in proportion {shape.round(3).tolist()}"

    status = "ok"
    if thresholds is None:  # nothing met the budget: a setting that never exits, and a status saying so
        status = BUDGET_NOT_MET
        thresholds = [sedac_core.MIN_THRESHOLD] * c
    thresholds = [float(max(t, sedac_core.MIN_THRESHOLD)) for t in thresholds]
    v60 = sedac_core.replay(trace, [_rule(thresholds, protect_last)])
    marginal = [float(np.mean(risk[:, i] < thresholds[i])) for i in range(c)]
    weights = DEFAULT_WEIGHTS.get(c, tuple([1.0 / c] * c))
    v61_rule = sedac_core.ProbeRule(tuple(thresholds), "confidence", tuple(marginal), weights, 0.9, protect_last)
    v61 = sedac_core.replay(trace, [v61_rule])
    measured = measurer.measure(thresholds) if measurer is not None and status == "ok" else None
    expected, advice = None, None
    if measured is not None:  # what the thresholds would gain on this machine (MLP and forward timed here)
        from sedac_monitor.api import expected_speedups, measure_model, recommendation

        assert measurer is not None  # measured only with one
        costs = measure_model(measurer.layout)
        for h in measurer.history:
            h["expected_speedup"] = expected_speedups(costs, h["per_layer_skip_rate"])
        expected = measured["expected_speedup"]
        over = [{"measured_risk": h["risk"], "delta_ppl": h["delta_ppl"], "expected_speedup": h["expected_speedup"]}
                for h in measurer.history
                if max_risk is not None and not _within(h, max_risk, max_delta_ppl)]
        advice = recommendation(expected, over)
    evidence = {
        "how": how,
        "status": status,
        "data": str(data["path"]), "text": dmeta["text"], "text_sha256": dmeta["text_sha256"],
        "tokens": int(risk.shape[0]),
        "risk_definition": "replay estimate: fraction of tokens that exit where the collected label says the "
                           "full model's top-1 would change (tokens treated independently)",
        "v6_0": {k: float(v60[k][0]) for k in ("exit_rate", "skipped_mlp", "disagreement")},
        "v6_1": {k: float(v61[k][0]) for k in ("exit_rate", "skipped_mlp", "disagreement")},
        "v6_1_weights": list(weights), "v6_1_decay": 0.9,
        "per_checkpoint_exit_rate": marginal,
        "measured": measured,
        # ΔPPL is only seen by running the model: without --model the distribution budget is not checked
        "max_delta_ppl": max_delta_ppl if measurer is not None else None,
        "measured_candidates": measurer.history if measurer is not None else None,
        # expected speed-up of the thresholds on the machine that calibrated (prefill of 512 tokens, decode
        # at batch 1/4/16/64), from their measured per-layer skip rates; None without --model
        "expected_speedup": expected,
        "recommendation": advice,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    update_meta(probe_dir, thresholds=thresholds, exit_rates=marginal, calibration=evidence, status=status,
                exits_disabled=status != "ok")
    e = evidence["v6_0"]
    if status != "ok":
        log(f"{status}: the probe file now holds thresholds that never exit (max risk {max_risk}"
            + (f", max ΔPPL {max_delta_ppl}" if measurer is not None else "")
            + "); raise --max-risk (or --max-delta-ppl), or collect more data, and calibrate again")
        return evidence
    log(f"thresholds {[round(t, 4) for t in thresholds]} ({how}): exit rate {e['exit_rate']:.2%}, skipped MLP "
        f"{e['skipped_mlp']:.2%}, estimated risk {e['disagreement']:.2%} on {risk.shape[0]} tokens"
        + ("" if measured is None else f"; measured by running the model: risk {measured['risk']:.2%}, skipped "
                                       f"{measured['skipped_mlp']:.2%}, ΔPPL {ppl_text(measured['delta_ppl'])}"))
    log(advice or "expected speed-up: not timed (give --model to time the MLP and the forward on this machine)")
    return evidence


class _Measurer:
    """Runs the model teacher-forced on the collected windows with given V6.0 thresholds."""

    def __init__(self, model: Any, model_and_tokenizer: Any, data: Dict[str, Any], probes: Any,
                 protect_last: int) -> None:
        from sedac_monitor.api import find_layout, load_model, model_identity, teacher_forced

        m, _ = model_and_tokenizer or load_model(model)
        ident = model_identity(m)
        want = data["meta"]["model"]
        if ident["fingerprint"] != want.get("fingerprint") or ident["num_layers"] != want["num_layers"]:
            raise InputError(f"--model {model} is not the model the data in {data['path']} was collected from")
        self.layout = find_layout(m)
        meta = data["meta"]
        self.windows = data["token_id"].view(meta["windows"], meta["max_length"] - 1)
        self.protect_first = meta.get("protect_first", 1)
        self.probes, self.protect_last = probes, protect_last
        self.base = teacher_forced(self.layout, self.windows, None, 4, desc="unmodified")
        self.history: List[Dict[str, Any]] = []

    def measure(self, thresholds: Sequence[float]) -> Dict[str, Any]:
        from sedac_monitor.api import teacher_forced

        from .decide import ProbeDecider, TorchProbeRule

        wanted = [float(t) for t in thresholds]
        for h in self.history:
            if h["thresholds"] == wanted:
                return h
        decider = ProbeDecider(self.probes.bank, TorchProbeRule(wanted), self.layout.num_layers, self.protect_last)
        run = teacher_forced(self.layout, self.windows, decider, 4, desc="measure", protect_first=self.protect_first)
        base = self.base
        assert run.row_skips is not None  # teacher_forced ran with a decider
        res = {"thresholds": wanted, "tokens": int(base.top1.numel()),
               "risk": float((run.top1 != base.top1).double().mean()),
               "skipped_mlp": float(run.row_skips.double().mean()) / self.layout.num_layers,
               "delta_ppl": run.ppl / base.ppl - 1.0,
               "per_layer_skip_rate": list(run.stats["per_layer_skip_rate"]) if run.stats else []}
        self.history.append(res)
        return res


def _within(m: Dict[str, Any], max_risk: float, max_delta_ppl: float) -> bool:
    """A measured candidate within both budgets: top-1 risk and ΔPPL."""
    return m["risk"] <= max_risk and m["delta_ppl"] <= max_delta_ppl


def _best(trace, cands: List[List[float]], protect_last: int, max_risk: float, measurer: Optional[_Measurer] = None,
          budget: int = 8, log: Log = print, max_delta_ppl: float = DEFAULT_MAX_DELTA_PPL) -> Optional[List[float]]:
    """Most skipped work with replay risk <= max_risk; with a measurer, the most aggressive of the
    replay-feasible candidates (most to least skipped work) whose *measured* risk and ΔPPL fit, by binary
    search. ``None`` when no candidate meets the budget."""
    table = sedac_core.replay(trace, [_rule(t, protect_last) for t in cands])
    ok = np.flatnonzero((table["disagreement"] <= max_risk) & (table["skipped_mlp"] > 0))
    if ok.size == 0:
        log(f"  no threshold setting that skips any work keeps the estimated risk <= {max_risk}")
        return None
    ranked = ok[np.lexsort((table["disagreement"][ok], -table["skipped_mlp"][ok]))]
    if measurer is None:
        return list(cands[ranked[0]])
    seen, order = set(), []  # distinct replay outcomes, most skipped work first
    for j in ranked:
        key = (float(table["skipped_mlp"][j]), float(table["disagreement"][j]))
        if key not in seen:
            seen.add(key)
            order.append(int(j))

    def passes(i: int) -> bool:
        m = measurer.measure(cands[order[i]])
        ok = _within(m, max_risk, max_delta_ppl)
        log(f"  measured thresholds {[round(float(t), 4) for t in cands[order[i]]]}: risk {m['risk']:.2%}, "
            f"ΔPPL {ppl_text(m['delta_ppl'])}, skipped {m['skipped_mlp']:.2%} -> {'ok' if ok else 'over budget'}")
        return ok

    found = measured_search(len(order), passes, budget)
    return None if found is None else list(cands[order[found]])
