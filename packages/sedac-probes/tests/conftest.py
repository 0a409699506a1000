# the fixtures are shared with the other suites: see sedac_monitor/fixtures.py
from sedac_monitor.fixtures import assets, family, tiny, tiny_dir  # noqa: F401
