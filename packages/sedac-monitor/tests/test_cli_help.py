"""Every option of `sedac-monitor` says what it takes, read from the printed help as a user reads it."""

import argparse

from sedac_monitor.cli import main
from sedac_monitor.testing import cli_help, options_without_help, subcommands


def test_every_option_has_help():
    names = subcommands(cli_help(main))
    assert {"calibrate", "evaluate"} <= set(names)
    for name in names:
        text = cli_help(main, name)
        assert "--model" in text
        assert options_without_help(text) == [], f"sedac-monitor {name}"


def test_an_option_without_help_is_found():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--documented", default=1, help="what it takes (default 1)")
    parser.add_argument("--bare", default=2)
    parser.add_argument("--a-rather-long-option-name-that-wraps", help="help on the next line")
    assert options_without_help(parser.format_help()) == ["--bare"]
