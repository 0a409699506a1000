import numpy as np

import sedac_core


def test_public_api_is_pinned():
    assert sorted(sedac_core.__all__) == sorted([
        "ENVIRONMENT", "MIN_THRESHOLD", "SCOPES", "ProbeController", "ExitDecisions", "LayerConfig", "MonitorRule",
        "ProbeRule", "Trace", "__version__", "backend", "calibrate_thresholds", "consecutive_exit", "replay",
        "set_backend", "ChannelMlp", "GatedMlp", "channel_major", "gated_mlp", "parallel_for", "set_parallel_for",
    ])
    for name in sedac_core.__all__:
        assert hasattr(sedac_core, name), name
    assert sedac_core.ENVIRONMENT == ("SEDAC_CORE_BACKEND",)


def test_native_version_matches_package():
    from sedac_core import _native

    assert _native.__version__ == sedac_core.__version__
    assert _native.MIN_THRESHOLD == float(np.float32(sedac_core.MIN_THRESHOLD))
