"""sedac-monitor's public API: what sedac-probes, sedac-vllm, sedac-bench (and your own integration)
build on. This module is the public surface; everything it exports is part of sedac-monitor's API
(pinned by its tests), so a change here is an API change. The modules it gathers from
(listed in the package docstring) are implementation.

* **Skipping MLP work**: :class:`SkipRuntime` applies per-row plans (skip / keep a fraction of the
  channels) to MLP calls; :func:`make_skippable` / :func:`restore_mlp` swap an MLP's class so its
  forward goes through a runtime; :class:`HFAttachment` wires a Hugging Face model's forward to one.
* **What skipping costs**: :class:`MlpCost` (a layer's MLP time at every batch size on this machine,
  the gather path's overhead, the fewest skipped rows at which gathering pays, the byte-aware saving);
  :func:`measure_model`, :func:`expected_speedups`, :func:`recommendation` (what a setting would gain).
* **Soft exit**: :func:`soft_channels`, :func:`channel_order`, :func:`permute_channels`, :func:`hf_truncated`,
  :func:`channel_mask`.
* **Deciders**: the :class:`Decider` protocol (functional ``start`` / ``step`` / ``plan``, one for the
  Hugging Face hooks and vLLM's compiled forward), :class:`MonitorDecider` (V7) and :func:`similarity`.
* **Models and text**: :func:`find_layout` / :class:`DecoderLayout`, :func:`model_identity`,
  :func:`load_model`, :func:`read_text`, :func:`token_windows`, :func:`teacher_forced` /
  :class:`Pass`, :func:`cascade_labels` (:func:`cascade_labels_for`: several ``protect_last`` at once),
  :class:`RecordingDecider`, :class:`ForcedExitDecider`.
* **Errors**: :class:`InputError` (unusable paths, files, values), :class:`UnsupportedModelError`.
"""

from .accelerator import load_config, monitor_rule
from .attach import HFAttachment
from .channels import (
    SOFT_GROUPS,
    activation_magnitudes,
    channel_importance,
    channel_mask,
    channel_order,
    hf_truncated,
    intermediate_size,
    permute_channels,
    soft_channels,
)
from .cost import MlpCost, expected_speedups, measure_model, recommendation
from .decide import NO_EXIT_TAU, Decider, ForcedExitDecider, MonitorDecider, Plan, RecordingDecider, similarity
from .engine import GATHER_MIN_FRACTION, HOST_SYNC_POLICIES, SkipRuntime
from .layouts import DecoderLayout, UnsupportedModelError, find_layout, model_identity
from .loading import (
    PROGRESS_ENV,
    InputError,
    batches,
    drop_last_position,
    load_model,
    progress,
    read_text,
    split_windows,
    token_windows,
)
from .patching import SkippableMLP, make_skippable, restore_mlp, subclass_with
from .stats import ExitStats
from .teacher import Pass, cascade_labels, cascade_labels_for, teacher_forced

ENVIRONMENT = (PROGRESS_ENV,)
"""The environment variables sedac-monitor reads."""

__all__ = [
    "ENVIRONMENT",
    "GATHER_MIN_FRACTION",
    "HOST_SYNC_POLICIES",
    "SOFT_GROUPS",
    "DecoderLayout",
    "ExitStats",
    "ForcedExitDecider",
    "HFAttachment",
    "InputError",
    "MlpCost",
    "Decider",
    "MonitorDecider",
    "NO_EXIT_TAU",
    "Plan",
    "Pass",
    "RecordingDecider",
    "activation_magnitudes",
    "SkipRuntime",
    "SkippableMLP",
    "UnsupportedModelError",
    "batches",
    "cascade_labels",
    "cascade_labels_for",
    "expected_speedups",
    "channel_importance",
    "channel_mask",
    "channel_order",
    "drop_last_position",
    "find_layout",
    "hf_truncated",
    "intermediate_size",
    "load_config",
    "load_model",
    "make_skippable",
    "measure_model",
    "model_identity",
    "monitor_rule",
    "permute_channels",
    "progress",
    "read_text",
    "recommendation",
    "restore_mlp",
    "similarity",
    "soft_channels",
    "split_windows",
    "subclass_with",
    "teacher_forced",
    "token_windows",
]
