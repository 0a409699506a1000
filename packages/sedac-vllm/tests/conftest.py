def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts the real vLLM engine (minutes each); -m 'not engine' skips")
