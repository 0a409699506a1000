# fixtures shared with the other suites live outside the packages, in packages/test_support
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "test_support"))
from sedac_fixtures import assets, family, tiny, tiny_dir, warm_torch  # noqa: E402, F401


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real SmolLM2 for minutes; -m 'not slow' skips")
