"""Rust vs numpy throughput for sedac-core, measured side by side in one run.

    nox -s bench_core            (or: python bench_core.py [--tokens N])

* evaluate: V6.1 probe rule (confidence rule, soft exit on), 3 checkpoints.
* replay (probe): 64 ProbeRule configs over a 3-checkpoint risk trace.
* replay (monitor): 64 MonitorRule configs over a 30-layer similarity trace.

Rust runs in fresh subprocesses with RAYON_NUM_THREADS=1 and =2 (rayon's pool
size is fixed at first use); numpy runs in this process. Figures are best of
several repeats, in tokens per second (replay: tokens x configs per second is
tokens/s x 64). Nothing is asserted: the targets are printed next to the
measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

CHECKPOINTS = (7, 14, 21)
NUM_LAYERS = 30
CONFIGS = 64


def make_inputs(tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    risk = rng.gamma(2.0, 0.5, size=(tokens, len(CHECKPOINTS))).astype(np.float32)
    depth = np.linspace(0.0, 1.0, NUM_LAYERS, dtype=np.float32)
    noise = rng.gamma(1.0, 0.01, size=(tokens, NUM_LAYERS)).astype(np.float32)
    similarity = (0.95 + 0.045 * depth[None, :] - noise).astype(np.float32)
    return risk, similarity


def monitor_rules(sc):
    taus = np.linspace(0.95, 0.995, 8)
    return [sc.MonitorRule(float(t), k=k, min_layer=m, protect_last=2)
            for t in taus for k in (1, 2) for m in (0, 4, 8, 12)]


def probe_rules(sc):
    rules = []
    for scale in np.linspace(0.3, 1.8, 16):
        for rule in ("threshold", "confidence"):
            for decay in (0.5, 0.9):
                rules.append(sc.ProbeRule([0.8 * scale, 1.0 * scale, 1.2 * scale], rule=rule,
                                          exit_rates=[0.2, 0.6, 0.9], weights=[0.3, 0.4, 0.3], decay=float(decay)))
    return rules


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(backend: str, tokens: int, repeats: int) -> dict:
    import sedac_core as sc

    sc.set_backend(backend)
    risk, similarity = make_inputs(tokens)
    layers = [sc.LayerConfig(l, r, t, w) for l, r, t, w in
              zip(CHECKPOINTS, (0.2, 0.6, 0.9), (0.8, 1.0, 1.2), (0.3, 0.4, 0.3))]
    ctrl = sc.ProbeController(layers, soft_exit=True, rule="confidence")
    ctrl.evaluate(risk[:1000])  # warm up
    probe_trace = sc.Trace.risk(risk, CHECKPOINTS, NUM_LAYERS)
    monitor_trace = sc.Trace.similarity(similarity)
    prules, mrules = probe_rules(sc), monitor_rules(sc)
    assert len(prules) == len(mrules) == CONFIGS
    slow = backend == "python"
    out = {
        "evaluate": tokens / best_of(lambda: ctrl.evaluate(risk), 2 if slow else repeats),
        "replay_probe": tokens / best_of(lambda: sc.replay(probe_trace, prules), 1 if slow else repeats),
        "replay_monitor": tokens / best_of(lambda: sc.replay(monitor_trace, mrules), 1 if slow else repeats),
    }
    # the decisions must not depend on the backend: keep a checksum to compare
    out["checksum"] = [int(ctrl.evaluate(risk).exit_checkpoint.sum()),
                       int(sc.replay(probe_trace, prules)["skipped_layers"].sum()),
                       int(sc.replay(monitor_trace, mrules)["skipped_layers"].sum())]
    if backend == "rust":
        from sedac_core import _native
        out["threads"] = _native.num_threads()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["rust", "python"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens, args.repeats)))
        return

    def worker(backend: str, threads: int) -> dict:
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), SEDAC_CORE_BACKEND=backend,
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, __file__, "--worker", backend, "--tokens", str(args.tokens),
                               "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"sedac-core bench: {args.tokens:,} tokens, {len(CHECKPOINTS)} checkpoints, "
          f"{NUM_LAYERS} layers, {CONFIGS} configs per replay")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print("measuring numpy ...", flush=True)
    py = worker("python", 1)
    results = {}
    for threads in (1, 2):
        print(f"measuring rust, {threads} thread(s) ...", flush=True)
        results[threads] = worker("rust", threads)
        assert results[threads]["threads"] == threads
    for threads, r in results.items():
        if r["checksum"] != py["checksum"]:
            raise SystemExit(f"backends disagree ({threads} threads): {r['checksum']} vs {py['checksum']}")

    rows = [("evaluate", "evaluate (tokens/s)"), ("replay_probe", "replay probe x64 (tokens/s)"),
            ("replay_monitor", "replay monitor x64 (tokens/s)")]
    print()
    print(f"| {'operation':<30} | {'numpy':>12} | {'rust 1 thr':>12} | {'rust 2 thr':>12} | "
          f"{'rust1/numpy':>11} | {'rust2/numpy':>11} |")
    print(f"|{'-' * 32}|{'-' * 14}|{'-' * 14}|{'-' * 14}|{'-' * 13}|{'-' * 13}|")
    for key, label in rows:
        a, b, c = py[key], results[1][key], results[2][key]
        print(f"| {label:<30} | {a / 1e6:>10.2f} M | {b / 1e6:>10.2f} M | {c / 1e6:>10.2f} M | "
              f"{b / a:>10.1f}x | {c / a:>10.1f}x |")
    print()
    ev = results[2]["evaluate"]
    print(f"target evaluate >= 50M tokens/s on 2 threads: {ev / 1e6:.1f}M -> {'met' if ev >= 50e6 else 'NOT met'}")
    for key in ("replay_probe", "replay_monitor"):
        ratio = results[2][key] / py[key]
        print(f"target {key} rust >= 10x numpy (2 threads): {ratio:.1f}x -> {'met' if ratio >= 10 else 'NOT met'}")
    print("decisions identical across backends: yes (checksums match)")


if __name__ == "__main__":
    main()
