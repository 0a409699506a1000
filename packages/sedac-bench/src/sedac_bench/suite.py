"""``sedac-bench suite``: the original SEDAC documents' test suite, run on SmolLM2 with a V7 config, pass
or fail as measured (their thresholds).

* **quality** — ΔPPL < 1% on held-out news text;
* **robustness** — decisions consistent (> 90% of tokens with the same exit layer) when the same text is
  re-batched as a server would (different lengths, left padding, other neighbours), and under a light
  paraphrase (tokens aligned by difflib, compared where equal);
* **distribution shift** — calibrated on Wikipedia, the spread (max − min) of exit rates across Wikipedia,
  news and Python documentation < 0.2;
* **performance** — P50 / P99 request latency from `sedac-vllm serve` under 32 concurrent requests, against
  vanilla `vllm serve` measured the same way: passes if SEDAC's P99 is at most 1.1x vanilla's.

A fail is a result; the report says which thresholds were met.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from sedac_monitor.calibrate import ppl_text

from . import assets as assets_mod
from .metrics import latency_percentiles

Log = Callable[[str], None]
THRESHOLDS = {"delta_ppl": 0.01, "consistency": 0.90, "exit_rate_spread": 0.2, "p99_ratio": 1.1}


def paraphrase(text: str) -> str:
    """A light, deterministic paraphrase: a few function words and punctuation changed."""
    swaps = [(r"\bthe\b", "that"), (r"\bThe\b", "That"), (r"\band\b", "as well as"), (r"\bsaid\b", "stated"),
             (r", ", "; "), (r"\bbut\b", "yet")]
    out = text
    for pattern, repl in swaps:
        out = re.sub(pattern, repl, out, count=3)
    return out


def _first_skips(layout, ids: torch.Tensor, make_decider: Callable[[], Any], protect_first: int,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First skipped layer per token of one forward (a fresh decider from ``make_decider``). With a mask,
    positions count real tokens only, as a server's would (left padding shifts nothing)."""
    from sedac_monitor.api import HFAttachment, SkipRuntime

    rt = SkipRuntime(make_decider(), layout.num_layers, protect_first)
    att = HFAttachment(layout, rt)
    pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            layout.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        att.detach()
    assert rt.last_first_skip is not None  # the forward finished
    return rt.last_first_skip.view(ids.shape)


