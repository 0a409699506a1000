"""The probe directory: ``probes.safetensors`` + ``sedac_probes.json``. Never pickle.

``sedac_probes.json``::

    format: "sedac_probes", format_version: 1
    target: "entropy" | "safety", hidden_size, rank, layers: [7, 14, 21]
    model: {architecture, model_type, hidden_size, num_layers, intermediate_size, vocab_size, fingerprint}
    protect_last: int           (the cascade-label setting the probes were trained/calibrated with)
    training: {...}             (data, seed, per-layer metrics)
    calibration: {...} | null   (written by `sedac-probes calibrate`)
    thresholds: [...] | null    (V6.0 risk thresholds, one per layer)
    exit_rates: [...] | null    (per-checkpoint quantile levels of those thresholds)
    weights_sha256: "..."       (digest of the tensors below, see weights_digest: the two files belong together)

``probes.safetensors`` holds, per checkpoint layer ``l``: ``layer{l}.down.weight``
``[rank, hidden]``, ``layer{l}.down.bias``, ``layer{l}.norm.weight``,
``layer{l}.norm.bias`` ``[rank]``, ``layer{l}.head.weight`` ``[1, rank]``,
``layer{l}.head.bias`` ``[1]`` (float32).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, cast

import torch

from sedac_monitor.api import model_identity

from .probe import FUSION_FEATURES, GATE_TENSORS, TARGETS, LREProbe, ProbeBank

FORMAT = "sedac_probes"
FORMAT_VERSION = 1
META = "sedac_probes.json"
WEIGHTS = "probes.safetensors"
IDENTITY_KEYS = ("hidden_size", "num_layers", "intermediate_size", "vocab_size")


class ProbeFileError(ValueError):
    """A probe directory is missing, damaged, or does not fit the model; the message says which and where."""


@dataclass
class ProbeSet:
    """Loaded probes: the bank plus the metadata."""

    bank: ProbeBank
    meta: Dict[str, Any]
    path: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> List[int]:
        return list(self.bank.layers)

    @property
    def thresholds(self) -> Optional[List[float]]:
        return self.meta.get("thresholds")

    @property
    def exit_rates(self) -> Optional[List[float]]:
        return self.meta.get("exit_rates")

    @property
    def target(self) -> str:
        return self.meta["target"]

    @property
    def exits_disabled(self) -> bool:
        """True when calibration found no setting within its risk budget (``status`` says so): the
        thresholds it wrote never exit, and sedac-vllm serves these probes without exits."""
        return bool(self.meta.get("exits_disabled", False))

    @property
    def calibrated(self) -> bool:
        return self.meta.get("thresholds") is not None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes, in name order: what ``sedac_probes.json`` records of
    the weights it was written with."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save(directory: Any, bank: ProbeBank, meta: Mapping[str, Any]) -> Path:
    """Write a probe directory (weights first, then metadata, each atomically). The metadata records the
    weights' digest, so a save killed between the two files leaves a directory that refuses to load (new
    weights, old metadata) rather than one that looks complete."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = bank.tensors()
    full = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "target": bank.target,
            "hidden_size": bank.hidden_size, "rank": bank.rank, "layers": list(bank.layers),
            "weights_sha256": weights_digest(tensors)}
    _atomic_write(path / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(path / META, lambda p: p.write_text(json.dumps(full, indent=2) + "\n"))
    return path


def update_meta(directory: Any, **fields: Any) -> Dict[str, Any]:
    path = Path(directory) / META
    meta = _read_meta(path)
    meta.update(fields)
    _atomic_write(path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


_READ: Dict[Any, Any] = {}
"""File contents already read in this process, by path and the files' (mtime, size): a serving process
validates its probe directory at start-up and builds its model from it, and reads each file once."""


def _stamp(path: Path) -> Any:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _read_meta(path: Path) -> Dict[str, Any]:
    key = ("meta", str(path.resolve()), _stamp(path))
    if key[2] is not None and key in _READ:
        return dict(_READ[key])
    meta = _read_meta_file(path)
    _READ[key] = meta
    return dict(meta)


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The probe tensors (a shared, read-only dict: callers copy what they keep)."""
    key = ("weights", str(path.resolve()), _stamp(path))
    if key in _READ:
        return _READ[key]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProbeFileError(f"SEDAC probe weights unreadable (truncated or not safetensors): {path}: "
                             f"{exc}") from exc
    _READ[key] = tensors
    return tensors


def _read_meta_file(path: Path) -> Dict[str, Any]:
    if not path.parent.is_dir():
        raise ProbeFileError(f"SEDAC probe directory not found: {path.parent}")
    if not path.is_file():
        raise ProbeFileError(f"SEDAC probe metadata missing: {path}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProbeFileError(f"SEDAC probe metadata is not valid JSON: {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProbeFileError(f"SEDAC probe metadata must be a JSON object: {path}")
    return meta


def _require(meta: Dict[str, Any], path: Path, key: str, kind, check=lambda v: True, doc: str = "") -> Any:
    if key not in meta:
        raise ProbeFileError(f"SEDAC probe metadata {path} is missing {key!r}")
    value = meta[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
        raise ProbeFileError(f"SEDAC probe metadata {path}: {key!r} must be {doc}, got {value!r}")
    return value


def load(directory: Any, model_config: Any = None, fingerprint: Optional[str] = None,
         device: Any = "cpu") -> ProbeSet:
    """Read and validate a probe directory.

    ``model_config`` (HF config object, dict or model): the probes must have
    been made for a model of the same hidden size, depth, MLP width and
    vocabulary. ``fingerprint`` (see ``sedac_monitor.api.model_identity``):
    when given, it must match the one recorded, which tells checkpoints of one
    architecture apart. Errors name the file and the problem.
    """
    path = Path(directory)
    meta_path = path / META
    meta = _read_meta(meta_path)
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ProbeFileError(f"{meta_path} is not a SEDAC probe file (format {fmt!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ProbeFileError(f"{meta_path} has format_version {version!r}; this sedac-probes reads version "
                             f"{FORMAT_VERSION} (retrain or upgrade sedac-probes)")
    target = _require(meta, meta_path, "target", str, lambda v: v in TARGETS, f"one of {TARGETS}")
    hidden = _require(meta, meta_path, "hidden_size", int, lambda v: v > 0, "a positive integer")
    rank = _require(meta, meta_path, "rank", int, lambda v: v > 0, "a positive integer")
    layers = _require(meta, meta_path, "layers", list,
                      lambda v: len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
                      and all(b > a for a, b in zip(v, v[1:])),
                      "a non-empty, strictly increasing list of layer indices")
    for key in ("thresholds", "exit_rates"):
        value = meta.get(key)
        if value is not None:
            if not isinstance(value, list) or len(value) != len(layers) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
                raise ProbeFileError(f"SEDAC probe metadata {meta_path}: {key!r} must be a list of {len(layers)} "
                                     f"finite numbers (one per layer), got {value!r}")
    recorded = cast(Dict[str, Any], meta.get("model") if isinstance(meta.get("model"), dict) else {})

    if model_config is not None:
        model_id = model_identity(model_config)
        if model_id["hidden_size"] is not None and hidden != model_id["hidden_size"]:
            raise ProbeFileError(f"probe hidden size {hidden} does not match model hidden size "
                                 f"{model_id['hidden_size']} ({path})")
        n_layers = model_id["num_layers"]
        if n_layers is not None and layers[-1] >= n_layers:
            raise ProbeFileError(f"probe layer {layers[-1]} does not exist in a model with {n_layers} layers ({path})")
        for key in IDENTITY_KEYS:
            want, have = recorded.get(key), model_id.get(key)
            if want is not None and have is not None and want != have:
                raise ProbeFileError(f"probes in {path} were trained for a model with {key} {want}, "
                                     f"but this model has {key} {have} (wrong model?)")
    if fingerprint is not None and recorded.get("fingerprint") not in (None, fingerprint):
        raise ProbeFileError(f"probes in {path} were trained on a different checkpoint (weights fingerprint "
                             f"{recorded.get('fingerprint')}, this model {fingerprint})")

    weights_path = path / WEIGHTS
    if not weights_path.is_file():
        raise ProbeFileError(f"SEDAC probe weights missing: {weights_path}")
    tensors = _read_weights(weights_path)
    digest = weights_digest(tensors)
    if meta.get("weights_sha256") != digest:
        raise ProbeFileError(f"{weights_path} is not the weights {meta_path} was written with (digest "
                             f"{str(meta.get('weights_sha256'))[:12]}, the file's {digest[:12]}): "
                             "a save that was interrupted between the two files, or files mixed from two "
                             "directories; train again")
    shapes = {"down.weight": (rank, hidden), "down.bias": (rank,), "norm.weight": (rank,), "norm.bias": (rank,),
              "head.weight": (1, rank), "head.bias": (1,)}
    f = len(FUSION_FEATURES)
    gate_shapes = {"gate.weight": (f,), "gate.bias": (), "gate.mean": (f,), "gate.std": (f,)}
    probes: Dict[int, LREProbe] = {}
    gates: Dict[str, List[torch.Tensor]] = {name: [] for name in GATE_TENSORS}
    for layer in layers:
        state = {}
        wanted = {**shapes, **(gate_shapes if target == "fusion" else {})}
        for name, shape in wanted.items():
            key = f"layer{layer}.{name}"
            if key not in tensors:
                if not any(k.startswith(f"layer{layer}.") for k in tensors):
                    raise ProbeFileError(f"SEDAC probe missing for layer {layer}: {weights_path}")
                raise ProbeFileError(f"SEDAC probe for layer {layer} lacks tensor {key}: {weights_path}")
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise ProbeFileError(f"SEDAC probe tensor {key} has shape {tuple(t.shape)}, expected {shape} "
                                     f"(hidden_size {hidden}, rank {rank}): {weights_path}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ProbeFileError(f"SEDAC probe tensor {key} must hold finite floats: {weights_path}")
            if name.startswith("gate."):
                gates[name[5:]].append(t.float().clone())
            else:
                state[name] = t.float()
        if target == "fusion" and not bool((gates["std"][-1] > 0).all()):
            raise ProbeFileError(f"SEDAC fusion gate of layer {layer} has a non-positive std: {weights_path}")
        probe = LREProbe(hidden, rank, target)
        probe.load_state_dict(state)
        probes[layer] = probe
    bank = ProbeBank.from_probes(probes)
    if target == "fusion":
        with torch.no_grad():
            for name in GATE_TENSORS:
                getattr(bank, f"gate_{name}").copy_(torch.stack(gates[name]))
    return ProbeSet(bank.to(device), meta, path)
