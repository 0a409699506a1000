def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts the real vLLM engine (minutes each); -m 'not engine' skips")
    config.addinivalue_line("markers", "slow: runs the real SmolLM2 for minutes; -m 'not slow' skips")