def robustness(layout, tok, text: str, cfg: Dict[str, Any], windows: int = 4, length: int = 256,
               make_decider: Optional[Callable[[], Any]] = None) -> Dict[str, float]:
    """Re-batching and paraphrase consistency of the exit decisions (``make_decider``: the decider to
    check; default the V7 rule of ``cfg``).

    Re-batching as a server batches: every window alone, then the windows cut to different lengths and
    batched together left-padded, in two compositions (all of them; then the last ones first, without
    the first). A token's decision may depend on its own sequence only, so it must not change.
    """
    from sedac_monitor.api import MonitorDecider, monitor_rule, token_windows

    L = layout.num_layers
    if make_decider is None:
        rule = monitor_rule(L, cfg["tau"], cfg["consecutive_k"], cfg["min_layer"], cfg["protect_last"], cfg["scope"])

        def make_decider():
            return MonitorDecider(rule, L)
    protect_first = cfg.get("protect_first", 1)
    ids = token_windows(tok, text, length, windows)
    alone = torch.stack([_first_skips(layout, w[None], make_decider, protect_first)[0] for w in ids])
    lengths = [length - 37 * i for i in range(windows)]
    compositions = [list(range(windows)), list(range(windows - 1, 0, -1))]
    same: List[bool] = []
    for comp in compositions:
        batch = torch.zeros((len(comp), length), dtype=ids.dtype)
        mask = torch.zeros_like(batch)
        for row, i in enumerate(comp):
            n = lengths[i]
            batch[row, length - n:] = ids[i, :n]
            mask[row, length - n:] = 1
        together = _first_skips(layout, batch, make_decider, protect_first, mask)
        for row, i in enumerate(comp):
            n = lengths[i]
            same += [bool(a == b) for a, b in zip(alone[i, :n].tolist(), together[row, length - n:].tolist())]
    # paraphrase: decisions on tokens that survive the paraphrase unchanged (difflib alignment)
    para_same: List[bool] = []
    for i, w in enumerate(ids):
        para = tok(paraphrase(tok.decode(w)), add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
        fp = _first_skips(layout, para, make_decider, protect_first)[0]
        matcher = difflib.SequenceMatcher(a=w.tolist(), b=para[0].tolist(), autojunk=False)
        for block in matcher.get_matching_blocks():
            para_same += [bool(alone[i, block.a + k] == fp[block.b + k]) for k in range(block.size)]
    return {"rebatch_consistency": float(np.mean(same)), "paraphrase_consistency": float(np.mean(para_same)),
            "rebatch_tokens": len(same), "paraphrase_tokens": len(para_same)}



def _serve_latencies(model: Path, env: Dict[str, str], sedac_config: Optional[Path], prompts: List[str],
                     work: Path, name: str, log: Log) -> List[float]:
    from sedac_vllm.cli import serve_command
    from sedac_vllm.server import free_port, running_server

    port = free_port()
    args = ["--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len",
            "1024", "--served-model-name", "m", "--max-num-seqs", "32"]
    if sedac_config:
        cmd = [str(Path(sys.executable).with_name("sedac-vllm")), "serve", str(model), "--sedac-config",
               str(sedac_config), *args]
    else:  # vanilla vLLM, started the way sedac-vllm would start it
        cmd = serve_command(str(model), args)
    with running_server(cmd, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **env}, port,
                        work / f"server-{name}.log") as base:

        def one(p):
            body = json.dumps({"model": "m", "prompt": p, "max_tokens": 32, "temperature": 0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
            return time.perf_counter() - t

        one(prompts[0])  # warm-up
        with ThreadPoolExecutor(32) as pool:
            lat = list(pool.map(one, prompts))
    log(f"  {name}: {len(lat)} requests, P50 {np.percentile(lat, 50):.2f} s, P99 {np.percentile(lat, 99):.2f} s")
    return lat


def calibrated_config(path: Path, root: Path, log: Log, model_and_tokenizer: Any = None) -> Path:
    """A V7 config calibrated on the bundled enwiki text at max risk 0.05 (the demo's budget), written to
    ``path``; the bundled SmolLM2 Llama folder under the assets folder ``root``."""
    from sedac_monitor.calibrate import calibrate, write_config

    log("calibrating V7 on enwiki (max risk 0.05) ...")
    write_config(calibrate(root / assets_mod.LLAMA, root / assets_mod.TEXTS["enwiki"], "conservative", 0.05,
                           tokens=2048, log=log, model_and_tokenizer=model_and_tokenizer), path)
    return path


def suite(root: Optional[Path], out: Path, config: Optional[Path], server: bool = True, log: Log = print,
          command: str = "sedac-bench suite") -> Path:
    from sedac_monitor.api import find_layout, load_config, load_model, read_text, teacher_forced, token_windows
    from sedac_monitor.calibrate import measure

    from .run import machine

    root = assets_mod.build(root, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = root / assets_mod.LLAMA
    texts = {k: root / v for k, v in assets_mod.TEXTS.items()}
    model, tok = load_model(model_dir)
    layout = find_layout(model)
    L = layout.num_layers
    if config is None:
        config = calibrated_config(out / "suite_sedac_config.json", root, log, (model, tok))
    cfg = load_config(config, L)
    from sedac_monitor.api import monitor_rule

    rule = monitor_rule(L, cfg["tau"], cfg["consecutive_k"], cfg["min_layer"], cfg["protect_last"], cfg["scope"])
    results: Dict[str, Any] = {"command": command, "machine": machine(), "config": str(config),
                               "thresholds": THRESHOLDS, "tests": {}}
    # quality
    news = token_windows(tok, read_text(texts["lee_news"]), 512, 4, source="lee_news")
    base = teacher_forced(layout, news, None, 4)
    q = measure(layout, news, rule, base.top1, base.nll, 4, protect_first=cfg.get("protect_first", 1))
    results["tests"]["quality"] = {"delta_ppl": q["delta_ppl"], "risk": q["measured_risk"],
                                   "skipped_mlp_fraction": q["skipped_mlp_fraction"],
                                   "pass": q["delta_ppl"] < THRESHOLDS["delta_ppl"]}
    log(f"quality: ΔPPL {ppl_text(q['delta_ppl'])} -> {'PASS' if results['tests']['quality']['pass'] else 'FAIL'}")
    # robustness
    rb = robustness(layout, tok, read_text(texts["lee_news"]), cfg)
    rb["pass"] = min(rb["rebatch_consistency"], rb["paraphrase_consistency"]) > THRESHOLDS["consistency"]
    results["tests"]["robustness"] = rb
    log(f"robustness: re-batching {rb['rebatch_consistency']:.1%}, paraphrase {rb['paraphrase_consistency']:.1%} "
        f"-> {'PASS' if rb['pass'] else 'FAIL'}")
    # distribution shift: exit rates across domains (enwiki windows after the calibration tokens)
    rates = {}
    for name, skip in (("enwiki", 8), ("lee_news", 0), ("pydoc_topics", 0)):
        w = token_windows(tok, read_text(texts[name]), 512, skip + 4, source=name)[skip:]
        b = teacher_forced(layout, w, None, 4)
        rates[name] = measure(layout, w, rule, b.top1, b.nll, 4, protect_first=cfg.get("protect_first", 1))["exit_rate"]
    spread = max(rates.values()) - min(rates.values())
    results["tests"]["distribution_shift"] = {"exit_rates": rates, "spread": spread,
                                              "pass": spread < THRESHOLDS["exit_rate_spread"]}
    log(f"distribution shift: exit rates {rates}, spread {spread:.3f} -> "
        f"{'PASS' if spread < THRESHOLDS['exit_rate_spread'] else 'FAIL'}")
    # performance
    if server:
        text = read_text(texts["lee_news"])
        paras = [p for p in text.splitlines() if len(p) > 200][:32]
        prompts = [p[:600] for p in paras]
        van = _serve_latencies(model_dir, {"SEDAC_ENABLED": "0"}, None, prompts, out, "vanilla", log)
        sed = _serve_latencies(model_dir, {}, config, prompts, out, "sedac", log)
        pv, ps = latency_percentiles(van), latency_percentiles(sed)
        ratio = ps["p99"] / pv["p99"]
        results["tests"]["performance"] = {"vanilla": pv, "sedac": ps, "p99_ratio": ratio,
                                           "pass": ratio <= THRESHOLDS["p99_ratio"]}
        log(f"performance: P99 {ps['p99']:.2f} s vs vanilla {pv['p99']:.2f} s -> "
            f"{'PASS' if ratio <= THRESHOLDS['p99_ratio'] else 'FAIL'}")
    lines = ["# SEDAC test suite (the original documents' tests and thresholds)", "",
             f"Made by `{command}`; config `{config}`; machine "
             f"{results['machine'].get('cpu_model', '')}, {results['machine']['cpu_count']} cores.", "",
             "| test | measured | threshold | result |", "|---|---|---|---|"]
    t = results["tests"]
    lines.append(f"| quality | ΔPPL {ppl_text(t['quality']['delta_ppl'])} (risk {t['quality']['risk']:.2%}, skipped "
                 f"{t['quality']['skipped_mlp_fraction']:.2%}) | ΔPPL < 1% | "
                 f"{'PASS' if t['quality']['pass'] else 'FAIL'} |")
    lines.append(f"| robustness | re-batching {rb['rebatch_consistency']:.1%}, paraphrase "
                 f"{rb['paraphrase_consistency']:.1%} of tokens keep their exit layer | > 90% | "
                 f"{'PASS' if rb['pass'] else 'FAIL'} |")
    ds = t["distribution_shift"]
    lines.append("| distribution shift | exit rates " + ", ".join(f"{k} {v:.1%}" for k, v in ds["exit_rates"].items())
                 + f"; spread {ds['spread']:.3f} | < 0.2 | {'PASS' if ds['pass'] else 'FAIL'} |")
    if "performance" in t:
        p = t["performance"]
        lines.append(f"| performance | P50 {p['sedac']['p50']:.2f} s, P99 {p['sedac']['p99']:.2f} s (vanilla "
                     f"{p['vanilla']['p50']:.2f} / {p['vanilla']['p99']:.2f} s), 32 concurrent requests of 32 tokens "
                     f"| P99 <= 1.1x vanilla | {'PASS' if p['pass'] else 'FAIL'} |")
    path = out / "suite.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "suite.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    log("\n".join(lines))
    return path
