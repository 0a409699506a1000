"""SEDAC_CORE_BACKEND handling, checked in fresh interpreters."""

import os
import subprocess
import sys
import textwrap

import pytest

HIDE_NATIVE = textwrap.dedent("""
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sedac_core._native":
                raise ImportError("hidden by the test")
    sys.meta_path.insert(0, Hide())
""")


def run(code, env_value, hide=False):
    env = dict(os.environ)
    env.pop("SEDAC_CORE_BACKEND", None)
    if env_value is not None:
        env["SEDAC_CORE_BACKEND"] = env_value
    script = (HIDE_NATIVE if hide else "") + code
    return subprocess.run([sys.executable, "-W", "default", "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("value, expected", [(None, "rust"), ("auto", "rust"), ("rust", "rust"),
                                             ("python", "python"), (" Python ", "python")])
def test_env_selects_backend(value, expected):
    proc = run("import sedac_core; print(sedac_core.backend())", value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert "RuntimeWarning" not in proc.stderr


def test_bad_env_value_is_an_error_naming_the_variable():
    proc = run("import sedac_core", "fast")
    assert proc.returncode != 0
    assert "SEDAC_CORE_BACKEND='fast' is not valid; use one of: auto, rust, python" in proc.stderr


def test_rust_requested_but_missing_is_an_error():
    proc = run("import sedac_core", "rust", hide=True)
    assert proc.returncode != 0
    assert "SEDAC_CORE_BACKEND=rust but the Rust extension sedac_core._native cannot be used" in proc.stderr


def test_auto_falls_back_with_one_warning():
    code = "import sedac_core, numpy as np; print(sedac_core.backend()); " \
           "print(sedac_core.consecutive_exit(np.ones((2, 3), 'f4'), 0.9, 2).tolist())"
    proc = run(code, "auto", hide=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "[1,", "1]"]
    assert proc.stderr.count("RuntimeWarning") == 1
    assert "using the numpy backend" in proc.stderr


def test_set_backend_switches_and_validates():
    import sedac_core

    before = sedac_core.backend()
    try:
        assert sedac_core.set_backend("python") == "python" == sedac_core.backend()
        with pytest.raises(ValueError, match="is not valid"):
            sedac_core.set_backend("gpu")
        assert sedac_core.backend() == "python"
    finally:
        sedac_core.set_backend(before)
