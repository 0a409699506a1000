from importlib import metadata

import sedac_monitor


def test_public_api_is_pinned():
    assert sorted(sedac_monitor.__all__) == [
        "MonitorDecider", "UniversalAccelerator", "UnsupportedModelError", "__version__", "clopper_pearson_upper",
        "create_universal_accelerator", "find_layout", "load_config"]
    assert all(hasattr(sedac_monitor, name) for name in sedac_monitor.__all__)


def test_public_api_surface_is_pinned():
    """What sibling packages (and integrations) build on: a change here is an API change."""
    from sedac_monitor import api, calibrate

    assert sorted(api.__all__) == sorted([
        "ENVIRONMENT", "GATHER_MIN_FRACTION", "HOST_SYNC_POLICIES", "SOFT_GROUPS", "Decider", "DecoderLayout",
        "ExitStats",
        "ForcedExitDecider", "HFAttachment", "InputError", "MlpCost", "MonitorDecider", "NO_EXIT_TAU", "Pass", "Plan",
        "RecordingDecider", "SkipRuntime", "SkippableMLP",
        "UnsupportedModelError", "activation_magnitudes", "batches", "cascade_labels", "cascade_labels_for",
        "channel_importance",
        "channel_mask", "channel_order", "expected_speedups", "measure_model", "recommendation",
        "drop_last_position", "find_layout", "hf_truncated", "intermediate_size", "load_config", "load_model",
        "make_skippable", "model_identity", "monitor_rule", "permute_channels", "progress", "read_text",
        "restore_mlp", "similarity", "soft_channels", "split_windows", "subclass_with",
        "teacher_forced", "token_windows"])
    assert all(hasattr(api, name) for name in api.__all__)
    assert sorted(calibrate.__all__) == sorted([
        "BUDGET_NOT_MET", "CHANNELS_NOT_MET", "DEFAULT_MAX_DELTA_PPL", "FORMAT_VERSION", "Grid", "NEVER_EXIT",
        "ORIGINAL_DEFAULTS", "SIGNAL_EDGES", "calibrate_channels",
        "STRATEGIES", "calibrate", "candidate_list", "measure", "measured_search", "record_trace", "replay_grid",
        "rule_dict", "signal_histogram", "within_budget", "write_config"])
    assert all(hasattr(calibrate, name) for name in calibrate.__all__)


def test_zero_shot_install_does_not_pull_in_vllm():
    requires = [r.split(";")[0].strip().lower() for r in metadata.requires("sedac-monitor") or []]
    names = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in requires}
    assert not {n for n in names if n.startswith("vllm")}, names
    assert not {n for n in names if n.startswith("sedac-vllm") or n.startswith("sedac-probes")}, names


def test_version_comes_from_the_installed_distribution():
    assert sedac_monitor.__version__ == metadata.version("sedac-monitor")


def test_depends_on_a_compatible_sedac_core():
    import sedac_core

    requires = metadata.requires("sedac-monitor") or []
    core = [r for r in requires if r.startswith("sedac-core")]
    assert len(core) == 1, requires
    assert sorted(core[0][len("sedac-core"):].replace(" ", "").split(",")) == ["<0.2", ">=0.1"]
    major, minor = (int(p) for p in sedac_core.__version__.split(".")[:2])
    assert (major, minor) == (0, 1)


def test_modules_import_each_other_without_a_cycle():
    from sedac_fixtures import assert_no_import_cycle

    import sedac_monitor

    edges = assert_no_import_cycle(sedac_monitor)
    assert edges["attach"] >= {"engine", "patching", "channels"}  # the check reads real edges



def test_the_channel_soft_exit_module_is_public_and_pinned():
    from sedac_monitor import sparsity

    assert sorted(sparsity.__all__) == sorted([
        "INPUT_SHARE", "LEVELS", "SIGNAL_CLAMP", "ChannelCounts", "ChannelSparsity", "Recording", "attach_channels",
        "channel_path", "greedy_path", "local_errors", "measure_channels", "propagation", "record", "sparsity_at",
        "stream_distance", "token_scale", "uniform"])
    assert all(hasattr(sparsity, name) for name in sparsity.__all__)
