"""One SEDAC state per vLLM model instance: the decider, statistics, trace and adaptive thresholds.

The decision code is sedac-monitor's (V7, :class:`sedac_monitor.api.MonitorDecider`)
and sedac-probes' (V6, :class:`sedac_probes.decide.ProbeDecider`); the gather path's
gather -> MLP -> scatter is sedac-monitor's :class:`~sedac_monitor.api.SkipRuntime` (shared with
the Hugging Face accelerator). This module wires them to vLLM's flattened ``[num_tokens, hidden]``
batch: one lookup per forward (``get(key)`` from the ops), the MLPs by layer (``mlps``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, cast

import torch

from sedac_monitor.api import NO_EXIT_TAU, ExitStats, MlpCost, SkipRuntime, soft_channels

from .config import ConfigError, SedacConfig

if TYPE_CHECKING:
    import sedac_core
    from sedac_probes.io import ProbeSet

logger = logging.getLogger("sedac_vllm")

_RUNTIMES: Dict[str, "VllmSedac"] = {}
_LOCK = threading.Lock()


def get(key: str) -> "VllmSedac":
    return _RUNTIMES[key]


def in_process() -> List["VllmSedac"]:
    """The SEDAC states of the models built in this process (one per model; with tensor parallelism, this
    rank's)."""
    with _LOCK:
        return list(_RUNTIMES.values())


class VllmSedac:
    """Built by the patched model's ``__init__``; looked up by key from the custom ops."""

    def __init__(self, cfg: SedacConfig, hf_config: Any, num_layers: int, hidden_size: int, device: torch.device,
                 tp_rank: int = 0, max_rows: int = 8192) -> None:
        cfg.check_model(num_layers)
        self.cfg = cfg
        self.num_layers = num_layers
        self.tp_rank = tp_rank
        self.controller: Optional[sedac_core.ProbeController] = None
        self.probes: Optional[ProbeSet] = None
        self.adaptive = False
        self.forwards = 0
        self._dirty = False
        self._writer: Optional[threading.Thread] = None
        self._input_ids: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        if cfg.mode == "monitor":
            decider = self._monitor_decider(device)
        else:
            decider = self._probe_decider(hf_config, hidden_size, device)
        self.decider = decider
        self.runtime = SkipRuntime(decider, num_layers, cfg.protect_first, cfg.host_sync)
        self.runtime.records = False  # this forward's per-row results are kept in the graph (see plan())
        self.runtime.start(0, device)
        # need[rows]: the fewest skipped rows at which a layer's gather path pays (see MlpCost); read by the
        # compiled graph at every call, filled once the MLP's cost is measured (before the first forward).
        # Until then nothing gathers; SEDAC_GATHER=always / never fix it at 1 / rows + 1.
        self.max_rows = int(max_rows)
        rows = torch.arange(self.max_rows + 1, dtype=torch.float64)
        self.need = (torch.full_like(rows, 1e-6) if cfg.gather == "always" else rows + 1).to(device)
        self.cost: Any = None  # MlpCost once measured; False where it cannot be
        self.mlp_seconds = 0.0  # the MLP time of every counted forward, as the cost model predicts it
        self._forward_mlp_s: Dict[int, float] = {}  # by rows: a forward's MLP seconds (the cost model, read once)
        self.ideal_saved_seconds = 0.0  # what the plans could have saved of it (weight reads counted)
        self.gathers = 0  # layer calls that took the gather path (the op)
        # channel soft exit's kernel (see channel_kernel): kernel_rows[rows] says whether a layer's MLP on that
        # many rows runs through it; read by the compiled graph, filled when the kernel is timed (before the
        # first forward). None: the kernel is not used.
        self.kernel_rows: Optional[torch.Tensor] = None
        self.kernel_calls = 0  # layer calls that ran the kernel (the sedac::channel_mlp op)
        self.kernel_timing: Dict[str, Any] = {}
        self.run_kernel: Any = None  # f(mlp, x), set with kernel_rows
        self.kernel_wanted = False  # set by the model: channels configured, the kernel can run this MLP
        self.mlps: Dict[int, Any] = {}  # the patched MLPs by layer (set by the model)
        # this forward's decider state, flowing from layer to layer inside the compiled graph. Always this one
        # dict, changed item by item and never rebound: dynamo (torch 2.13) loses a rebinding of an object's
        # attribute made after a torch.cond in the same graph (the MLPs branch with torch.cond), and later
        # layers would read the state of the first layer; item assignments are tracked correctly
        self.state: Dict[str, Any] = {}
        self.pending_input_ids: Optional[torch.Tensor] = None
        self.warming_up = False  # set per forward by the model (vLLM's dummy runs carry no attention metadata)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)  # forwards, mutated by sedac::finish
        self._no_risk = torch.zeros(0, dtype=torch.float32, device=device)
        self.final_norm = self.compute_logits = None  # set by the model: what the shadow check needs
        self.decision_log = None
        if cfg.decision_log:
            from .online import DecisionLog

            path = cfg.decision_log if tp_rank == 0 else None
            self.decision_log = DecisionLog(path, cfg.decision_log_rate, cfg.decision_log_max_bytes) if path else None
        self.online = None
        if cfg.online:
            self.online = self._online_calibrator(device)
            self.runtime.shadow = self.online.shadow
        # keep each layer's signal in the graph's state only when something reads it
        self.keep_signals = cfg.online or self.decision_log is not None
        # the layers whose residual stream the decider reads (None: every layer); the graph forms it only there.
        # The monitor's signals are kept for every layer, so then it reads every layer
        self.stream_layers = None if self.keep_signals and cfg.mode == "monitor" else decider.step_layers
        with _LOCK:
            self.key = f"m{len(_RUNTIMES)}"
            _RUNTIMES[self.key] = self
        logger.info("%s (%d layers)", cfg.describe(), num_layers)

    # -- building the decider ------------------------------------------------
    def _online_calibrator(self, device: torch.device):
        from .online import OnlineCalibrator

        c = self.cfg
        evidence = c.config_json.get("evidence", {})
        tolerance = c.risk_tolerance or c.config_json.get("max_risk") or 0.05
        return OnlineCalibrator(self.decider.tau_t, self.decider.tau, float(tolerance), c.shadow_rate,
                                c.online_window, c.online_margin, c.drift_threshold,
                                evidence.get("signal_histogram"), c.min_layer,
                                errors_per_exit=(evidence.get("online_correction") or {}).get("errors_per_exit"))

    def _monitor_decider(self, device: torch.device):
        from sedac_monitor.api import MonitorDecider, monitor_rule

        c = self.cfg
        try:
            rule = monitor_rule(self.num_layers, c.tau, c.consecutive_k, c.min_layer, c.protect_last, c.scope)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SEDAC monitor settings are invalid for this model: {exc}") from exc
        # tau is a tensor the compiled graph reads at every call (the same comparisons as a constant): online
        # calibration moves it, and set_exits turns exits off without another graph
        decider = MonitorDecider(rule, self.num_layers, tau_tensor=True)
        decider.tau_t = torch.tensor(decider.tau, dtype=torch.float32, device=device)
        return decider

    def set_exits(self, on: bool) -> None:
        """Let tokens exit (``on``, the configured threshold) or not (a threshold no similarity reaches), without
        another graph: the same compiled forward, the same planned layers, the same work when nothing exits.
        For benchmarks that compare a setting with itself exits off, in one process (the V7 monitor only; its
        online calibration owns the threshold, so not with ``SEDAC_ONLINE=1``)."""
        tau_t = getattr(self.decider, "tau_t", None)
        if tau_t is None or self.online is not None:
            raise ValueError("set_exits needs the V7 monitor (SEDAC_PROBE_DIR unset) without online calibration "
                             f"(SEDAC_ONLINE=1): this engine runs the {self.cfg.mode} decider"
                             + (" with online calibration" if self.online is not None else ""))
        tau_t.fill_(self.decider.tau if on else NO_EXIT_TAU)

    def _probe_decider(self, hf_config: Any, hidden_size: int, device: torch.device):
        import sedac_core
        from sedac_probes.decide import ProbeDecider, TorchProbeRule
        from sedac_probes.io import ProbeFileError, load

        c = self.cfg
        try:
            probes = load(c.probe_dir, model_config=hf_config, device=device)
        except ProbeFileError as exc:
            raise ConfigError(f"SEDAC_PROBE_DIR: {exc}") from exc
        layers = probes.layers
        if probes.meta.get("protect_last", c.protect_last) != c.protect_last:
            logger.warning("probes were calibrated with protect_last=%s, serving with SEDAC_PROTECT_LAST=%s",
                           probes.meta.get("protect_last"), c.protect_last)
        n = len(layers)
        exits = not (probes.exits_disabled and c.thresholds is None)
        if not exits:
            logger.warning("SEDAC: the probes in %s failed their calibration (%s): serving without exits. "
                           "Recalibrate, or set serving.thresholds in the SEDAC_CONFIG file to exit anyway.",
                           c.probe_dir, probes.meta.get("status"))
        thresholds = c.thresholds or probes.thresholds
        # the original documents' per-checkpoint exit rates and layer weights, for three checkpoints
        exit_rates = c.exit_rates or probes.exit_rates or ([0.2, 0.6, 0.9] if n == 3 else [0.5] * n)
        weights = c.layer_weights or ([0.3, 0.4, 0.3] if n == 3 else [1.0 / n] * n)
        adaptive = c.adaptive if c.adaptive is not None else thresholds is None
        if thresholds is None:
            # Uncalibrated probes have no threshold on their own risk scale (an entropy in nats, or a
            # probability in (0, 1)): exit only once thresholds are learned from the traffic.
            if c.exit_rates is None or not adaptive:
                raise ConfigError(
                    f"the probes in {c.probe_dir} are not calibrated, so SEDAC has no thresholds for their "
                    f"{probes.target} risk. Run `sedac-probes calibrate`, or set, in the SEDAC_CONFIG file's "
                    "\"serving\" object, \"thresholds\" (fixed thresholds) or \"exit_rates\" with \"adaptive\" left "
                    "on (thresholds learned from traffic; no token exits during the \"warmup_observations\" warm-up).")
            thresholds = [sedac_core.MIN_THRESHOLD] * n
        if adaptive and exits:  # the controller owns the thresholds; the probe rule's tensors mirror them
            self.controller = sedac_core.ProbeController(
                [sedac_core.LayerConfig(layer, exit_rates[i], thresholds[i], weights[i]) for i, layer in
                 enumerate(layers)],
                alpha=c.alpha, confidence_decay=c.confidence_decay, soft_exit=c.soft_exit, adaptive=True,
                warmup_observations=c.warmup_observations, rule=c.rule, adaptive_decay=c.adaptive_decay,
                decay_bonus=c.decay_bonus, soft_k=c.soft_k)
            probe_rule = TorchProbeRule.following(self.controller, device)
        else:
            probe_rule = TorchProbeRule(thresholds, c.rule, exit_rates, weights, c.confidence_decay, c.soft_exit,
                                   device, adaptive_decay=c.adaptive_decay, decay_bonus=c.decay_bonus,
                                   soft_k=c.soft_k)
        self.probes = probes
        self.adaptive = adaptive and exits  # the configuration's value, resolved against the probe file
        return ProbeDecider(probes.bank, probe_rule, self.num_layers, c.protect_last, exits=exits)

    # -- per forward: in the model's graph (pure torch, no host reads) ----------
    def begin(self, stream: torch.Tensor, positions: torch.Tensor) -> None:
        """Layer 0's input: start the decider's state. ``state`` flows from layer to layer as tensors
        (under torch.compile, dynamo tracks these dict updates like any other value)."""
        allowed = positions.reshape(-1) >= self.cfg.protect_first if self.cfg.protect_first > 0 else None
        d = self.decider.start(stream, positions) if self.decider.wants_positions else self.decider.start(stream)
        state = self.state
        state.clear()
        state["decider"], state["allowed"] = d, allowed
        rows = stream.shape[0]
        # this forward's per-row results (what SkipRuntime records when it runs the plans itself), kept here
        # so that they hold whichever path a layer takes: first skipped layer per row, MLP blocks skipped
        state["first"] = torch.full((rows,), self.num_layers, dtype=torch.int64, device=stream.device)
        state["row_skips"] = torch.zeros(rows, dtype=torch.float32, device=stream.device)

    def wants_stream(self, layer: int) -> bool:
        return self.stream_layers is None or layer in self.stream_layers

    def plan(self, layer: int):
        """The layer's plan with the first positions protected; ``(None, None)`` where no row can skip."""
        state = self.state
        skip, keep = self.decider.plan(layer, state["decider"])
        allowed = state["allowed"]
        if allowed is not None:
            if skip is not None:
                skip = skip & allowed
            if keep is not None:
                keep = torch.where(allowed, keep, torch.ones_like(keep))
        return skip, keep

    def note(self, layer: int, skip: torch.Tensor, partial: Optional[torch.Tensor]) -> torch.Tensor:
        """Fold one layer's plan into this forward's results (in the graph); returns the MLP rows it skips
        (a soft exit's partial rows fractionally)."""
        state = self.state
        first = state["first"]
        state["first"] = torch.where(skip & (first == self.num_layers), layer, first)
        full = skip.sum()
        skipped = full.double() if partial is None else full.double() + partial.double().sum()
        state["row_skips"] = state["row_skips"] + (skip.float() if partial is None else skip.float() + partial)
        state[f"full{layer}"], state[f"skipped{layer}"] = full, skipped
        return skipped

    def run_mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """One layer's MLP under its plan. Rows that skip are zero in the output, rows with ``keep`` < 1
        compute that fraction of the channels; which path computes that is chosen by what it costs:

        * masked, in the graph: vLLM's own MLP on every row, skipped rows zeroed (a soft exit: every channel
          computed, each row's own count kept). Costs what a layer without exits costs;
        * gathered, in the ``sedac::skip_mlp`` op: the active rows only (grouped by channel count for a
          soft exit), where the rows it removes save more than the op's own cost (``need``, measured), and
          with channel soft exit at the batch sizes where the channel kernel runs (it runs there, on the
          active rows).

        On CPU the choice is a ``torch.cond`` on the plan (compiled) or a Python branch (eager). On GPU,
        where vLLM splits the graph at SEDAC's ops and replays the pieces as CUDA graphs, a data-dependent
        branch cannot be captured, so the op is called at every layer that can skip and decides inside."""
        layer = mlp._sedac_layer
        skip, keep = self.plan(layer)
        if skip is None and keep is None:
            return mlp._sedac_vanilla(x)
        m = None
        if keep is not None:
            if skip is None:
                skip = torch.zeros(keep.shape[0], dtype=torch.bool, device=keep.device)
            m, partial = soft_channels(skip, keep, mlp._sedac_inter)
            skipped = self.note(layer, skip, partial)
        else:
            skipped = self.note(layer, skip, None)
        if x.device.type != "cpu":
            return mlp._sedac_op(x, skip, keep, m)
        rows = x.shape[0]
        pays = skipped >= self.need[torch.sym_min(rows, self.max_rows)]
        if self.online is not None:  # the shadow check runs inside the op: every layer where rows skip goes there
            pays = skipped > 0
        if self.kernel_rows is not None and mlp._sedac_channels is not None:
            # at the batch sizes where the channel kernel runs, the op runs it (on the active rows only)
            pays = pays | self.kernel_rows[torch.sym_min(rows, self.max_rows)]
        if torch.compiler.is_compiling():
            return torch.cond(pays, mlp._sedac_op, mlp._sedac_masked, (x, skip, keep, m))
        return mlp._sedac_op(x, skip, keep, m) if bool(pays) else mlp._sedac_masked(x, skip, keep, m)

    def channel_mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """A layer's MLP under channel soft exit, no row skipping: through the channel kernel (the
        ``sedac::channel_mlp`` op) at the batch sizes where it measured faster, else masked in the graph.
        Compiled, the choice is a ``torch.cond`` on the batch size (read from ``kernel_rows``, a tensor)."""
        if self.kernel_rows is None:
            return mlp._sedac_masked_mlp(x)
        use = self.kernel_rows[torch.sym_min(x.shape[0], self.max_rows)]
        if torch.compiler.is_compiling():
            return torch.cond(use, mlp._sedac_kernel_op, mlp._sedac_masked_mlp, (x,))
        return mlp._sedac_kernel_op(x) if bool(use) else mlp._sedac_masked_mlp(x)

    def kernel_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The ``sedac::channel_mlp`` op's body (eager): the layer's MLP through the channel kernel."""
        self.kernel_calls += 1
        return self.run_kernel(self.mlps[layer], x)

    def gather(self, layer: int, x: torch.Tensor, skip: Optional[torch.Tensor],
               keep: Optional[torch.Tensor]) -> torch.Tensor:
        """The gather path (the ``sedac::skip_mlp`` op's body, eager): the MLP on the active rows only."""
        mlp = self.mlps[layer]
        self.gathers += 1
        return self.runtime.apply(layer, x, skip, keep, mlp._sedac_full, mlp._sedac_truncated, mlp._sedac_inter)

    def time_kernel(self, run: Any, broadcast: Any = None, dense: Any = None) -> None:
        """Fill ``kernel_rows``: the batch sizes whose MLP runs through the channel kernel — up to where it
        measured faster than the MLP's measured time (``channel_kernel`` ``auto``; rank 0's measurement
        decides for every rank), or every size (``always``). ``dense``: every layer's MLP as timed for the
        cost model, run untimed before each kernel call (the torch work around it in a forward)."""
        from . import channel_kernel

        mlps = [self.mlps[i] for i in range(self.num_layers)]
        self.run_kernel = run
        measured: Dict[int, Any] = {}
        if self.cfg.channel_kernel == "always":
            upto = self.max_rows
        elif not self.cost:
            logger.info("SEDAC: the MLP's time could not be measured, so the channel kernel is not used")
            return
        else:
            assert self.cfg.channel_sparsity is not None  # a config's channels carry their sparsities
            cost = self.cost
            upto, measured = channel_kernel.crossover(
                mlps, lambda i, x: torch.ops.sedac.channel_mlp(x, self.key, i),
                lambda r: float(cost.seconds(r)), *self.cfg.channel_sparsity,
                between=None if dense is None else lambda i, x: dense[i](x))
            self.kernel_calls = 0  # the timing's calls are not served ones
            if broadcast is not None:
                upto, measured = broadcast((upto, measured))
        rows = torch.zeros(self.max_rows + 1, dtype=torch.bool)
        rows[1:upto + 1] = True
        self.kernel_rows = rows.to(self.need.device)
        self.kernel_timing = {"up_to_rows": upto, "measured": {str(r): v for r, v in measured.items()}}
        logger.info("SEDAC: channel kernel (reads only the kept channels' weights) at batch sizes up to %d "
                    "(serving.channel_kernel=%s)%s", upto, self.cfg.channel_kernel, "".join(
                        f"; {r} rows: kernel {1e6 * v['kernel_s']:.0f} us, dense {1e6 * v['dense_s']:.0f} us"
                        for r, v in measured.items()))

    def measure_cost(self, local: Any, hidden: int, dtype: torch.dtype, device: torch.device,
                     broadcast: Any = None) -> MlpCost:
        """Measure the MLP's cost on this machine (``local``: every layer's MLP, ``[rows, hidden]`` in and out,
        timed in turn; all layers share one shape) and fill ``need``.

        With tensor parallelism every rank times its own shard and rank 0's measurement is ``broadcast`` to
        all, so every rank takes the same path at every layer (the paths' all-reduces must match)."""

        cost = MlpCost.measure(local, hidden, min(self.max_rows, 1024), dtype, device, MlpCost.gather_path(local))
        if broadcast is not None:
            cost = MlpCost.from_json(broadcast(cost.to_json()))
        self.cost = cost
        if self.cfg.gather == "auto":
            self.need.copy_(torch.from_numpy(cost.need(self.max_rows)).double())
        logger.info("SEDAC: MLP %.0f us at 1 row, %.0f us at %d rows; gather path +%.0f us +%.2f us/row; "
                    "gathering pays from %s skipped rows at batch 1/4/16/64/256 (SEDAC_GATHER=%s)",
                    1e6 * float(cost.seconds(1)), 1e6 * float(cost.seconds(cost.max_rows)), cost.max_rows,
                    1e6 * cost.fixed, 1e6 * cost.per_row,
                    "/".join(str(int(self.need[r])) if r <= self.max_rows else "-" for r in (1, 4, 16, 64, 256)),
                    self.cfg.gather)
        return cost

    def after_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor,
                    positions: torch.Tensor) -> None:
        last, wanted = layer == self.num_layers - 1, self.wants_stream(layer)
        if not (last or wanted):
            return  # nothing reads this layer's residual stream: don't form it
        stream = hidden + residual
        if wanted:
            self.state["decider"] = self.decider.step(layer, stream, self.state["decider"])
            if self.keep_signals and self.cfg.mode == "monitor":
                self.state["signals"] = self.state.get("signals", ()) + (self.state["decider"]["s"],)
        if last:
            d = self.state["decider"]
            probe = self.cfg.mode == "probe"
            risk = self.decider.risk_matrix(d) if probe and (self.controller is not None or self.keep_signals) \
                else self._no_risk
            signals, conf = self._no_risk, self._no_risk
            if self.keep_signals:
                if probe:
                    signals = risk
                    if d["confs"]:
                        conf = torch.stack(d["confs"], 1)
                else:
                    signals = torch.stack(self.state["signals"], 1)
            state = self.state
            zero_i = torch.zeros((), dtype=torch.int64, device=stream.device)
            zero_d = torch.zeros((), dtype=torch.float64, device=stream.device)
            full = torch.stack([state.get(f"full{i}", zero_i) for i in range(self.num_layers)])
            skipped = torch.stack([state.get(f"skipped{i}", zero_d) for i in range(self.num_layers)])
            torch.ops.sedac.finish(self.counter, stream, positions, risk, signals, conf, state["first"],
                                   state["row_skips"], skipped, full, self.key)

    # -- end of a forward: inside the sedac::finish op (eager Python) ------------
    def end_of_forward(self, positions: torch.Tensor, risk: Optional[torch.Tensor], stream: torch.Tensor,
                       signals: Optional[torch.Tensor] = None, conf: Optional[torch.Tensor] = None,
                       results: Optional[tuple] = None) -> None:
        """``results``: (first skipped layer per row, MLP blocks skipped per row, MLP rows skipped per layer,
        rows that skipped the whole MLP per layer), as the graph kept them."""
        if results is not None:
            self.runtime.set_results(*results)
        if self.warming_up:  # vLLM's profiling / compile warm-up forwards: dummy rows, not tokens
            self.runtime.end_forward(positions.shape[0], positions.device, count=False)
            if self.online is not None:
                self.online.end_forward(stream, positions, self.num_layers, None, None, None, counted=False)
            return
        self._positions = positions
        self._input_ids = self.pending_input_ids
        if self.cost and results is not None:
            rows = positions.shape[0]
            mlp_s = self._forward_mlp_s.get(rows)
            if mlp_s is None:  # a numpy interpolation costs ~0.1 ms: once per batch size, not every forward
                mlp_s = self._forward_mlp_s[rows] = self.num_layers * float(self.cost.seconds(rows))
            self.mlp_seconds += mlp_s
            skipped = results[2].cpu().numpy()
            if skipped.any():  # most forwards skip nothing: no interpolation to do
                self.ideal_saved_seconds += float(self.cost.saved(rows, skipped).sum())
        self.runtime.end_forward(positions.shape[0], positions.device)
        self.forwards += 1
        if self.controller is not None and risk is not None and risk.numel():
            self.decider.probe_rule.observe(risk.float().cpu().numpy())
        signals_np = signals.float().cpu().numpy() if signals is not None and signals.numel() else None
        if self.online is not None:
            self.online.end_forward(stream, self.runtime.last_first_skip, self.num_layers, signals_np,
                                    self.final_norm, self.compute_logits, counted=True)
        if self.decision_log is not None:
            self._log_decisions(positions, signals_np, conf)
        if self.cfg.trace:
            self._write_trace()
        if self.tp_rank != 0:
            return
        if self.cfg.metrics_file:
            self._dirty = True
            if self._writer is None:
                self._writer = threading.Thread(target=self._flush_loop, name="sedac-metrics", daemon=True)
                self._writer.start()
        if self.cfg.log_every and self.forwards % self.cfg.log_every == 0:
            s = self.stats()
            logger.info("SEDAC forward %d: %d tokens, skipped MLP %.2f%%, exited %.2f%%", self.forwards, s["tokens"],
                        100 * s["skipped_mlp_fraction"], 100 * s["exited_fraction"])

    def cache_key(self) -> Dict[str, Any]:
        """What the compiled graph depends on (joins vLLM's compile-cache key)."""
        from sedac_vllm import __version__

        return {"version": __version__, "config": self.cfg.describe(), "layers": self.num_layers,
                "signals": self.keep_signals, "online": self.cfg.online, "channel_kernel": self.kernel_wanted,
                "rule": repr(getattr(self.decider, "rule", None)),
                "probes": list(getattr(getattr(self.decider, "bank", None), "layers", ()) or ())}

    def _log_decisions(self, positions: torch.Tensor, signals: Optional[Any], conf: Optional[torch.Tensor]) -> None:
        if self.cfg.mode == "monitor":
            layers = list(range(self.num_layers))
            tau = float(self.decider.tau_t) if self.decider.tau_t is not None else self.decider.tau
            thresholds, kind = [tau], "monitor (signal: similarity S_l)"
        else:
            layers = list(self.decider.bank.layers)
            thresholds = [float(t) for t in self.decider.probe_rule.thresholds.tolist()]
            assert self.probes is not None  # probe mode loaded them
            kind = f"probe {self.decider.probe_rule.rule} (signal: {self.probes.target} risk)"
        conf_np = conf.float().cpu().numpy() if conf is not None and conf.numel() else None
        assert self.decision_log is not None  # the caller checked
        assert self.runtime.last_first_skip is not None  # the forward finished
        self.decision_log.write(self.forwards, positions, self._input_ids, self.runtime.last_first_skip, signals,
                                layers, thresholds, conf_np, self.num_layers, kind)

    def _write_trace(self) -> None:
        # called once the forward finished (per-row results set), only when a trace file is configured
        assert self._positions is not None and self.runtime.last_first_skip is not None
        assert self.runtime.last_row_skips is not None
        rec = {"pos": self._positions.tolist(),
               "first_skip": self.runtime.last_first_skip.tolist(),
               "row_skips": [round(x, 4) for x in self.runtime.last_row_skips.tolist()]}
        if self._input_ids is not None:
            rec["tok"] = self._input_ids.tolist()
        path = cast(str, self.cfg.trace) if self.tp_rank == 0 else f"{self.cfg.trace}.rank{self.tp_rank}"
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def stats(self) -> Dict[str, Any]:
        st = self.runtime.stats
        base: Dict[str, Any] = st.as_dict() if st is not None else ExitStats.empty(self.num_layers)
        base.update(mode=self.cfg.mode, forwards=self.forwards, num_layers=self.num_layers, pid=os.getpid(),
                    time=time.time(),
                    # the most plans any forward read on the host inside sedac::skip_mlp (0: the op never ran)
                    max_host_reads=self.runtime.max_host_reads,
                    # the cost model's view: MLP seconds of the counted forwards, and what their plans could
                    # have saved with a free gather path (weight reads counted: the byte-aware ideal)
                    mlp_seconds=self.mlp_seconds, ideal_saved_seconds=self.ideal_saved_seconds,
                    gathers=self.gathers, gather=self.cfg.gather,
                    channel_kernel={"setting": self.cfg.channel_kernel, "calls": self.kernel_calls,
                                    **self.kernel_timing},
                    cost=self.cost.to_json() if self.cost else None)
        if self.cfg.mode == "probe":
            base["thresholds"] = [float(t) for t in self.decider.probe_rule.thresholds.tolist()]
            base["probe_layers"] = list(self.decider.bank.layers)
        if self.online is not None:
            base["online"] = self.online.stats()
        if self.decision_log is not None:
            base["decision_log_records"] = self.decision_log.records
        return base

    def _flush_loop(self) -> None:
        """Write the statistics file at most every 0.2 s, and only when something changed."""
        while True:
            time.sleep(0.2)
            if self._dirty:
                self._dirty = False
                self.write_stats()

    def write_stats(self) -> None:
        path = cast(str, self.cfg.metrics_file)  # the writer thread runs only with one
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(self.stats(), fh)
            os.replace(tmp, path)
        except OSError as exc:  # metrics must never take the server down
            logger.warning("SEDAC could not write statistics to %s: %s", path, exc)

