"""pytest fixtures shared by the sedac-monitor and sedac-probes test suites (not part of any package).

A suite's ``conftest.py`` puts this folder on ``sys.path`` and imports the fixtures it uses from here
(pytest picks up fixtures by name from the conftest's namespace).
"""

import os
from pathlib import Path

import pytest
import torch

from sedac_monitor.testing import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folders of tiny random Llama and Qwen2 models (with a byte tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    for family in ("llama", "qwen2"):
        tiny_model(family, root / family)
    return root


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def assets():
    """The real assets built by `sedac-bench assets` (nox sets SEDAC_ASSETS); missing assets fail, not skip."""
    value = os.environ.get("SEDAC_ASSETS")
    assert value, "SEDAC_ASSETS is not set: run the suite through `nox -s tests`, which builds the real assets"
    root = Path(value)
    assert (root / "manifest.json").is_file(), f"no SEDAC assets at {root}; run `sedac-bench assets --cache {root}`"
    return root
