"""``sedac-probes train``: one LREProbe per checkpoint layer, held-out split, early stopping.

Targets:

* ``entropy`` — the original documents' regression on the logit-lens entropy at the layer
  (MSE); the prediction is the risk.
* ``safety`` — the same low-rank body with a logistic head trained on label
  (b), "the full model's top-1 survives a cascade exit here" (CALM-style);
  risk = 1 - p(safe).

The split is by window (whole 511-token windows go to training or held-out,
chosen by a seeded permutation), so held-out tokens never share a context
with training tokens. Tokens at positions below the collection's
``protect_first`` never exit and are left out. Training is deterministic
given ``seed`` (and the torch thread count).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from sedac_monitor.api import InputError, progress

from .collect import load_data
from .io import save
from .metrics import auroc, r2, spearman, split_window_ids, window_rows
from .probe import TARGETS, LREProbe, ProbeBank

Log = Callable[[str], None]


def train_probe(x_train, y_train, x_val, y_val, target: str, rank: int, epochs: int, batch_size: int, lr: float,
                seed: int, patience: int = 3, desc: str = "") -> Tuple[LREProbe, Dict[str, Any]]:
    torch.manual_seed(seed)
    probe = LREProbe(x_train.shape[1], rank, target)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(x, y):
        out = probe(x.float())
        if target == "entropy":
            return F.mse_loss(out, y)
        return F.binary_cross_entropy_with_logits(out, y)

    best, best_state, best_epoch, stale, history = math.inf, None, -1, 0, []
    for epoch in progress(range(epochs), total=epochs, desc=desc):
        probe.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad()
            loss_of(x_train[idx], y_train[idx]).backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            val = float(sum(loss_of(x_val[i:i + 8192], y_val[i:i + 8192]).item() * len(y_val[i:i + 8192])
                            for i in range(0, len(y_val), 8192)) / len(y_val))
        history.append(round(val, 6))
        if val < best - 1e-6:
            best, best_state, best_epoch, stale = val, copy.deepcopy(probe.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is None:  # no epoch's validation loss was a number
        raise InputError(f"training {desc or 'a probe'} diverged: the held-out loss was {history[-1]} after every "
                         f"epoch ({len(history)}); the collected data may hold non-finite values, or --lr {lr} is "
                         "too high")
    probe.load_state_dict(best_state)
    probe.eval()
    return probe, {"best_epoch": best_epoch, "epochs_run": len(history), "val_loss": history}


def evaluate_probe(probe: LREProbe, x, entropy, safe) -> Dict[str, float]:
    with torch.no_grad():
        risk = torch.cat([probe.risk(x[i:i + 8192].float()) for i in range(0, x.shape[0], 8192)]).numpy()
    out = {"auroc_unsafe": auroc(risk, safe.numpy() == 0), "tokens": int(x.shape[0]),
           "safe_fraction": float(safe.float().mean())}
    if probe.target == "entropy":
        out["r2"] = r2(risk, entropy.numpy())
        out["spearman"] = spearman(risk, entropy.numpy())
    return out


def train(data_dir: Any, out_dir: Any, target: str = "entropy", epochs: int = 20, batch_size: int = 1024,
          rank: int = 64, lr: float = 1e-3, seed: int = 0, val_fraction: float = 0.2, patience: int = 3,
          log: Log = print) -> Dict[str, Any]:
    """Train, report held-out metrics, write the probe directory; returns its metadata."""
    if target not in TARGETS:
        raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--rank", rank)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"--lr must be a positive number, got {lr}")
    t0 = time.perf_counter()
    data = load_data(data_dir)
    meta = data["meta"]
    per_window = meta["max_length"] - 1
    keep = data["position"] >= meta.get("protect_first", 0)
    train_w, val_w = split_window_ids(meta["windows"], val_fraction, seed)
    train_rows, val_rows = window_rows(train_w, per_window, keep), window_rows(val_w, per_window, keep)
    probes: Dict[int, LREProbe] = {}
    per_layer: Dict[str, Any] = {}
    for layer in data["layers"]:
        x = data["hidden"][layer]
        y = (data["entropy"][layer] if target == "entropy" else data["cascade_safe"][layer].float())
        probe, hist = train_probe(x[train_rows], y[train_rows], x[val_rows], y[val_rows], target, rank, epochs,
                                  batch_size, lr, seed + layer, patience, desc=f"train layer {layer}")
        metrics = evaluate_probe(probe, x[val_rows], data["entropy"][layer][val_rows],
                                 data["cascade_safe"][layer][val_rows])
        per_layer[str(layer)] = {**metrics, **hist}
        probes[layer] = probe
        log(f"  layer {layer:3d} ({target}): held-out " + ", ".join(
            f"{k} {metrics[k]:.3f}" for k in ("r2", "spearman", "auroc_unsafe") if k in metrics)
            + f" (best epoch {hist['best_epoch'] + 1} of {hist['epochs_run']})")
    bank = ProbeBank.from_probes(probes)
    training = {
        "data": str(data["path"]), "text": meta["text"], "text_sha256": meta["text_sha256"],
        "train_tokens": int(len(train_rows)), "heldout_tokens": int(len(val_rows)), "seed": seed,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "patience": patience,
        "per_layer": per_layer, "seconds": round(time.perf_counter() - t0, 1),
    }
    out_meta = {"model": meta["model"], "model_path": meta["model_path"], "protect_last": meta["protect_last"],
                "protect_first": meta.get("protect_first", 0), "num_layers": meta["num_layers"],
                "training": training, "calibration": None, "thresholds": None, "exit_rates": None}
    save(out_dir, bank, out_meta)
    log(f"wrote {len(probes)} {target} probes to {out_dir}")
    return out_meta
