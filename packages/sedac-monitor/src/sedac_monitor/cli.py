"""``sedac-monitor``: calibrate V7 exits for a local HF model, evaluate a config on held-out text."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .calibrate import DEFAULT_MAX_DELTA_PPL, STRATEGIES, calibrate, measure, ppl_text, write_config
from .layouts import UnsupportedModelError
from .loading import InputError


def _float_in(name: str, lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo}, {hi}], got {text}")
        return value
    return parse


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face model folder")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    p.add_argument("--tokens", type=_positive("--tokens"), default=4096, help="tokens of text to use (default 4096)")
    p.add_argument("--max-length", type=_positive("--max-length"), default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=4, help="windows per forward (default 4)")


def evaluate(model_dir: Any, text_file: Any, config: Dict[str, Any], tokens: int, max_length: int, batch_size: int,
             timing_tokens: int = 0, model_and_tokenizer: Any = None) -> Dict[str, Any]:
    """Measure a config (and the original documents' defaults) on ``text_file``; optionally time a prefill."""
    from .accelerator import load_config, monitor_rule
    from .calibrate import ORIGINAL_DEFAULTS
    from .layouts import find_layout
    from .loading import load_model, read_text, token_windows
    from .sparsity import ChannelSparsity, attach_channels
    from .teacher import teacher_forced

    model, tokenizer = model_and_tokenizer or load_model(model_dir)
    layout = find_layout(model)
    L = layout.num_layers
    cfg = load_config(config, L)
    windows = token_windows(tokenizer, read_text(text_file), max_length, max(1, tokens // max_length),
                            source=str(text_file))
    base = teacher_forced(layout, windows, None, batch_size, desc="unmodified")
    keys = ("tau", "consecutive_k", "min_layer", "protect_last", "scope")
    channels = ChannelSparsity.from_json(cfg["channels"], L) if "channels" in cfg else None
    with attach_channels(layout, channels) if channels is not None else contextlib.nullcontext() as att:
        measured = measure(layout, windows, monitor_rule(L, *(cfg[k] for k in keys)), base.top1, base.nll,
                           batch_size, protect_first=cfg.get("protect_first", 1))
    if att is not None:  # channel soft exit: what it zeroed, on top of any exits
        s_in, s_mid = att.counts.sparsity()
        measured.update(channel_mlp_work_saved=att.counts.mlp_work_saved(), input_sparsity=s_in,
                        inner_sparsity=s_mid)
    result = {
        "text": str(text_file),
        "config": measured,
        # the original documents' defaults as they define them: no protected first token
        "original_defaults": measure(layout, windows, monitor_rule(L, **ORIGINAL_DEFAULTS), base.top1, base.nll,
                                 batch_size, protect_first=0),
    }
    if timing_tokens:
        result["timing"] = time_prefill(layout, tokenizer, text_file, cfg, timing_tokens)
    return result


def time_prefill(layout, tokenizer, text_file, cfg: Dict[str, Any], n_tokens: int, repeats: int = 3) -> Dict[str, Any]:
    """Wall-clock of one ``n_tokens`` prefill, unpatched vs patched, alternating, best of ``repeats``."""
    import torch

    from .accelerator import create_universal_accelerator
    from .loading import read_text, token_windows

    ids = token_windows(tokenizer, read_text(text_file), n_tokens, 1, source=str(text_file))
    model = layout.model
    acc = create_universal_accelerator(model, config=cfg)
    plain, patched = [], []
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            plain.append(time.perf_counter() - t)
            with acc:
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                patched.append(time.perf_counter() - t)
    stats = acc.stats
    return {"prefill_tokens": n_tokens, "unpatched_s": min(plain), "patched_s": min(patched),
            "speedup": min(plain) / min(patched), "skipped_mlp_fraction": stats["skipped_mlp_fraction"],
            "torch_threads": torch.get_num_threads()}


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `--mode` (an old spelling of --strategy) must not be taken as `--model`
    parser = argparse.ArgumentParser(prog="sedac-monitor", description="SEDAC V7 zero-shot exits for HF models",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibrate", allow_abbrev=False,
                       help="search tau/K/min_layer/protect_last/scope within a risk budget")
    _common(p)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="balanced",
                   help="default max risk: conservative 0.05, balanced 0.15, aggressive 0.30 (default balanced)")
    p.add_argument("--max-risk", type=_float_in("--max-risk", 0.0, 0.999), default=None,
                   help="largest allowed fraction of tokens whose top-1 changes (overrides the strategy's default)")
    p.add_argument("--max-delta-ppl", type=_float_in("--max-delta-ppl", 0.0, 10.0), default=DEFAULT_MAX_DELTA_PPL,
                   help="largest allowed perplexity increase, teacher-forced on the text (default "
                        f"{DEFAULT_MAX_DELTA_PPL}): the top-1 alone misses damage to the distribution")
    p.add_argument("--confidence", type=_float_in("--confidence", 0.5, 0.9999), default=None,
                   help="make the risk bound hold with this probability (Clopper-Pearson on held-out tokens)")
    p.add_argument("--budget", type=_positive("--budget"), default=8,
                   help="settings measured by running the model (default 8)")
    p.add_argument("--channels", action="store_true",
                   help="spend the budget on channel soft exit (per token, the MLP skips the weights its small "
                        "activations would multiply) instead of whole-MLP exits")
    p.add_argument("--signal-weight", type=_float_in("--signal-weight", 0.0, 4.0), default=0.0,
                   help="with --channels: scale each token's thresholds by how little its residual stream moved "
                        "(0, the default: one threshold per layer)")
    p.add_argument("--out", type=Path, default=Path("sedac_config.json"),
                   help="where to write the config (default sedac_config.json)")
    e = sub.add_parser("evaluate", allow_abbrev=False,
                       help="measure a sedac_config.json (and the original documents' defaults) on held-out text")
    _common(e)
    e.add_argument("--config", required=True, type=Path, help="a sedac_config.json from `sedac-monitor calibrate`")
    e.add_argument("--timing-tokens", type=_positive("--timing-tokens"), default=None,
                   help="also time a prefill of this many tokens, unpatched vs patched")
    e.add_argument("--json", type=Path, default=None, help="write the result here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "calibrate" and args.signal_weight and not args.channels:
        parser.error("--signal-weight applies to channel soft exit: add --channels")
    try:
        if args.command == "calibrate":
            cfg = calibrate(args.model, args.text, args.strategy, args.max_risk, args.confidence, args.tokens,
                            args.max_length, args.batch_size, args.budget,
                            log=lambda m: print(m, file=sys.stderr), max_delta_ppl=args.max_delta_ppl,
                            channels=args.channels, signal_weight=args.signal_weight)
            path = write_config(cfg, args.out)
            ev = cfg["evidence"]
            chosen = ev["chosen"]
            print(f"wrote {path}: {cfg['status']}")
            if args.channels:
                if chosen:
                    print(f"  channel soft exit: MLP work saved {chosen['mlp_work_saved']:.2%}, risk "
                          f"{chosen['measured_risk']:.2%}, ΔPPL {ppl_text(chosen['delta_ppl'])} on {chosen['tokens']} "
                          "tokens")
                print(f"  {ev['recommendation']}")
                return 0
            if chosen:
                print(f"  scope={cfg['scope']} tau={cfg['tau']} K={cfg['consecutive_k']} "
                      f"min_layer={cfg['min_layer']} protect_last={cfg['protect_last']}: skipped MLP "
                      f"{chosen['skipped_mlp_fraction']:.2%}, risk {chosen['measured_risk']:.2%}, "
                      f"ΔPPL {ppl_text(chosen['delta_ppl'])} on {chosen['tokens']} tokens")
            s = ev["original_defaults"]
            print(f"  original defaults (tau 0.98, K 2, cascade): skipped {s['skipped_mlp_fraction']:.2%}, "
                  f"risk {s['measured_risk']:.2%}, ΔPPL {ppl_text(s['delta_ppl'])}")
            print(f"  {ev['recommendation']}")
        else:
            result = evaluate(args.model, args.text, args.config, args.tokens, args.max_length, args.batch_size,
                              args.timing_tokens or 0)
            for name in ("config", "original_defaults"):
                m = result[name]
                channel = (f"  channel soft exit saved {m['channel_mlp_work_saved']:.2%}"
                           if "channel_mlp_work_saved" in m else "")
                print(f"{name:17s} skipped MLP {m['skipped_mlp_fraction']:.2%}{channel}  risk "
                      f"{m['measured_risk']:.2%}  ΔPPL {ppl_text(m['delta_ppl'])}  "
                      f"({m['tokens']} tokens of {args.text})")
            if "timing" in result:
                t = result["timing"]
                print(f"prefill {t['prefill_tokens']} tokens: unpatched {t['unpatched_s']:.3f} s, patched "
                      f"{t['patched_s']:.3f} s, speed-up {t['speedup']:.3f}x")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (InputError, UnsupportedModelError) as exc:  # the project's own errors; anything else is a bug
        print(f"sedac-monitor: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
