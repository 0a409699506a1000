"""sedac-core demo: what calibration does, on a synthetic trace (no model yet).

    nox -s demo        (or: python demo.py [--tokens N] [--max-risk R])

Builds a synthetic recorded trace of 200k tokens: per-layer residual-stream
similarities for a 30-layer model (V7), risks at checkpoints 7/14/21 (V6), and
per-token "safe to exit here" labels that are noisy functions of the same
signals. It then (1) calibrates V6.0 thresholds for the seeds' target exit
rates, (2) replays 96 V7 configurations and 64 probe configurations with
sedac_core.replay, and (3) prints the configurations that skip the most MLP
work at or below --max-risk disagreement.

The trace is synthetic, so the numbers say how the machinery behaves, not how a
real model behaves; the real-model benchmarks arrive with sedac-bench.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sedac_core as sc

NUM_LAYERS = 30
CHECKPOINTS = (7, 14, 21)


def synthetic_trace(tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ease = rng.beta(2.0, 2.0, size=tokens)  # how "easy" each token is
    depth = np.arange(NUM_LAYERS) / (NUM_LAYERS - 1)
    settle = np.clip(depth[None, :] * (0.5 + ease[:, None]), 0, 1)
    similarity = 0.90 + 0.099 * settle - rng.gamma(1.0, 0.004, size=(tokens, NUM_LAYERS))
    safe_layer = np.clip((1 - ease) * NUM_LAYERS * 1.1 + rng.normal(0, 3, tokens), 0, NUM_LAYERS - 1)
    safe = np.arange(NUM_LAYERS)[None, :] >= safe_layer[:, None]
    cp = np.array(CHECKPOINTS)
    risk = np.maximum(0, (1 - ease)[:, None] * 2.5 * (1 - cp / NUM_LAYERS)[None, :] + rng.normal(0, 0.2, (tokens, 3)))
    return similarity.astype(np.float32), risk.astype(np.float32), safe, safe[:, cp]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--max-risk", type=float, default=0.05)
    args = parser.parse_args()

    print(f"sedac-core {sc.__version__} demo on the {sc.backend()} backend; synthetic trace of {args.tokens:,} tokens")
    similarity, risk, safe_sim, safe_cp = synthetic_trace(args.tokens)

    print("\n1. V6.0 thresholds for the seeds' target exit rates 0.2 / 0.6 / 0.9 (calibrate_thresholds):")
    thr = sc.calibrate_thresholds(risk, [0.2, 0.6, 0.9])
    ctrl = sc.CascadeController([sc.LayerConfig(l, r, float(t)) for l, r, t in zip(CHECKPOINTS, (0.2, 0.6, 0.9), thr)],
                                rule="threshold")
    exits = ctrl.evaluate(risk).exit_checkpoint
    for i, layer in enumerate(CHECKPOINTS):
        print(f"   layer {layer:>2}: threshold {thr[i]:.3f}, first exit here for {(exits == i).mean():6.1%} of tokens")

    t0 = time.perf_counter()
    rules = [sc.MonitorRule(float(t), k=k, min_layer=m, protect_last=2)
             for t in (0.97, 0.98, 0.985, 0.99, 0.993, 0.995) for k in (1, 2, 3, 4) for m in (0, 6, 10, 14)]
    v7 = sc.replay(sc.Trace.similarity(similarity, safe=safe_sim, protect_last=2), rules)
    probe_rules = [sc.ProbeRule([float(x) for x in sc.calibrate_thresholds(risk, [a * 0.2, a * 0.6, a * 0.9])])
                   for a in np.linspace(0.02, 1.0, 64)]
    v6 = sc.replay(sc.Trace.risk(risk, CHECKPOINTS, NUM_LAYERS, safe=safe_cp, protect_last=2),
                   [sc.ProbeRule(r.thresholds, protect_last=2) for r in probe_rules])
    dt = time.perf_counter() - t0
    print(f"\n2. replayed {len(rules)} V7 and {len(probe_rules)} V6 configurations in {dt:.2f} s")

    print(f"\n3. most MLP work skipped at disagreement <= {args.max_risk:.0%} (protect_last=2):")
    print(f"   | {'method':<6} | {'configuration':<40} | {'exit rate':>9} "
          f"| {'MLP skipped':>11} | {'disagreement':>12} |")
    print(f"   |{'-' * 8}|{'-' * 42}|{'-' * 11}|{'-' * 13}|{'-' * 14}|")
    for name, table, describe in (
        ("V7", v7, lambda i: f"tau={rules[i].tau:g} k={rules[i].k} min_layer={rules[i].min_layer}"),
        ("V6.0", v6, lambda i: "thresholds=" + "/".join(f"{t:.2f}" for t in probe_rules[i].thresholds)),
    ):
        ok = np.flatnonzero(table["disagreement"] <= args.max_risk)
        if ok.size == 0:
            print(f"   | {name:<6} | {'no configuration meets the bound':<40} | {'':>9} | {'':>11} | {'':>12} |")
            continue
        i = ok[np.argmax(table["skipped_mlp"][ok])]
        print(f"   | {name:<6} | {describe(i):<40} | {table['exit_rate'][i]:>9.1%} | {table['skipped_mlp'][i]:>11.1%} "
              f"| {table['disagreement'][i]:>12.2%} |")
    print("\nSynthetic data: real-model numbers come from sedac-bench (see the README).")


if __name__ == "__main__":
    main()
