"""Every option of `sedac-probes` says what it takes, read from the printed help as a user reads it."""

from sedac_monitor.testing import cli_help, options_without_help, subcommands
from sedac_probes.cli import main


def test_every_option_has_help():
    names = subcommands(cli_help(main))
    assert {"collect", "train", "calibrate"} <= set(names)
    for name in names:
        assert options_without_help(cli_help(main, name)) == [], f"sedac-probes {name}"
