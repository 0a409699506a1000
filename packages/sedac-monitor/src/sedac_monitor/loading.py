"""Loading local Hugging Face models and text: token windows, batching, progress bars, and the error a
user-supplied path or value that cannot be used raises.

Shared by ``sedac-monitor calibrate``, ``sedac-probes collect`` and sedac-bench.
Everything here reads local folders and files only; a hub id that is not a
local folder is an error that says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch

from .layouts import find_layout


class InputError(ValueError):
    """A user-supplied path, file or value is unusable; the message names it."""


def load_model(model_dir: Any, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF folder, in eval() on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path} (SEDAC loads local Hugging Face folders only)")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:  # transformers' errors for broken or unknown folders
        raise InputError(f"cannot load the model in {path}: {exc}") from exc
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise InputError(f"cannot load the tokenizer from {path}: {exc}") from exc
    find_layout(model)  # fail early, naming the class, for unsupported layouts
    return model, tokenizer


def read_text(path: Any) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"text file is empty: {p}")
    return text


def token_windows(tokenizer, text: str, max_length: int, samples: Optional[int] = None,
                  source: str = "text") -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``max_length`` tokens from ``text``
    (the tail that does not fill a window is dropped). Returns int64 ``[n, max_length]``."""
    if max_length < 2:
        raise InputError(f"max_length must be >= 2, got {max_length}")
    if samples is not None and samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    ids: List[int] = []
    need = None if samples is None else samples * max_length
    # tokenize paragraph by paragraph: fast, and stops once enough tokens are read
    for para in text.split("\n\n"):
        if para.strip():
            ids.extend(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // max_length
    if samples is not None:
        n = min(n, samples)
    if n == 0:
        raise InputError(f"{source} has {len(ids)} tokens, fewer than one window of max_length={max_length}")
    return torch.tensor(ids[: n * max_length], dtype=torch.int64).view(n, max_length)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


PROGRESS_ENV = "SEDAC_PROGRESS"
"""The one environment variable sedac-monitor reads: 0 turns its progress bars off."""


def progress(iterable, total: Optional[int] = None, desc: str = "", enabled: Optional[bool] = None):
    """tqdm progress bar on stderr (off when SEDAC_PROGRESS=0)."""
    if enabled is None:
        enabled = os.environ.get(PROGRESS_ENV, "1") != "0"
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)














def drop_last_position(per_token: torch.Tensor, windows: int, length: int) -> torch.Tensor:
    """[windows*length, ...] -> [windows*(length-1), ...], matching :class:`Pass`."""
    return per_token.reshape(windows, length, *per_token.shape[1:])[:, :-1].reshape(-1, *per_token.shape[1:])


def split_windows(n: int, fraction: float) -> Tuple[slice, slice]:
    cut = max(1, min(n - 1, int(round(n * fraction))))
    return slice(0, cut), slice(cut, n)
