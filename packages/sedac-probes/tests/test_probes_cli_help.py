"""Every option of `sedac-probes` says what it takes, read from the printed help as a user reads it."""

import pytest

from sedac_monitor.testing import options_without_help, subcommands
from sedac_probes.cli import main


def help_of(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_every_option_has_help(capsys):
    names = subcommands(help_of(capsys))
    assert {"collect", "train", "calibrate"} <= set(names)
    for name in names:
        assert options_without_help(help_of(capsys, name)) == [], f"sedac-probes {name}"
