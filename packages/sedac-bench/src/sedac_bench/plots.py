"""PNG figures for the report (matplotlib, Agg backend). Each figure carries the command that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _footer(fig, results: Dict[str, Any]) -> None:
    m = results["machine"]
    fig.text(0.01, 0.005, f"{results['command']}  |  {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores",
             fontsize=6, color="#555555", ha="left", va="bottom")


def _frontier(points: List[Dict[str, float]], x: str, y: str):
    """Lower-right frontier: for increasing skipped work, the lowest risk seen so far (monotone)."""
    pts = sorted(((p[x], p[y]) for p in points if np.isfinite(p[y])), key=lambda t: (t[0], t[1]))
    xs, ys, best = [], [], np.inf
    for a, b in reversed(pts):
        if b < best:
            best = b
            xs.append(a)
            ys.append(b)
    return xs[::-1], ys[::-1]


COLORS = {"V7": "tab:blue", "V6.0": "tab:orange", "V6.1": "tab:red", "preset": "tab:purple", "baseline": "tab:gray",
          "V6.1 roadmap": "tab:green"}


def pareto(results: Dict[str, Any], out: Path) -> List[str]:
    plt = _plt()
    rows = results["quality"]["rows"]
    files = []
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sw = results.get("sweeps", {})
    if sw:
        xs, ys = _frontier(sw["v7"], "skipped_mlp", "risk")
        ax.plot(np.array(xs) * 100, np.array(ys) * 100, "-", color="tab:blue", alpha=0.5,
                label="V7 replay frontier (estimate)")
        for target, style in (("safety", "--"), ("entropy", ":")):
            if target not in sw["probe"]:  # the quick size trains the safety probe only
                continue
            xs, ys = _frontier(sw["probe"][target], "skipped_mlp", "risk")
            ax.plot(np.array(xs) * 100, np.array(ys) * 100, style, color="tab:orange", alpha=0.6,
                    label=f"V6.0 {target} probe replay frontier (estimate)")
    for r in rows:
        ax.scatter(r["skipped_mlp_fraction"] * 100, r["risk"] * 100, color=COLORS.get(r["family"], "k"), s=28, zorder=3)
        ax.annotate(r["name"], (r["skipped_mlp_fraction"] * 100, r["risk"] * 100), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    target = results["quality"].get("pareto_target")
    if target:  # the best setting within the budget, and random skipping at its per-layer rates
        by_name = {r["name"]: r for r in rows}
        for name, marker in ((target["best"], "*"), (target["random"], "X")):
            r = by_name[name]
            ax.scatter(r["skipped_mlp_fraction"] * 100, r["risk"] * 100, marker=marker, s=160, facecolors="none",
                       edgecolors="k", zorder=4, label=("best within 5% risk: " if marker == "*" else "") + name)
        ax.axhline(5.0, color="k", lw=0.5, ls="--")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("skipped MLP work (%)")
    ax.set_ylabel("top-1 risk on held-out text (%)")
    ax.set_title("Risk vs skipped compute (points: measured by running the model; lines: replay estimates)",
                 fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out / "pareto_risk.png", dpi=130)
    plt.close(fig)
    files.append("pareto_risk.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        d = r["delta_ppl"] * 100
        ax.scatter(r["skipped_mlp_fraction"] * 100, d, color=COLORS.get(r["family"], "k"), s=28)
        ax.annotate(r["name"], (r["skipped_mlp_fraction"] * 100, d), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("skipped MLP work (%)")
    ax.set_ylabel("ΔPPL on held-out text (%)")
    ax.set_title("Perplexity cost vs skipped compute (measured)", fontsize=8)
    ax.grid(alpha=0.3)
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out / "pareto_ppl.png", dpi=130)
    plt.close(fig)
    files.append("pareto_ppl.png")
    return files


def exits(results: Dict[str, Any], out: Path) -> List[str]:
    plt = _plt()
    rows = [r for r in results["quality"]["rows"] if r["family"] != "baseline" and r["exit_rate"] > 0][:6]
    files: List[str] = []
    if not rows:
        return files
    L = len(rows[0]["exit_layer_histogram"]) - 1
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 1.4 * len(rows) + 0.6), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, r in zip(axes, rows):
        h = np.asarray(r["exit_layer_histogram"], dtype=float)
        tokens = h.sum()
        ax.bar(np.arange(-1, L - 1), h[:-1] / tokens * 100, color=COLORS.get(r["family"], "k"))
        ax.set_ylabel("% tokens", fontsize=7)
        ax.set_title(f"{r['name']}: {r['exit_rate']:.1%} of tokens exit", fontsize=7)
    axes[-1].set_xlabel("exit layer (the MLPs after it are skipped)")
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out / "exit_layers.png", dpi=130)
    plt.close(fig)
    files.append("exit_layers.png")

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for r in rows:
        if r.get("per_layer_skip_rate"):
            ax.plot(np.arange(L), np.asarray(r["per_layer_skip_rate"]) * 100, marker=".", label=r["name"])
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens whose MLP is skipped (%)")
    ax.set_title("Per-layer skip rates on held-out text", fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out / "per_layer_skip.png", dpi=130)
    plt.close(fig)
    files.append("per_layer_skip.png")
    return files


def throughput(results: Dict[str, Any], out: Path) -> List[str]:
    plt = _plt()
    vl = results.get("vllm", {})
    files = []
    for folder, data in vl.items():
        rows = data.get("compiled", {}).get("rows", [])
        if not rows:
            continue
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        configs = list(dict.fromkeys(r["config"] for r in rows))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(configs)
        for i, c in enumerate(configs):
            picked = [next(r for r in rows if r["workload"] == w and r["config"] == c) for w in workloads]
            vals = [r["speedup"] for r in picked]
            err = [[v - r["speedup_min"] for v, r in zip(vals, picked)],
                   [r["speedup_max"] - v for v, r in zip(vals, picked)]]
            ideal = [next(r["ideal_speedup"] for r in rows if r["workload"] == w and r["config"] == c)
                     for w in workloads]
            xs = np.arange(len(workloads)) + i * width
            ax.bar(xs, vals, width, label=c, yerr=err, error_kw={"lw": 0.6, "capsize": 1.5})
            ax.scatter(xs, ideal, marker="_", color="k", s=60, zorder=3)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2)
        ax.set_xticklabels(workloads, fontsize=6, rotation=12)
        ax.set_ylabel("throughput vs vanilla vLLM (x)")
        ax.set_title(f"vLLM CPU, compiled, SmolLM2-135M ({folder} folder): median of rounds, engines in lockstep "
                     "[min-max]; black ticks: ideal", fontsize=8)
        ax.legend(fontsize=6)
        _footer(fig, results)
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        name = f"vllm_throughput_{folder}.png"
        fig.savefig(out / name, dpi=130)
        plt.close(fig)
        files.append(name)
    return files


def channel_pareto(results: Dict[str, Any], out: Path) -> List[str]:
    """Risk and ΔPPL against MLP FLOPs saved: channel soft exit next to whole-MLP exits (the quality rows)."""
    ch = results.get("channels")
    if not ch or not (ch["rows"] or ch["curves"]):
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    exits_rows = [r for r in results["quality"]["rows"] if r["family"] != "baseline" or "random" in r["name"]]
    markers = {"calibrated": "*", "random": "X", "uniform": "s", "static order": "v"}
    colors = {"calibrated": "tab:green", "random": "tab:gray", "uniform": "tab:purple", "static order": "tab:brown"}
    for ax, key, label in ((axes[0], "risk", "top-1 risk (%)"), (axes[1], "delta_ppl", "ΔPPL (%)")):
        values = [r[key] * 100 for r in exits_rows + ch["rows"] + [p for c in ch["curves"].values() for p in c]]
        values = [v for v in values if np.isfinite(v)]
        ax.scatter([r["skipped_mlp_fraction"] * 100 for r in exits_rows], [r[key] * 100 for r in exits_rows],
                   color="tab:blue", s=14, alpha=0.6, label="whole-MLP exits (every measured setting)")
        for i, (name, curve) in enumerate(ch["curves"].items()):
            ax.plot([r["mlp_flops_saved"] * 100 for r in curve], [r[key] * 100 for r in curve], "-o", ms=3,
                    color=f"C{i + 3}", label=name)
        for r in ch["rows"]:
            ax.scatter(r["mlp_flops_saved"] * 100, r[key] * 100, marker=markers.get(r["variant"], "o"), s=90,
                       color=colors.get(r["variant"], "k"), zorder=4, label=r["name"])
        if key == "risk":
            ax.axhline(5.0, color="k", lw=0.5, ls="--")
        ax.set_xlim(left=0)
        ax.set_yscale("symlog", linthresh=1)
        if values:  # ΔPPL may dip just below zero; the axis need not reach far below it
            ax.set_ylim(bottom=max(min(min(values), 0.0), -1.0), top=max(max(values), 1.0) * 3)
        ax.set_xlabel("MLP FLOPs saved (%)")
        ax.set_ylabel(label + " on held-out text")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 0.03), ncol=3, frameon=False)
    fig.suptitle("Channel soft exit vs whole-MLP exits (measured, teacher-forced)", fontsize=9)
    _footer(fig, results)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "pareto_channels.png", dpi=130)
    plt.close(fig)
    return ["pareto_channels.png"]


def all_figures(results: Dict[str, Any], out: Path) -> List[str]:
    return pareto(results, out) + channel_pareto(results, out) + exits(results, out) + throughput(results, out)
