"""``sedac-bench online``: online calibration's estimate against the truth, through vLLM (compiled).

Engines: vanilla, the V7 config as calibrated (online off), the same with ``SEDAC_ONLINE=1`` at its default
shadow rate, and with every exited row shadow-checked (``serving.shadow_rate`` 1: the estimator without its
sampling noise). Each serves the same held-out news (the pooled top-1 check), then windows of traffic unlike
the calibration text in order: news, Python docs, shuffled news tokens, random tokens, news again. Reported per
window and engine: the top-1 risk measured against vanilla on the window's prompts (prompt logprobs), the
online estimator's value on the same traffic, the shadow check's alone, tau, the drift score and whether the
drift fallback was on. ``sedac-bench run --size full`` makes the same windows part of its vLLM comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import assets as assets_mod

Log = Callable[[str], None]
EVERY_ROW = "V7 calibrated + online calibration, every exited row checked"


def online_run(root: Optional[Path], out: Path, config: Optional[Path], prompts: int = 8, each: int = 2,
               tolerance: float = 0.05, log: Log = print, command: str = "sedac-bench online") -> Path:
    from sedac_monitor.api import load_model, read_text

    from .report import online_windows_lines, pct
    from .run import machine
    from .suite import calibrated_config
    from .vllm_compare import ONLINE, news_end, run_vllm_bench, traffic_windows

    if prompts < 1 or each < 1 or not 0 < tolerance < 1:
        raise ValueError("--prompts and --each must be at least 1, --tolerance in (0, 1)")
    root = assets_mod.build(root, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = root / assets_mod.LLAMA
    if config is None:
        config = calibrated_config(out / "online_sedac_config.json", root, log)
    cfg = json.loads(Path(config).read_text())
    every_row = out / "online_every_row_config.json"
    every_row.write_text(json.dumps({**cfg, "serving": {**cfg.get("serving", {}), "shadow_rate": 1.0}}))
    _, tok = load_model(model_dir)
    texts = {k: root / v for k, v in assets_mod.TEXTS.items()}
    windows = traffic_windows(tok, texts, prompts, each=each)
    news = tok(read_text(texts["lee_news"]), add_special_tokens=False)["input_ids"]
    check = news_end(news, 8)  # as the full size
    online_env = {"SEDAC_ENABLED": "1", "SEDAC_ONLINE": "1", "SEDAC_RISK_TOLERANCE": str(tolerance)}
    configs = [{"name": "vanilla", "env": {"SEDAC_ENABLED": "0"}},
               {"name": "V7 calibrated", "env": {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(Path(config).resolve())}},
               {"name": ONLINE, "env": {**online_env, "SEDAC_CONFIG": str(Path(config).resolve())}},
               {"name": EVERY_ROW, "env": {**online_env, "SEDAC_CONFIG": str(every_row.resolve())}}]
    # one tiny workload: the engines warm up on it; nothing is timed
    spec = {"model": str(model_dir), "rounds": 1, "restart": False,
            "groups": [{"name": "compiled", "llm": {}, "configs": configs,
                        "top1_check": {"prompts": check, "windows": windows}}],
            "workloads": [{"name": "warm-up", "prompt_sets": [[news[:32]]], "max_tokens": 2, "batch": 1}]}
    spec_path, raw_path = out / "online-spec.json", out / "online-raw.json"
    spec_path.write_text(json.dumps(spec))
    log(f"{len(configs)} compiled engines; {len(windows)} windows of {prompts} x 256 tokens after the pooled check")
    run_vllm_bench(spec_path, raw_path, out / "online-vllm.log", log)
    check_out = json.loads(raw_path.read_text())["compiled"]["top1_check"]
    results: Dict[str, Any] = {"command": command, "machine": machine(), "config": str(config),
                               "tolerance": tolerance, "top1_check": check_out}
    m = results["machine"]
    lines: List[str] = [
        "# Online calibration: the estimate against the measured risk", "",
        f"Made by `{command}`; config `{Path(config).name}` (calibrated on enwiki); vLLM compiled; machine "
        f"{m.get('cpu_model', '')}, {m['cpu_count']} cores; tolerance {pct(tolerance)}.", "",
        "Pooled held-out check (8 x 256 news tokens, before the windows): "
        + "; ".join(f"{name} {pct(r['measured_risk'])}" for name, r in check_out.items()) + ".", ""]
    for name in (ONLINE, EVERY_ROW):
        lines += [f"## {name}", "", *online_windows_lines({ONLINE: check_out[name],
                                                            "V7 calibrated": check_out["V7 calibrated"]})]
    path = out / "online.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "online.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    log(path.read_text())
    return path
