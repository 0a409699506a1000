"""``sedac-probes collect``: hidden states, logit-lens entropy and exit labels from a local HF model.

Output directory::

    collect.json              settings, model identity, progress ("complete": true when done)
    shard-00000.safetensors   one shard per `shard_windows` windows of `max_length` tokens

Per shard, for every token (the last position of each window is dropped: it
has no next token) and checkpoint layer ``l``:

    hidden.{l}        float16 [tokens, hidden]  residual stream after layer l
    entropy.{l}       float32 [tokens]          logit-lens entropy (nats): final norm + LM head on that stream
    lens_match.{l}    uint8   [tokens]          logit-lens top-1 == the full model's top-1   (label a)
    cascade_safe.{l}  uint8   [tokens]          full model's top-1 survives a cascade exit at l (label b)

and ``top1`` (int64, full model), ``nll`` (float32, next-token NLL of the full
model), ``token_id`` (int64), ``position`` (int32). Label (b) comes from one
extra pass per checkpoint in which every token skips the MLPs of layers
``l+1 .. L-protect_last-1`` (the first ``protect_first`` positions never exit).

Shards are written to ``*.tmp`` and renamed, so a shard file that exists is
complete; an interrupted run is resumed by running the same command again
(``--overwrite`` starts over). Different settings in an existing directory are
an error rather than a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sedac_monitor.api import (
    InputError,
    cascade_labels,
    find_layout,
    load_model,
    model_identity,
    progress,
    read_text,
    token_windows,
)

DATA_FORMAT = "sedac_probes_data"
DATA_VERSION = 1
META = "collect.json"

Log = Callable[[str], None]


def default_layers(num_layers: int, count: int = 3) -> List[int]:
    """Evenly spaced checkpoints: round(L * i / (count + 1)) - 1 (L = 30 gives 7, 14, 21)."""
    layers = sorted({max(0, min(num_layers - 2, round(num_layers * i / (count + 1)) - 1))
                     for i in range(1, count + 1)})
    return layers


def parse_layers(text: Optional[str], num_layers: int) -> List[int]:
    if text is None or text == "":
        return default_layers(num_layers)
    try:
        layers = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise InputError(f"--layers must be comma-separated integers like 7,14,21, got {text!r}") from None
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise InputError(f"--layers must be strictly increasing, got {text}")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise InputError(f"--layers must lie in [0, {num_layers - 1}] for this {num_layers}-layer model, got {text}")
    return layers


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_meta(directory: Path) -> Dict[str, Any]:
    path = directory / META
    if not path.is_file():
        raise InputError(f"no SEDAC probe data in {directory} ({META} missing); run `sedac-probes collect` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if meta.get("format") != DATA_FORMAT or meta.get("format_version") != DATA_VERSION:
        raise InputError(f"{path} is not SEDAC probe data version {DATA_VERSION}")
    return meta


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def collect(model_dir: Any, text_file: Any, out_dir: Any, layers: Optional[str] = None, samples: int = 64,
            max_length: int = 512, batch_size: int = 4, shard_windows: int = 8, protect_last: int = 0,
            protect_first: int = 1, overwrite: bool = False, log: Log = print,
            model_and_tokenizer: Any = None, stop_after_shards: Optional[int] = None) -> Path:
    """Collect probe training data (see the module docstring). Returns ``out_dir``.

    ``stop_after_shards`` stops early after writing that many new shards, as
    an interruption would (for tests); rerunning resumes.
    """
    out = Path(out_dir)
    if shard_windows < 1 or batch_size < 1:
        raise InputError("--shard-windows and --batch-size must be >= 1")
    model, tokenizer = model_and_tokenizer or load_model(model_dir)
    layout = find_layout(model)
    L = layout.num_layers
    layer_list = parse_layers(layers, L)
    if protect_last < 0 or protect_last >= L:
        raise InputError(f"--protect-last must be in [0, {L - 1}], got {protect_last}")
    text = read_text(text_file)
    windows = token_windows(tokenizer, text, max_length, samples, source=str(text_file))
    n_shards = -(-windows.shape[0] // shard_windows)
    settings = {
        "format": DATA_FORMAT, "format_version": DATA_VERSION,
        "model": model_identity(model), "model_path": str(model_dir),
        "layers": layer_list, "num_layers": L, "max_length": max_length, "windows": int(windows.shape[0]),
        "text": str(text_file), "text_sha256": hashlib.sha256(Path(text_file).read_bytes()).hexdigest(),
        "protect_last": protect_last, "protect_first": protect_first, "shard_windows": shard_windows,
        "shards": n_shards,
    }
    meta_path = out / META
    if out.exists() and overwrite:
        for p in list(out.glob("shard-*.safetensors*")) + [meta_path]:
            p.unlink(missing_ok=True)
    if meta_path.is_file():
        old = read_meta(out)
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"{out} holds data collected with different settings ({', '.join(diff)}); "
                             f"use --overwrite to start over or choose another --out")
        if old.get("complete"):
            log(f"{out}: already complete ({old.get('tokens')} tokens); nothing to do")
            return out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):
        stale.unlink()  # half-written files of an interrupted run
    _write_json(meta_path, {**settings, "complete": False})

    from safetensors.torch import save_file

    done = [i for i in range(n_shards) if (out / shard_name(i)).is_file()]
    if done:
        log(f"{out}: resuming, {len(done)} of {n_shards} shards already written")
    t0 = time.perf_counter()
    written = 0
    for i in progress(range(n_shards), total=n_shards, desc="collect shards"):
        if (out / shard_name(i)).is_file():
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            log(f"stopped after {written} shards (as asked); rerun to resume")
            return out
        chunk = windows[i * shard_windows:(i + 1) * shard_windows]
        tensors = _collect_chunk(layout, chunk, layer_list, protect_last, protect_first, batch_size)
        tmp = out / (shard_name(i) + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": DATA_FORMAT})
        os.replace(tmp, out / shard_name(i))
        written += 1
    tokens = windows.shape[0] * (max_length - 1)
    _write_json(meta_path, {**settings, "complete": True, "tokens": int(tokens),
                            "seconds": round(time.perf_counter() - t0, 1)})
    log(f"collected {tokens} tokens x {len(layer_list)} layers into {out} ({n_shards} shards)")
    return out


def _collect_chunk(layout, windows: torch.Tensor, layers: Sequence[int], protect_last: int, protect_first: int,
                   batch_size: int) -> Dict[str, torch.Tensor]:
    n, length = windows.shape
    hidden: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    entropy: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    lens_top1: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    sims: List[torch.Tensor] = []

    def on_batch(sl, rec):
        rows = (sl.stop - sl.start)
        sim = torch.stack(rec.sims, 1).view(rows, length, -1)[:, :-1]
        sims.append(sim.reshape(-1, sim.shape[-1]).to(torch.float16))
        for layer in layers:
            h = rec.streams[layer].view(rows, length, -1)[:, :-1].reshape(-1, rec.streams[layer].shape[-1])
            hidden[layer].append(h.to(torch.float16))
            logp = torch.log_softmax(layout.logits(h).float(), dim=-1)
            entropy[layer].append(-(logp.exp() * logp).sum(-1))
            lens_top1[layer].append(logp.argmax(-1))

    base, safe = cascade_labels(layout, windows, layers, protect_last, batch_size, desc="collect batch",
                                keep_layers=layers, on_batch=on_batch, protect_first=protect_first)
    out: Dict[str, torch.Tensor] = {
        "top1": base.top1.contiguous(),
        "nll": base.nll.float().contiguous(),
        "token_id": windows[:, :-1].reshape(-1).contiguous(),
        "position": torch.arange(length - 1, dtype=torch.int32).repeat(n).contiguous(),
        # S_l after every layer (the V7 signal), for fused gates
        "similarity": torch.cat(sims).contiguous(),
    }
    for j, layer in enumerate(layers):
        out[f"hidden.{layer}"] = torch.cat(hidden[layer]).contiguous()
        out[f"entropy.{layer}"] = torch.cat(entropy[layer]).float().contiguous()
        out[f"lens_match.{layer}"] = (torch.cat(lens_top1[layer]) == base.top1).to(torch.uint8).contiguous()
        out[f"lens_top1.{layer}"] = torch.cat(lens_top1[layer]).to(torch.int32).contiguous()
        out[f"cascade_safe.{layer}"] = safe[:, j].contiguous()
    return out


def load_data(directory: Any, layers: Optional[Sequence[int]] = None, features: bool = True) -> Dict[str, Any]:
    """Read a complete data directory into memory: ``{"meta", "top1", "nll", "position", "token_id",
    "hidden": {l: float16}, "entropy": {l}, "lens_match": {l}, "cascade_safe": {l}}``, plus
    ``"similarity"`` ([tokens, layers]) and ``"lens_top1": {l}`` when the data has them (collected by
    this version; fused gates need them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    meta = read_meta(path)
    if not meta.get("complete"):
        raise InputError(f"{path} is incomplete (collection was interrupted); rerun the same "
                         f"`sedac-probes collect` command to finish it")
    layers = list(meta["layers"]) if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in meta["layers"]]
    if missing:
        raise InputError(f"{path} has no data for layer(s) {missing} (collected: {meta['layers']})")
    parts: Dict[str, List[torch.Tensor]] = {}
    for i in range(meta["shards"]):
        shard = path / shard_name(i)
        if not shard.is_file():
            raise InputError(f"SEDAC probe data shard missing: {shard}")
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"SEDAC probe data shard unreadable: {shard}: {exc}") from exc
        for key, t in tensors.items():
            if key.startswith("hidden.") and not features:
                continue
            parts.setdefault(key, []).append(t)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    data: Dict[str, Any] = {"meta": meta, "path": path}
    for key in ("top1", "nll", "position", "token_id"):
        data[key] = cat[key]
    data["similarity"] = cat.get("similarity")
    data["lens_top1"] = ({layer: cat[f"lens_top1.{layer}"] for layer in layers}
                         if all(f"lens_top1.{layer}" in cat for layer in layers) else None)
    for group in ("hidden", "entropy", "lens_match", "cascade_safe"):
        if group == "hidden" and not features:
            continue
        data[group] = {layer: cat[f"{group}.{layer}"] for layer in layers}
    data["layers"] = layers
    return data


def load_probes_for(probe_dir: Any, data: Dict[str, Any]):
    """Load probes checked against the model the collected ``data`` came from, and require data for every
    probe layer."""
    from .io import load

    meta = data["meta"]
    model = meta["model"]
    probes = load(probe_dir, model_config={"hidden_size": model["hidden_size"], "num_hidden_layers": meta["num_layers"],
                                           "intermediate_size": model["intermediate_size"],
                                           "vocab_size": model["vocab_size"]},
                  fingerprint=model.get("fingerprint"))
    missing = [layer for layer in probes.layers if layer not in meta["layers"]]
    if missing:
        raise InputError(f"{data['path']} has no data for probe layer(s) {missing} (collected: {meta['layers']})")
    return probes
