"""The vLLM comparison of ``sedac-bench run``: the engine configurations and held-out workloads, the
interleaved runs (:mod:`sedac_bench.vllm_bench`, in a subprocess), and the rows, ideals and targets made from
them. :class:`VllmStages` is the part of :class:`~sedac_bench.run.Bench` that does it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .metrics import MAX_RISK, compute_summary, mean_context, realized_vs_ideal
from .stages import BenchState

NO_EXITS = "V7 calibrated, exits off"
"""The no-exit gauge: V7 calibrated's own engine process with its threshold out of reach (no token exits, the
same compiled graph), timed in a second pass of every workload (see :func:`sedac_bench.vllm_bench.run_group`)."""
CALIBRATED = "V7 calibrated"
ONLINE = "V7 calibrated + online calibration"
DEFAULTS = "V7 original defaults"
CHANNELS = "channels calibrated"
"""Channel soft exit as calibrated, served as sedac-vllm serves it by default: through the channel kernel
(reads only the kept channels' weights) at the batch sizes where it measured faster at start-up, masked on
the dense matrices above them."""
TARGETS = {"no_exit_overhead_max": 0.02, "gauge_band": 0.03, "realized_ideal_prefill": 0.9,
           "realized_ideal_decode": 0.8}


def byte_aware_ideal(vanilla_s: List[float], runs: List[Dict[str, Any]]) -> Optional[float]:
    """The speed-up SEDAC's plans allow when a skipped row saves its MLP time as measured on this machine
    (per layer and forward, ``t(rows) - t(rows - skipped)``, so a row saves weight reads only where the whole
    batch skips), with a free gather path: vanilla's time over vanilla's time less that saving, per round
    (the engine's own accounting, ``ideal_saved_seconds``), median over rounds. None without the accounting."""
    return ideal_over(vanilla_s, [r["ideal_saved_seconds"] if r.get("mlp_seconds") else None for r in runs])


def ideal_over(vanilla_s: List[float], saved_s: List[Optional[float]]) -> Optional[float]:
    """Median over rounds of vanilla's time over vanilla's time less what could be saved in that round (None
    where the engine kept no MLP accounting); None if no round has it."""
    ideals = [v / (v - s) for v, s in zip(vanilla_s, saved_s) if s is not None and s < v]
    return float(np.median(ideals)) if ideals else None


def per_forward_speedup(vanilla_forwards: List[Optional[List[float]]],
                        runs: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """Speed-up forward by forward: every round's ``vanilla forward k / SEDAC forward k`` (the same lockstep step,
    the same batch, milliseconds apart), pooled over the rounds. ``median``: their median, the typical forward
    (for a decode-heavy workload the decode step's, not the prompt's); ``min`` / ``max``: the per-round medians'
    range. On a shared machine a few forwards run slow on whichever engine they land; a sum carries them, the
    median does not. None where a round kept no per-forward times or the two engines' forwards do not pair up."""
    pooled, per_round = [], []
    for v, run in zip(vanilla_forwards, runs):
        s = run.get("forward_seconds")
        if not v or not s or len(v) != len(s):
            return None
        ratios = np.asarray(v, dtype=float) / np.asarray(s, dtype=float)
        pooled.append(ratios)
        per_round.append(float(np.median(ratios)))
    if not pooled or len(pooled) != len(runs):
        return None
    return {"median": float(np.median(np.concatenate(pooled))), "min": min(per_round), "max": max(per_round)}


def drift_verdict(check: Dict[str, Any], tolerance: float) -> Optional[Dict[str, Any]]:
    """Calibrated on Wikipedia, served news through vLLM with online calibration: did the drift detector fire,
    and did the held-out risk stay within the tolerance? As measured; pass or fail."""
    online = check.get(ONLINE)
    if not online or not online.get("online"):
        return None
    st = online["online"]
    off = check.get("V7 calibrated", {})
    return {"tolerance": tolerance, "measured_risk": online["measured_risk"],
            "measured_risk_without_online": off.get("measured_risk"),
            "risk_within_tolerance": online["measured_risk"] <= tolerance,
            "drift_fired": st.get("fallbacks", 0) > 0, "drift_kl": st.get("drift_kl"),
            "drift_threshold": st.get("drift_threshold"), "risk_estimate": st.get("risk_estimate"),
            "tau": st.get("tau"), "tau_calibrated": st.get("tau_calibrated"),
            "skipped_mlp_fraction": online.get("skipped_mlp_fraction")}


def vllm_targets(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The overhead and realized/ideal targets, per execution and workload, as measured (pass or fail)."""
    out = []
    for execution in ("compiled", "eager"):
        for r in data.get(execution, {}).get("rows", []):
            if r["config"] == NO_EXITS:
                overhead = 1 / r["speedup"] - 1
                out.append({"execution": execution, "workload": r["workload"], "target": "no-exit overhead <= 2%",
                            "value": overhead, "passed": overhead <= TARGETS["no_exit_overhead_max"]})
                # the same row read as the noise gauge: it does vanilla's work, so it must sit near 1.0x
                out.append({"execution": execution, "workload": r["workload"],
                            "target": "no-exit gauge within 1.0x ± 3%",
                            "value": r["speedup"], "passed": abs(r["speedup"] - 1) <= TARGETS["gauge_band"]})
            elif r["config"] == DEFAULTS and r.get("byte_speedup_ratio") is not None:
                goal = TARGETS[f"realized_ideal_{r['kind']}"]
                out.append({"execution": execution, "workload": r["workload"],
                            "target": f"realized/byte-aware ideal >= {goal} (original defaults)",
                            "value": r["byte_speedup_ratio"], "passed": r["byte_speedup_ratio"] >= goal})
        rows = {(r["workload"], r["config"]): r for r in data.get(execution, {}).get("rows", [])}
        for (workload, config), r in rows.items():
            if config != CALIBRATED or (workload, NO_EXITS) not in rows:
                continue
            # judged forward by forward where both rows kept per-forward times: a 0.5% tolerance is finer than
            # the round-to-round spread of summed times on a shared machine (see per_forward_speedup)
            off = rows[(workload, NO_EXITS)]
            key = "forward_speedup" if r.get("forward_speedup") and off.get("forward_speedup") else "speedup"
            mine, gauge = r[key], off[key]
            out.append({"execution": execution, "workload": workload,
                        "target": "V7 calibrated >= exits off - 0.5%, both >= 0.98x"
                                  + (" (per forward)" if key == "forward_speedup" else ""),
                        "value": mine - gauge, "calibrated": mine, "exits_off": gauge,
                        "passed": mine >= gauge - 0.005 and min(mine, gauge) >= 0.98})
    return out


def targets_lines(targets: List[Dict[str, Any]]) -> List[str]:
    return [f"{t['execution']:8s} {t['workload']:36s} {t['target']:38s} {t['value']:+.3f} "
            f"{'pass' if t['passed'] else 'FAIL'}" for t in targets]


def news_end(news: List[int], n: int, length: int = 256) -> List[List[int]]:
    """``n`` windows of ``length`` tokens from the end of the news text (the held-out top-1 check's prompts;
    :func:`traffic_windows` reads the text's start)."""
    return [news[-(i + 1) * length - 1:-i * length - 1] for i in range(n)]


def traffic_windows(tok: Any, texts: Dict[str, Path], prompts: int, length: int = 256,
                    each: int = 2) -> List[Dict[str, Any]]:
    """Windows of traffic unlike the calibration text (Wikipedia), in the order the online-calibration check
    serves them: held-out news, Python's documentation (prose with code), news with its tokens shuffled and
    tokens drawn at random from the texts' vocabulary (shifts no real text makes: the drift detector should
    fire), then news again (it must recover). ``each``
    windows of ``prompts`` prompts of ``length`` tokens per kind; the news windows come from the text's
    start (the held-out top-1 check reads its end)."""
    import random

    from sedac_monitor.api import read_text

    def ids(name: str) -> List[int]:
        return tok(read_text(texts[name]), add_special_tokens=False)["input_ids"]

    news, docs = ids("lee_news"), ids("pydoc_topics")
    need = 2 * each * prompts * length
    if len(news) < need + 16 * 257 or len(docs) < each * prompts * length:
        raise ValueError(f"held-out texts too short for {each} windows of {prompts} x {length} tokens per kind")
    rng = random.Random(0)

    def cut(stream: List[int], start: int, shuffle: bool = False) -> List[List[int]]:
        out = [stream[start + i * length:start + (i + 1) * length] for i in range(prompts)]
        if shuffle:
            out = [rng.sample(p, len(p)) for p in out]
        return out

    step = prompts * length
    windows = [{"label": f"news {i + 1}", "prompts": cut(news, i * step)} for i in range(each)]
    windows += [{"label": f"Python docs {i + 1}", "prompts": cut(docs, i * step)} for i in range(each)]
    windows += [{"label": f"shuffled news {i + 1}", "prompts": cut(news, i * step, shuffle=True)} for i in range(each)]
    vocab = sorted(set(news) | set(docs))
    windows += [{"label": f"random tokens {i + 1}", "prompts": [[rng.choice(vocab) for _ in range(length)]
                                                                for _ in range(prompts)]} for i in range(each)]
    windows += [{"label": f"news again {i + 1}", "prompts": cut(news, (each + i) * step)} for i in range(each)]
    return windows


def run_vllm_bench(spec_path: Path, out_path: Path, log_path: Path, log: Callable[[str], None]) -> None:
    """:mod:`sedac_bench.vllm_bench` on ``spec_path`` in a subprocess (vLLM's engines in their own
    processes), its progress lines to ``log``, vLLM's output to ``log_path``; raises with the log's end."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "sedac_bench.vllm_bench", str(spec_path), str(out_path)],
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log("  " + line.rstrip())
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text()[-5000:]
        raise RuntimeError(f"the vLLM benchmark failed (log: {log_path}):\n{tail}")


class HeldOutStream:
    """Consecutive token windows from held-out text. When the text runs out it starts again, shifted by
    a few tokens, so no window repeats another's prefix blocks (vLLM's prefix cache never hits)."""

    def __init__(self, ids: List[int]) -> None:
        if len(ids) < 4096:
            raise ValueError(f"held-out text too short for the vLLM workloads ({len(ids)} tokens)")
        self.ids, self.pos, self.shift = ids, 0, 0

    def take(self, n: int, length: int) -> List[List[int]]:
        out = []
        for _ in range(n):
            if self.pos + length > len(self.ids):
                self.shift += 7
                self.pos = self.shift
            out.append(self.ids[self.pos:self.pos + length])
            self.pos += length
        return out


class VllmStages(BenchState):
    """The vLLM stages of :class:`~sedac_bench.run.Bench` (a mixin: it reads the bench's model, texts, size
    and output folder)."""

    def vllm_configs(self) -> List[Dict[str, Any]]:
        cfg_path = self.out / "sedac_config.json"
        configs = [
            {"name": "vanilla", "env": {"SEDAC_ENABLED": "0"}},
            {"name": CALIBRATED, "env": {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(cfg_path)}, "twin": NO_EXITS},
            {"name": "V6.0 safety probe", "env": {"SEDAC_ENABLED": "1",
                                                  "SEDAC_PROBE_DIR": str(self.out / "probes-safety")}},
            {"name": DEFAULTS, "env": {"SEDAC_ENABLED": "1", "SEDAC_TAU": "0.98", "SEDAC_CONSECUTIVE_K": "2",
                                       "SEDAC_PROTECT_FIRST": "0"}},
            {"name": ONLINE, "env": {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(cfg_path), "SEDAC_ONLINE": "1",
                                     "SEDAC_RISK_TOLERANCE": str(MAX_RISK)}},
        ]
        if "channels" in self.results.get("channels", {}).get("config", {}):  # a channel setting met the budget
            configs.append({"name": CHANNELS, "env": {"SEDAC_ENABLED": "1",
                                                      "SEDAC_CONFIG": str(self.out / "sedac_channels_config.json")}})
        wanted = self.size["vllm"]["configs"]
        return [{k: v for k, v in c.items() if k != "twin" or v in wanted} for c in configs if c["name"] in wanted]

    def vllm_workloads(self, batches, rounds: int, twin: bool = False) -> List[Dict[str, Any]]:
        """Prefill-heavy (prompts of ``prefill_len`` tokens, 1 out) and decode-heavy (32-token prompts,
        ``decode_out`` out) workloads per batch size, each with its own held-out prompts in every round (and a
        second set per round for the twin pass when ``twin``)."""
        from sedac_monitor.api import read_text

        v = self.size["vllm"]
        text = read_text(self.texts["lee_news"]) + "\n\n" + read_text(self.texts["pydoc_topics"])
        stream = HeldOutStream(self.tok(text, add_special_tokens=False)["input_ids"])
        workloads = []
        for b in batches:
            n, m = v["prompts"][b], v["prefill_prompts"][b]
            workloads.append({"name": f"prefill-heavy {m}x{v['prefill_len']}, 1 out, batch {b}", "kind": "prefill",
                              "batch": b, "max_tokens": 1, "context": mean_context(v["prefill_len"]),
                              "prompt_sets": [stream.take(m, v["prefill_len"]) for _ in range(rounds)]})
            workloads.append({"name": f"decode-heavy {n}x32, {v['decode_out']} out, batch {b}", "kind": "decode",
                              "batch": b, "max_tokens": v["decode_out"], "context": 32 + v["decode_out"] / 2,
                              "prompt_sets": [stream.take(n, 32) for _ in range(rounds)]})
        if twin:
            for w in workloads:
                w["twin_prompt_sets"] = [stream.take(len(p), len(p[0])) for p in w["prompt_sets"]]
        return workloads

    def wallclock_vllm(self, folders=("llama",)) -> None:
        """vLLM throughput, SEDAC configurations against vanilla in the same execution, interleaved
        (sedac_bench.vllm_bench): compiled (vLLM's default) and eager (``enforce_eager``)."""
        from sedac_monitor.api import read_text

        v = self.size["vllm"]
        rounds = v["rounds"]
        configs = self.vllm_configs()
        eager_configs = [c for c in configs if c["name"] in v["eager_configs"]]
        workloads = self.vllm_workloads(v["batches"], rounds, twin=any(c.get("twin") for c in configs))
        eager_names = {w["name"] for w in workloads if w["batch"] in v["eager_batches"]}
        self.results.setdefault("vllm", {})
        for folder in folders:
            model_dir = self.model_dir if folder == "llama" else self.qwen_dir
            # the drift test: held-out news windows, top-1 of every engine against vanilla (prompt logprobs)
            news = self.tok(read_text(self.texts["lee_news"]), add_special_tokens=False)["input_ids"]
            check = news_end(news, v["top1_windows"])
            top1: Dict[str, Any] = {"prompts": check}
            if any(c["name"] == ONLINE for c in configs):  # the online estimate against the truth, per window
                top1["windows"] = traffic_windows(self.tok, self.texts, v["top1_windows"] // 2)
            groups: List[Dict[str, Any]] = [
                {"name": "compiled", "llm": {}, "configs": configs, "top1_check": top1}]
            if eager_configs:
                groups.append({"name": "eager", "llm": {"enforce_eager": True}, "configs": eager_configs})
            data: Dict[str, Any] = {}
            for group in groups:
                wl = workloads if group["name"] == "compiled" else [w for w in workloads if w["name"] in eager_names]
                spec = {"model": str(model_dir), "groups": [group], "rounds": rounds, "restart": v["restart"],
                        "workloads": [{k: w[k] for k in ("name", "prompt_sets", "twin_prompt_sets", "max_tokens",
                                                         "batch") if k in w} for w in wl]}
                stem = f"vllm-{folder}-{group['name']}"
                spec_path, out_path = self.work / f"{stem}-spec.json", self.work / f"{stem}-out.json"
                spec_path.write_text(json.dumps(spec))
                with self.timed(f"vLLM {group['name']} ({folder} folder, {len(group['configs'])} engines, "
                                f"{rounds} interleaved rounds)"):
                    self._run_vllm_bench(spec_path, out_path, self.work / f"{stem}.log")
                raw = json.loads(out_path.read_text())[group["name"]]
                data[group["name"]] = {"rows": self._vllm_rows(raw, wl, folder, group["name"]),
                                       "rounds": rounds, "restart": v["restart"], "startup_s": raw["startup_s"]}
                if "top1_check" in raw:
                    data["top1_check"] = raw["top1_check"]
                    data["drift_test"] = drift_verdict(raw["top1_check"], MAX_RISK)
            data["targets"] = vllm_targets(data)
            for line in targets_lines(data["targets"]):
                self.log("  " + line)
            self.results["vllm"][folder] = data

    def _run_vllm_bench(self, spec_path: Path, out_path: Path, log_path: Path) -> None:
        run_vllm_bench(spec_path, out_path, log_path, self.log)

    def _channel_byte_ideal(self, vanilla_s: List[float], runs: List[Dict[str, Any]],
                            workload: Dict[str, Any]) -> Optional[float]:
        """Channel soft exit's byte-aware ideal: the engine's measured MLP time less the share of the MLP's
        weights its rows need not read (held-out news, HF: every active channel's weights read once per forward;
        at batch 1 a token's own inactive channels, at 16 rows those inactive in all 16, an upper bound for
        larger forwards), over vanilla's time; median over rounds. None without the MLP time accounting."""
        row = next((r for r in self.results.get("channels", {}).get("rows", []) if r["variant"] == "calibrated"),
                   None)
        if row is None:
            return None
        saved = row["weight_bytes_saved_b1"] if workload["kind"] == "decode" and workload["batch"] == 1 \
            else row["weight_bytes_saved_b16"]
        return ideal_over(vanilla_s, [r["mlp_seconds"] * saved if r.get("mlp_seconds") else None for r in runs])

    def _vllm_rows(self, raw: Dict[str, Any], workloads: List[Dict[str, Any]], folder: str,
                   execution: str) -> List[Dict[str, Any]]:
        rows = []
        for w in workloads:
            base = raw["runs"]["vanilla"][w["name"]]
            base_s = [r["seconds"] for r in base]
            for name in raw["configs"][1:]:
                runs = raw["runs"][name][w["name"]]
                secs = [r["seconds"] for r in runs]
                # a twin pass is against vanilla's time in that pass
                twin = name in raw.get("twins", {})
                vanilla_s = [r["vanilla_seconds"] for r in runs] if twin else base_s
                paired = [b / s for b, s in zip(vanilla_s, secs)]  # same round, same prompts
                forward = per_forward_speedup([r.get("vanilla_forward_seconds") for r in runs] if twin
                                              else [r.get("forward_seconds") for r in base], runs)
                per_fwd = "n/a" if forward is None else f"{forward['median']:.3f}x"
                skipped = float(np.median([r["skipped_mlp_fraction"] for r in runs]))
                speed = float(np.median(paired))
                ideal = compute_summary(self.shape, skipped * self.L, w["context"],
                                        logits=w["kind"] == "decode")["ideal_speedup"]
                byte_ideal = byte_aware_ideal(vanilla_s, runs)
                gathers = float(np.median([r.get("gathers", 0) for r in runs]))
                kernel_calls = float(np.median([r.get("kernel_calls", 0) for r in runs]))
                kernel_rows = [r.get("kernel_up_to_rows") for r in runs if r.get("kernel_up_to_rows") is not None]
                if name == CHANNELS:  # what a kernel reading only the active channels' weights could save
                    byte_ideal = self._channel_byte_ideal(vanilla_s, runs, w)
                rows.append({"workload": w["name"], "kind": w["kind"], "batch": w["batch"], "config": name,
                             "vanilla_s": float(np.median(vanilla_s)), "sedac_s": float(np.median(secs)),
                             "speedup": speed, "speedup_min": min(paired), "speedup_max": max(paired),
                             "rounds": len(paired), "skipped_mlp_fraction": skipped, "ideal_speedup": ideal,
                             "forward_speedup": forward["median"] if forward else None,
                             "forward_speedup_min": forward["min"] if forward else None,
                             "forward_speedup_max": forward["max"] if forward else None,
                             **realized_vs_ideal(speed, ideal), "byte_ideal_speedup": byte_ideal,
                             "byte_speedup_ratio": speed / byte_ideal if byte_ideal else None,
                             "gathers": gathers, "kernel_calls": kernel_calls,
                             "kernel_up_to_rows": kernel_rows or None,
                             "kernel_measured": next((r["kernel_measured"] for r in runs if r.get("kernel_measured")),
                                                     None)})
                self.log(f"  {folder} {execution} {w['name']:36s} {name:24s} {speed:.3f}x "
                         f"[{min(paired):.3f}-{max(paired):.3f}] (per forward {per_fwd}, FLOP ideal {ideal:.3f}x, "
                         f"byte-aware ideal "
                         f"{'n/a' if byte_ideal is None else f'{byte_ideal:.3f}x'}, skipped {skipped:.2%}, "
                         f"gather-path layer calls {gathers:.0f}"
                         + (f", channel-kernel layer calls {kernel_calls:.0f}, kernel up to rows {kernel_rows}"
                            if name == CHANNELS else "") + ")")
        return rows
