"""docs/bad-input.md is a test: every row of its first table is an input tried here, and the error must contain
the text the row documents; every request row is one the server test sends."""

import json
import re
from pathlib import Path

import pytest

from sedac_monitor.api import InputError
from sedac_vllm import SedacConfig
from sedac_vllm.config import ConfigError

DOC = Path(__file__).resolve().parents[3] / "docs" / "bad-input.md"
RULE = {"tau": 0.9, "consecutive_k": 1, "min_layer": 0, "protect_last": 0, "scope": "cascade"}
CHANNELS = {"input_thresholds": [0.1], "inner_thresholds": [0.1], "input_sparsity": [0.1], "inner_sparsity": [0.1]}


def table(heading):
    """The rows of the table in the section whose heading starts with ``heading`` (cells without backticks)."""
    section = next(part for part in DOC.read_text().split("\n## ") if part.startswith(heading.lstrip("# ")))
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past the header and rule
    return [[c.strip().replace("`", "") for c in line.strip("|").split("|")] for line in rows]


def error_of(fn):
    try:
        fn()
    except (ConfigError, InputError) as exc:
        return str(exc)
    except SystemExit:
        return None
    raise AssertionError("accepted")


def env(**kw):
    return {"SEDAC_ENABLED": "1", **kw}


def cases(tmp_path):
    def served(**kw):
        return lambda: SedacConfig.from_env(env(**kw))

    def config_file(content):
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return served(SEDAC_CONFIG=str(path))

    def monitor(*argv):
        from sedac_monitor.cli import main

        def run():
            assert main(list(argv)) == 2, "the CLI did not fail"
            raise SystemExit(2)  # its message went to stderr
        return run

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{bad")
    from sedac_monitor.testing import tiny_model

    tiny = tmp_path / "tiny"
    tiny_model("llama", tiny)
    text = tmp_path / "text.txt"
    text.write_text("the river and the mill " * 50)
    return {
        "SEDAC_ENABLED=maybe": lambda: SedacConfig.from_env({"SEDAC_ENABLED": "maybe"}),
        "SEDAC_TAU=abc": served(SEDAC_TAU="abc"),
        "SEDAC_TAU=nan": served(SEDAC_TAU="nan"),
        "SEDAC_CONSECUTIVE_K=0": served(SEDAC_CONSECUTIVE_K="0"),
        "SEDAC_SCOPE=sideways": served(SEDAC_SCOPE="sideways"),
        "SEDAC_GATHER=sometimes": served(SEDAC_GATHER="sometimes"),
        "SEDAC_RISK_TOLERANCE=0": served(SEDAC_RISK_TOLERANCE="0"),
        "SEDAC_TUA=0.9 (a typo)": served(SEDAC_TUA="0.9"),
        "SEDAC_THRESHOLDS=0.5 (moved to the file)": served(SEDAC_THRESHOLDS="0.5"),
        "SEDAC_MODE=probe without SEDAC_PROBE_DIR": served(SEDAC_MODE="probe"),
        "SEDAC_PROBE_DIR that does not exist": served(SEDAC_PROBE_DIR=str(tmp_path / "nowhere")),
        "SEDAC_PROBE_DIR without probe files": served(SEDAC_PROBE_DIR=str(tmp_path / "empty")),
        "SEDAC_CONFIG that does not exist": served(SEDAC_CONFIG=str(tmp_path / "nowhere.json")),
        "config file that is not JSON": config_file("{bad"),
        "config file holding a JSON list": config_file([1, 2]),
        "config file without tau": config_file({k: v for k, v in RULE.items() if k != "tau"}),
        'config file with "tau": "high"': config_file({**RULE, "tau": "high"}),
        "config file naming the scope mode": config_file(
            {**{k: v for k, v in RULE.items() if k != "scope"}, "mode": "cascade"}),
        "config file of another format": config_file({**RULE, "format": "probes"}),
        "config file with an unknown serving setting": config_file({"serving": {"shadow_rat": 0.1}}),
        "config file whose channels lists differ in length": config_file(
            {**RULE, "channels": {**CHANNELS, "inner_thresholds": [0.1, 0.2]}}),
        "config file with a negative channel threshold": config_file(
            {**RULE, "channels": {**CHANNELS, "input_thresholds": [-0.1]}}),
        "config file with a channel signal weight": config_file(
            {**RULE, "channels": {**CHANNELS, "signal_weight": 0.5, "signal_reference": [1.0]}}),
        "--model folder that does not exist": monitor(
            "calibrate", "--model", str(tmp_path / "nowhere"), "--text", str(text)),
        "--model folder without config.json": monitor(
            "calibrate", "--model", str(tmp_path / "empty"), "--text", str(text)),
        "--model folder whose config.json is not JSON": monitor(
            "calibrate", "--model", str(tmp_path / "broken"), "--text", str(text)),
        "--text file that does not exist": monitor(
            "calibrate", "--model", str(tiny), "--text", str(tmp_path / "nowhere.txt")),
        "--signal-weight without --channels": monitor(
            "calibrate", "--model", "m", "--text", "t", "--signal-weight", "1"),
    }


def test_every_documented_input_gives_the_documented_error(tmp_path, capsys):
    rows = table("## Environment, configuration files")
    run = cases(tmp_path)
    assert [r[0] for r in rows] == list(run), "docs/bad-input.md and this test list different inputs"
    for name, _, expected in rows:
        capsys.readouterr()
        message = error_of(run[name])
        if message is None:  # a CLI: its error went to stderr
            message = capsys.readouterr().err
        assert expected in message, f"{name}: {message!r} lacks {expected!r}"


def test_the_documented_requests_are_the_ones_the_server_test_sends():
    from sedac_vllm.load import malformed_requests

    assert [r[0] for r in table("## Requests")] == [what for what, _ in malformed_requests("tiny", 512)]


@pytest.mark.parametrize("line", [line for line in DOC.read_text().splitlines() if line.startswith("| `SEDAC_")])
def test_rows_name_variables_that_exist(line):
    from sedac_vllm.config import VARIABLES

    name = re.match(r"\| `(SEDAC_[A-Z_]+)", line).group(1)
    assert name in VARIABLES or name in ("SEDAC_TUA", "SEDAC_THRESHOLDS"), name  # a typo and a moved name
