"""What every stage mixin of :class:`~sedac_bench.run.Bench` reads: the attributes ``Bench.__init__`` and
``Bench.load`` set, and those the quality stages leave for the later ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from .metrics import ModelShape


class BenchState:
    """Declarations only (for the type checker and the reader); :class:`~sedac_bench.run.Bench` sets them."""

    # set by Bench.__init__ and Bench.load
    root: Path  # the assets folder
    command: str
    out: Path
    work: Path
    size: Dict[str, Any]
    size_name: str
    texts: Dict[str, Path]
    model: Any
    tok: Any
    layout: Any
    model_dir: Path
    qwen_dir: Path
    results: Dict[str, Any]
    shape: ModelShape
    L: int
    eval_windows: torch.Tensor
    log: Callable[[str], None]
    timed: Callable[[str], Any]
    # set by the stages, in the order run() calls them
    monitor_cfg: Dict[str, Any]  # Bench.calibrate_monitor
    probes: Dict[str, Any]  # ProbeStages.train_probes
    base: Any  # QualityStages.held_out_trace: the unmodified held-out pass
    rows: List[Dict[str, Any]]  # QualityStages.quality: every method's held-out row
    best: Dict[str, Any]  # QualityStages.quality: the headline method's row
    methods: Callable[[], List[Any]]  # QualityStages.methods
