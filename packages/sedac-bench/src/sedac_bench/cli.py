"""``sedac-bench`` command line: assets, run, suite, load, online, readme."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import assets


def display_path(arg: str) -> str:
    """An argument as a command line to show others: absolute paths under the working directory become
    relative, other absolute paths (temporary folders of one machine) keep only their last two parts."""
    if not arg.startswith("/"):
        return arg
    path, cwd = Path(arg), Path.cwd()
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(Path("…", *path.parts[-2:]))


def _assets_out_config(p: argparse.ArgumentParser, name: str) -> None:
    """--cache, --out and --config of the commands that serve a calibrated config and write NAME.md/.json."""
    p.add_argument("--cache", type=Path, default=None, help="asset directory (built if missing)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help=f"where {name}.md and {name}.json go (default: bench-results)")
    p.add_argument("--config", type=Path, default=None, help="sedac_config.json (default: calibrate one)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sedac-bench", description="SEDAC benchmarks and their assets")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="convert the bundled SmolLM2 model and extract the real text corpora")
    p.add_argument("--cache", type=Path, default=None,
                   help="asset directory (default: $SEDAC_ASSETS or ~/.cache/sedac/assets)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache verifies")
    r = sub.add_parser("run", help="quality / compute / wall-clock of SEDAC vs baselines; writes the report")
    r.add_argument("--cache", type=Path, default=None, help="asset directory (built if missing)")
    r.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="where report.md, results.json and the PNGs go (default: bench-results)")
    r.add_argument("--size", choices=("quick", "full"), default="quick",
                   help="quick: the demo (about 15 minutes on 2 cores; --no-vllm skips the vLLM part); full: every "
                        "stage and table (greedy generation, speculative drafts, HF wall-clock, soft-exit variants, "
                        "vLLM at batch 1/4/16/64 compiled and eager; about two hours on 2 cores: each of the vLLM "
                        "comparison's 4 rounds starts six compiled engines anew, about 20 minutes a round)")
    r.add_argument("--no-vllm", action="store_true", help="skip the vLLM throughput part")
    r.add_argument("--folders", default="llama", help="model folders for vLLM: llama, qwen2 or llama,qwen2")
    s = sub.add_parser("suite", help="the original SEDAC documents' test suite: quality, robustness, "
                                             "distribution shift, latency")
    _assets_out_config(s, "suite")
    s.add_argument("--no-server", action="store_true", help="skip the latency-under-load part")
    ld = sub.add_parser("load", help="sedac-vllm serve under concurrent load mixed with malformed requests, then "
                                     "SIGTERM under load: outcomes by kind, latency P50/P99, /metrics counters")
    _assets_out_config(ld, "load")
    ld.add_argument("--requests", type=int, default=1024, help="good completions to send (default 1024)")
    ld.add_argument("--concurrency", type=int, default=256, help="requests in flight at once (default 256)")
    ld.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    ld.add_argument("--alone", type=int, default=32,
                    help="outputs checked against the same request served alone (default 32)")
    on = sub.add_parser("online", help="online calibration through vLLM: per window of traffic unlike the "
                                       "calibration text, its risk estimate against the risk measured against vanilla")
    _assets_out_config(on, "online")
    on.add_argument("--prompts", type=int, default=8, help="prompts of 256 tokens per window (default 8)")
    on.add_argument("--each", type=int, default=2, help="windows per kind of text (default 2)")
    on.add_argument("--tolerance", type=float, default=0.05, help="SEDAC_RISK_TOLERANCE (default 0.05)")
    m = sub.add_parser("readme", help="regenerate the READMEs' marked results blocks from a results.json")
    m.add_argument("--results", type=Path, default=Path("bench-results/results.json"),
                   help="results.json of a `sedac-bench run` (default bench-results/results.json)")
    m.add_argument("--root", type=Path, default=Path("."),
                   help="repository root: README.md and packages/*/README.md are updated (default .)")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = "sedac-bench " + " ".join(shlex.quote(display_path(a)) for a in argv)
    try:
        if args.command == "assets":
            print(assets.build(args.cache, force=args.force))
        elif args.command == "run":
            from .run import run

            folders = tuple(f.strip() for f in args.folders.split(",") if f.strip())
            bad = [f for f in folders if f not in ("llama", "qwen2")]
            if bad:
                parser.error(f"--folders takes llama and/or qwen2, got {', '.join(bad)}")
            print(run(args.cache, args.out, args.size, not args.no_vllm, folders, log=log, command=command))
        elif args.command == "suite":
            from .suite import suite

            report = suite(args.cache, args.out, args.config, server=not args.no_server, log=log, command=command)
            print(report)
        elif args.command == "online":
            from .online_bench import online_run

            print(online_run(args.cache, args.out, args.config, args.prompts, args.each, args.tolerance, log=log,
                             command=command))
        elif args.command == "load":
            from .load_bench import load_run

            print(load_run(args.cache, args.out, args.config, args.requests, args.concurrency, args.max_tokens,
                           args.alone, log=log, command=command))
        else:
            from .report import update_readme

            if not args.results.is_file():
                print(f"sedac-bench: error: {args.results} not found; run `sedac-bench run` first", file=sys.stderr)
                return 2
            readmes = [args.root / "README.md", *sorted(args.root.glob("packages/*/README.md"))]
            for readme in readmes:
                try:
                    names = update_readme(args.results, readme)
                except ValueError:
                    continue  # no block in this README
                print(f"updated {readme} ({', '.join(names)}) from {args.results}")
    except (assets.AssetError, ValueError, FileNotFoundError) as exc:
        print(f"sedac-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
