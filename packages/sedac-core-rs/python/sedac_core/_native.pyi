# Hand-written stub of the Rust extension (src/py.rs). tests/test_stub.py checks
# it against the compiled module: same names, same parameters in the same order.
# Arrays are C-contiguous numpy arrays of the dtype named in each comment.
from typing import Optional

import numpy as np

__version__: str
MIN_THRESHOLD: float

def evaluate(
    risk: np.ndarray,  # float32 [tokens, checkpoints]
    thresholds: np.ndarray,  # float32 [checkpoints]
    targets: np.ndarray,  # float32 [checkpoints]
    weights: np.ndarray,  # float32 [checkpoints]
    decay: float,
    rule_code: int,  # 0 threshold (V6.0), 1 confidence (V6.1)
    soft: bool,
    soft_k: float,  # soft-exit steepness; 4 = tanh(2C - 1) * 0.5 + 0.5
    adaptive_decay: bool,  # decay per token and checkpoint (see ProbeController)
    decay_bonus: float,
    history: float,  # in [0, 1]: the recent exit rate the bonus scales
    out_exit: np.ndarray,  # int32 [tokens], written
    out_conf: np.ndarray,  # float32 [tokens, checkpoints], written
    out_soft: np.ndarray,  # float32 [tokens, checkpoints], written
) -> None: ...
def consecutive_exit(
    similarity: np.ndarray,  # float32 [tokens, layers]
    tau: float,
    k: int,
    min_layer: int,
    out: np.ndarray,  # int32 [tokens], written
) -> None: ...
def gated_mlp(
    x: np.ndarray,  # float32 [rows, hidden]
    gate_up: np.ndarray,  # float32 [hidden, 2 * inter], channel-major, gate outputs first
    down: np.ndarray,  # float32 [inter, hidden], channel-major
    t_in: float,
    t_mid: float,
    out: np.ndarray,  # float32 [rows, hidden], written
) -> tuple[int, int]: ...  # channels some row kept: of the input, of the down projection's input
def quantiles(
    risk: np.ndarray,  # float32 [tokens, columns]
    rates: np.ndarray,  # float32 [columns]
    out: np.ndarray,  # float32 [columns], written; NaN where no finite value
) -> None: ...
def replay_monitor(
    similarity: np.ndarray,  # float32 [tokens, layers]
    safe: Optional[np.ndarray],  # uint8 [tokens, layers]
    tau: np.ndarray,  # float32 [configs]
    k: np.ndarray,  # int64 [configs]
    min_layer: np.ndarray,  # int64 [configs]
    protect_last: np.ndarray,  # int64 [configs]
    per_layer: np.ndarray,  # uint8 [configs]
    out_exits: np.ndarray,  # int64 [configs], written
    out_skipped: np.ndarray,  # int64 [configs], written
    out_unsafe: np.ndarray,  # int64 [configs], written
) -> None: ...
def replay_probe(
    risk: np.ndarray,  # float32 [tokens, checkpoints]
    safe: Optional[np.ndarray],  # uint8 [tokens, checkpoints]
    layer_of: np.ndarray,  # int64 [checkpoints]
    num_layers: int,
    thresholds: np.ndarray,  # float32 [configs, checkpoints]
    targets: np.ndarray,  # float32 [configs, checkpoints]
    weights: np.ndarray,  # float32 [configs, checkpoints]
    decay: np.ndarray,  # float32 [configs]
    rule: np.ndarray,  # uint8 [configs]
    protect_last: np.ndarray,  # int64 [configs]
    out_exits: np.ndarray,  # int64 [configs], written
    out_skipped: np.ndarray,  # int64 [configs], written
    out_unsafe: np.ndarray,  # int64 [configs], written
) -> None: ...
def num_threads() -> int: ...
def set_parallel_for(address: int) -> None: ...  # a torch_parallel_for-like C function, or 0: rayon
def parallel_for() -> str: ...  # "rayon" or "external"

class ThresholdState:
    def __init__(
        self, thresholds: list[float], targets: list[float], alpha: float, warmup_observations: int, adaptive: bool
    ) -> None: ...
    def thresholds(self) -> list[float]: ...
    def set_thresholds(self, values: list[float]) -> None: ...
    @property
    def observations(self) -> int: ...
    def set_observations(self, observations: int) -> None: ...
    def observe(self, risk: np.ndarray) -> bool: ...
