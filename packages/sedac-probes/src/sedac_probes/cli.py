"""``sedac-probes``: collect -> train -> calibrate, plus ``bench`` (probe cost vs a decoder layer)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence


def _floats(name: str):
    def parse(text: str) -> List[float]:
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers like 0.2,0.6,0.9, "
                                             f"got {text!r}") from None
        if any(not (0.0 <= v <= 1.0) for v in values):
            raise argparse.ArgumentTypeError(f"{name} values must be in [0, 1], got {text}")
        return values
    return parse


def _number(name: str, kind=float, lo: float = 0.0, hi: float = float("inf"), lo_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if value < lo or value > hi or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if lo_open else '>='} {lo}"
                                             + (f" and <= {hi}" if hi != float('inf') else "") + f", got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sedac-probes", description="SEDAC V6 probes: collect, train, calibrate")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="hidden states, logit-lens entropy and exit labels from a local HF model")
    c.add_argument("--model", required=True, type=Path, help="local Hugging Face model folder")
    c.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    c.add_argument("--out", required=True, type=Path, help="data directory (resumable)")
    c.add_argument("--layers", default=None, help="checkpoint layers, e.g. 7,14,21 (default: evenly spaced)")
    c.add_argument("--samples", type=_number("--samples", int, 1), default=64,
                   help="windows of text to collect (default 64)")
    c.add_argument("--max-length", type=_number("--max-length", int, 2), default=512,
                   help="tokens per window (default 512)")
    c.add_argument("--batch-size", type=_number("--batch-size", int, 1), default=4,
                   help="windows per forward pass (default 4)")
    c.add_argument("--shard-windows", type=_number("--shard-windows", int, 1), default=8,
                   help="windows per shard file; a finished shard is never recomputed on resume (default 8)")
    c.add_argument("--protect-last", type=_number("--protect-last", int, 0), default=0,
                   help="last N layers always run their MLP (label b is computed under this setting)")
    c.add_argument("--overwrite", action="store_true", help="discard existing data in --out")

    t = sub.add_parser("train", help="train one LREProbe per checkpoint layer")
    t.add_argument("--data", required=True, type=Path, help="data directory written by `sedac-probes collect`")
    t.add_argument("--out", required=True, type=Path, help="probe directory to write")
    t.add_argument("--target", choices=("entropy", "safety", "fusion"), default="entropy",
                   help="entropy: predict the logit-lens entropy (the original documents' target); safety: "
                        "predict whether exiting keeps the model's top-1; fusion: a gate over trained safety "
                        "probes (--probes), the V7 similarity, its trend and the position (default entropy)")
    t.add_argument("--probes", type=Path, default=None,
                   help="with --target fusion: the safety probe directory the gate builds on")
    t.add_argument("--epochs", type=_number("--epochs", int, 1), default=20,
                   help="most passes over the training split; early stopping may end sooner (default 20)")
    t.add_argument("--batch-size", type=_number("--batch-size", int, 1), default=1024,
                   help="tokens per optimizer update (default 1024)")
    t.add_argument("--rank", type=_number("--rank", int, 1), default=64,
                   help="width of the probe's low-rank projection (default 64)")
    t.add_argument("--lr", type=_number("--lr", float, 0.0, lo_open=True), default=1e-3,
                   help="Adam learning rate (default 0.001)")
    t.add_argument("--seed", type=_number("--seed", int, 0), default=0,
                   help="seed for the split, initialisation and batch order; equal seeds give equal probes "
                        "(default 0)")
    t.add_argument("--val-fraction", type=_number("--val-fraction", float, 0.0, 1.0, lo_open=True), default=0.2,
                   help="share of windows held out for early stopping and the reported metrics (default 0.2)")
    t.add_argument("--patience", type=_number("--patience", int, 1), default=3,
                   help="epochs without improvement on the held-out split before stopping (default 3)")

    v = sub.add_parser("evaluate", help="per-layer R2 / Spearman / AUROC of trained probes on collected data")
    v.add_argument("--probes", required=True, type=Path, help="probe directory written by `sedac-probes train`")
    v.add_argument("--data", required=True, type=Path,
                   help="data directory written by `sedac-probes collect` (ideally not the training text)")

    k = sub.add_parser("calibrate", help="choose thresholds and write them (with evidence) into the probe metadata")
    k.add_argument("--probes", required=True, type=Path,
                   help="probe directory written by `sedac-probes train`; the thresholds are written into it")
    k.add_argument("--data", required=True, type=Path, help="collected data (ideally not the training text)")
    k.add_argument("--exit-rates", type=_floats("--exit-rates"), default=None,
                   help="per-checkpoint exit rates, e.g. 0.2,0.6,0.9: each threshold is that quantile of the risks")
    k.add_argument("--max-risk", type=_number("--max-risk", float, 0.0, 0.999), default=None,
                   help="largest allowed fraction of tokens whose top-1 changes; the most skipped work within it")
    k.add_argument("--strategy", choices=("conservative", "balanced", "aggressive"), default=None,
                   help="the original documents' presets: threshold proportions and an exit rate (with --max-risk: "
                        "only the proportions)")
    k.add_argument("--model", type=Path, default=None,
                   help="the model the data came from: with --max-risk, candidates are checked by running it "
                        "(replay alone is optimistic)")
    k.add_argument("--max-delta-ppl", type=_number("--max-delta-ppl", float, 0.0), default=0.02,
                   help="with --model: largest allowed perplexity increase on the data's text (default 0.02)")
    k.add_argument("--budget", type=_number("--budget", int, 1), default=8,
                   help="settings measured by running the model, with --model (default 8, as in sedac-monitor)")

    b = sub.add_parser("bench", help="cost of the probes relative to one decoder layer of the model")
    b.add_argument("--model", required=True, type=Path, help="local Hugging Face model folder")
    b.add_argument("--probes", type=Path, default=None, help="probe directory (default: random rank-64 probes)")
    b.add_argument("--tokens", type=_number("--tokens", int, 1), default=2048,
                   help="tokens in the timed forward (default 2048)")
    b.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sedac_monitor.api import InputError, UnsupportedModelError

    from .io import ProbeFileError

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        if args.command == "collect":
            from .collect import collect

            out = collect(args.model, args.text, args.out, args.layers, args.samples, args.max_length,
                          args.batch_size, args.shard_windows, args.protect_last, overwrite=args.overwrite, log=log)
            print(out)
        elif args.command == "train":
            if args.target == "fusion":
                from .fusion import train_fusion

                if args.probes is None:
                    raise InputError("--target fusion builds on trained safety probes: give --probes DIR")
                meta = train_fusion(args.data, args.probes, args.out, args.seed, args.val_fraction, log=log)
                print(json.dumps(meta["fusion"]["per_layer"], indent=2))
            else:
                from .train import train

                meta = train(args.data, args.out, args.target, args.epochs, args.batch_size, args.rank, args.lr,
                             args.seed, args.val_fraction, args.patience, log=log)
                print(json.dumps(meta["training"]["per_layer"], indent=2))
        elif args.command == "evaluate":
            from .evaluate import evaluate

            print(json.dumps(evaluate(args.probes, args.data, log=log), indent=2))
        elif args.command == "calibrate":
            from .calibrate import calibrate

            evidence = calibrate(args.probes, args.data, args.exit_rates, args.max_risk, args.strategy, log=log,
                                 model=args.model, budget=args.budget, max_delta_ppl=args.max_delta_ppl)
            print(json.dumps(evidence, indent=2))
            if evidence["status"] != "ok":
                print(f"sedac-probes: {evidence['status']} (max risk {args.max_risk}"
                      + (f", max ΔPPL {args.max_delta_ppl}" if args.model is not None else "")
                      + f"); {args.probes} now holds "
                      "thresholds that never exit", file=sys.stderr)
        else:
            from .bench import bench

            result = bench(args.model, args.probes, args.tokens)
            print(f"probe cost on {result['tokens']} tokens ({result['torch_threads']} threads): one checkpoint "
                  f"probe {result['probe_ms']:.3f} ms = {result['probe_vs_layer']:.2%} of one decoder layer "
                  f"({result['layer_ms']:.2f} ms); all {result['checkpoints']} probes in one call "
                  f"{result['bank_ms']:.3f} ms = {result['bank_vs_layer']:.2%}")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (InputError, ProbeFileError, UnsupportedModelError) as exc:  # the project's own errors only
        print(f"sedac-probes: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
