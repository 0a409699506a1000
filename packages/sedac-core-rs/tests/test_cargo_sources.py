"""Tests for tools/cargo_sources.py: the parts that need no network."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "cargo_sources.py"


def _load():
    spec = importlib.util.spec_from_file_location("sedac_cargo_sources", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cs = _load()


# ---------------------------------------------------------------- apt sources

ONE_LINE = textwrap.dedent("""\
    # comment line
    deb http://security.mirror.example/debian-security bookworm-security main
    deb-src http://ftp.mirror.example/debian/ bookworm main
    deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] https://packages.example.com/apt stable main
    deb [ trusted=yes ] http://ftp.mirror.example/debian/ bookworm main contrib  # trailing comment
    deb http://ftp.mirror.example/debian bookworm-updates main
    bogus line here
    deb http://incomplete.example.org/debian
""")

DEB822 = textwrap.dedent("""\
    Types: deb
    # http://snapshot.mirror.example/archive/debian/20250520T000000Z
    URIs: http://deb.mirror.example/debian
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: http://deb.mirror.example/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""")


def test_parse_one_line():
    entries = cs.parse_one_line_sources(ONE_LINE, "x.list")
    assert [(e.type, e.uri, e.suites, e.components) for e in entries] == [
        ("deb", "http://security.mirror.example/debian-security", ("bookworm-security",), ("main",)),
        ("deb-src", "http://ftp.mirror.example/debian/", ("bookworm",), ("main",)),
        ("deb", "https://packages.example.com/apt", ("stable",), ("main",)),
        ("deb", "http://ftp.mirror.example/debian/", ("bookworm",), ("main", "contrib")),
        ("deb", "http://ftp.mirror.example/debian", ("bookworm-updates",), ("main",)),
    ]
    assert entries[0].origin == "x.list:2"


def test_one_line_prefers_deb_and_skips_security():
    uri = cs.debian_archive_uri(cs.parse_one_line_sources(ONE_LINE))
    # the deb-src line comes earlier, but a deb line wins; the trailing slash goes
    assert uri == "http://ftp.mirror.example/debian"


def test_parse_deb822():
    entries = cs.parse_deb822_sources(DEB822, "debian.sources")
    assert [(e.type, e.uri, e.suites) for e in entries] == [
        ("deb", "http://deb.mirror.example/debian", ("bookworm", "bookworm-updates")),
        ("deb", "http://deb.mirror.example/debian-security", ("bookworm-security",)),
    ]
    assert cs.debian_archive_uri(entries) == "http://deb.mirror.example/debian"


def test_deb822_multi_values_continuations_and_disabled():
    text = textwrap.dedent("""\
        Types: deb deb-src
        URIs: http://mirror.example.net/debian-security
        Suites: trixie-security
        Components: main

        Enabled: no
        Types: deb
        URIs: http://disabled.example.net/debian
        Suites: trixie
        Components: main

        types: deb
        uris: https://one.example.net/ubuntu
         http://two.example.net/debian/
        suites: trixie
        components: main
         contrib
    """)
    entries = cs.parse_deb822_sources(text)
    assert [(e.type, e.uri) for e in entries] == [
        ("deb", "http://mirror.example.net/debian-security"),
        ("deb-src", "http://mirror.example.net/debian-security"),
        ("deb", "https://one.example.net/ubuntu"),
        ("deb", "http://two.example.net/debian/"),
    ]
    assert entries[-1].components == ("main", "contrib")
    assert cs.debian_archive_uri(entries) == "http://two.example.net/debian"


def test_security_host_is_skipped():
    entries = cs.parse_one_line_sources(
        "deb http://security.mirror.example/debian bookworm/updates main\n")
    assert cs.debian_archive_uri(entries) is None


def test_read_apt_sources_from_files(tmp_path):
    sources_list = tmp_path / "sources.list"
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    sources_list.write_text("deb https://packages.example.com/apt stable main\n")
    (parts / "b-debian.sources").write_text(DEB822)
    (parts / "a-other.list").write_text("deb http://archive.ubuntu.com/ubuntu noble main\n")
    (parts / "c.list.disabled").write_text("deb http://first.example.org/debian trixie main\n")
    (parts / "d.list.save").write_text("deb http://first.example.org/debian trixie main\n")
    entries = cs.read_apt_sources(sources_list, parts)
    assert [e.uri for e in entries] == [
        "https://packages.example.com/apt",
        "http://archive.ubuntu.com/ubuntu",
        "http://deb.mirror.example/debian",
        "http://deb.mirror.example/debian-security",
    ]
    assert cs.debian_archive_uri(entries) == "http://deb.mirror.example/debian"


def test_read_apt_sources_missing_files(tmp_path):
    assert cs.read_apt_sources(tmp_path / "nope.list", tmp_path / "nope.d") == []
    assert cs.debian_archive_uri([]) is None


def test_no_debian_archive_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(cs.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(cs, "DEBIAN_KEYRING", tmp_path / "keyring.gpg")
    (tmp_path / "keyring.gpg").write_bytes(b"")
    ubuntu = cs.parse_one_line_sources("deb http://archive.ubuntu.com/ubuntu noble main\n")
    with pytest.raises(RuntimeError, match="crates.io cannot be reached.*no Debian archive"):
        cs.fetch_debian_crates(tmp_path / "cache", log=lambda m: None, sources=ubuntu)


def test_missing_apt_get_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(cs.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="`apt-get` is not installed") as info:
        cs.fetch_debian_crates(tmp_path / "cache", log=lambda m: None, sources=[])
    assert "cargo vendor" in str(info.value)


# ----------------------------------------------------------- SEDAC_CARGO_SOURCE

@pytest.mark.parametrize("value, source", [
    (None, "auto"), ("", "auto"), ("auto", "auto"), ("crates.io", "crates.io"),
    ("debian", "debian"), (" Debian ", "debian"), ("CRATES.IO", "crates.io"),
])
def test_crate_source(value, source):
    env = {} if value is None else {cs.ENV_VAR: value}
    assert cs.crate_source(env) == source


@pytest.mark.parametrize("value", ["cratesio", "apt", "offline", "1"])
def test_crate_source_rejects(value):
    with pytest.raises(ValueError) as info:
        cs.crate_source({cs.ENV_VAR: value})
    msg = str(info.value)
    assert cs.ENV_VAR in msg and repr(value) in msg
    for accepted in ("auto", "crates.io", "debian"):
        assert accepted in msg


def test_crate_source_reads_os_environ(monkeypatch):
    monkeypatch.setenv(cs.ENV_VAR, "debian")
    assert cs.crate_source() == "debian"


# --------------------------------------------------------------- cargo config

def _fake_registry(root: Path, crates=cs.DEBIAN_CRATES) -> Path:
    reg = root / "root" / "usr" / "share" / "cargo" / "registry"
    for i, name in enumerate(crates):
        d = reg / f"{name.replace('once-cell', 'once_cell')}-1.{i}.0"
        d.mkdir(parents=True)
        (d / "Cargo.toml").write_text(f'[package]\nname = "{name}"\n')
        (d / ".cargo-checksum.json").write_text('{"files": {}, "package": ""}')
    return reg


@pytest.fixture
def crate(tmp_path):
    d = tmp_path / "crate"
    d.mkdir()
    (d / "Cargo.toml").write_text('[package]\nname = "x"\nversion = "0.1.0"\n')
    return d


def test_render_config_is_valid_toml(tmp_path):
    text = cs.render_config(tmp_path / 'we"ird\\dir')
    assert text.startswith(cs.MARKER)
    assert "[net]\noffline = true\n" in text
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return
    data = tomllib.loads(text)
    name = data["source"]["crates-io"]["replace-with"]
    assert data["source"][name]["directory"] == str(tmp_path / 'we"ird\\dir')
    assert data["net"]["offline"] is True


def test_missing_crates(tmp_path):
    reg = _fake_registry(tmp_path)
    assert cs.missing_crates(reg) == []
    assert cs.missing_crates(reg, ["rayon", "proptest"]) == ["proptest"]
    (reg / "rayon-1.19.0" / ".cargo-checksum.json").unlink()
    assert cs.missing_crates(reg, ["rayon", "once-cell"]) == ["rayon"]
    assert cs.missing_crates(tmp_path / "absent", ["rayon"]) == ["rayon"]


def test_config_roundtrip_and_currency(tmp_path, crate):
    reg = _fake_registry(tmp_path)
    assert not cs.config_is_current(crate)
    path = cs.write_config(crate, reg)
    assert path == crate / ".cargo" / "config.toml"
    assert cs.config_is_current(crate)
    assert not cs.config_is_current(crate, [*cs.DEBIAN_CRATES, "proptest"])
    # the cache vanishing makes it stale
    (reg / "syn-1.21.0" / "Cargo.toml").unlink()
    assert not cs.config_is_current(crate)


def test_foreign_config_is_not_ours(tmp_path, crate):
    reg = _fake_registry(tmp_path)
    (crate / ".cargo").mkdir()
    (crate / ".cargo" / "config.toml").write_text(
        f'[source.crates-io]\nreplace-with = "v"\n[source.v]\ndirectory = "{reg}"\n')
    assert not cs.config_is_current(crate)
    assert cs.remove_generated_config(crate) is False
    assert (crate / ".cargo" / "config.toml").exists()


def test_remove_generated_config(tmp_path, crate):
    cs.write_config(crate, _fake_registry(tmp_path))
    assert cs.remove_generated_config(crate) is True
    assert not (crate / ".cargo").exists()
    assert cs.remove_generated_config(crate) is False


# ------------------------------------------------------------- ensure_sources

def _no_subprocess(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"unexpected subprocess: {a!r}")
    monkeypatch.setattr(cs.subprocess, "run", boom)


def test_ensure_fast_path_does_no_work(tmp_path, crate, monkeypatch):
    cs.write_config(crate, _fake_registry(tmp_path))
    _no_subprocess(monkeypatch)
    logs = []
    for source in ("auto", "debian"):
        assert cs.ensure_sources(crate, tmp_path / "other-cache", logs.append,
                                 environ={cs.ENV_VAR: source}) == "debian"
    assert logs


def test_ensure_crates_io_mode_writes_nothing(tmp_path, crate, monkeypatch):
    _no_subprocess(monkeypatch)
    assert cs.ensure_sources(crate, tmp_path / "cache", lambda m: None,
                             environ={cs.ENV_VAR: "crates.io"}) == "crates.io"
    assert sorted(p.name for p in crate.iterdir()) == ["Cargo.toml"]
    assert not (tmp_path / "cache").exists()
    # a config this script wrote earlier is taken away again
    cs.write_config(crate, _fake_registry(tmp_path))
    assert cs.ensure_sources(crate, tmp_path / "cache", lambda m: None,
                             environ={cs.ENV_VAR: "crates.io"}) == "crates.io"
    assert not (crate / ".cargo").exists()


def test_ensure_bad_env_value(tmp_path, crate):
    with pytest.raises(ValueError, match=cs.ENV_VAR):
        cs.ensure_sources(crate, tmp_path, lambda m: None, environ={cs.ENV_VAR: "x"})


def test_ensure_debian_uses_cache_without_network(tmp_path, crate, monkeypatch):
    cache = tmp_path / "cache"
    _fake_registry(cache)
    _no_subprocess(monkeypatch)
    assert cs.ensure_sources(crate, cache, lambda m: None,
                             environ={cs.ENV_VAR: "debian"}) == "debian"
    assert cs.config_is_current(crate)
    assert "directory = " in (crate / ".cargo" / "config.toml").read_text()


def test_ensure_debian_refuses_foreign_config(tmp_path, crate, monkeypatch):
    _fake_registry(tmp_path / "cache")
    (crate / ".cargo").mkdir()
    (crate / ".cargo" / "config.toml").write_text("[build]\n")
    _no_subprocess(monkeypatch)
    with pytest.raises(RuntimeError, match="not written by this script"):
        cs.ensure_sources(crate, tmp_path / "cache", lambda m: None,
                          environ={cs.ENV_VAR: "debian"})
    assert (crate / ".cargo" / "config.toml").read_text() == "[build]\n"


# ---------------------------------------------------------- probe (fake cargo)

def _fake_cargo(tmp_path, monkeypatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cargo = bindir / "cargo"
    cargo.write_text("#!/bin/sh\n" + script)
    cargo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


# `cargo locate-project` fails (so the lockfile is CRATE/Cargo.lock); `cargo fetch`
# writes a lockfile and exits with $FETCH_RC.
_FAKE = textwrap.dedent("""\
    [ "$1" = locate-project ] && exit 1
    [ "$CARGO_NET_RETRY" = 0 ] || exit 9
    echo fetched > Cargo.lock
    echo "error: failed to query index" >&2
    exit "${FETCH_RC:-0}"
""")


@pytest.mark.skipif(os.name != "posix", reason="uses a shell-script stand-in for cargo")
@pytest.mark.parametrize("rc, expect", [(0, True), (101, False)])
def test_probe_removes_lockfile_it_created(tmp_path, crate, monkeypatch, rc, expect):
    _fake_cargo(tmp_path, monkeypatch, _FAKE)
    monkeypatch.setenv("FETCH_RC", str(rc))
    logs = []
    assert cs.probe_crates_io(crate, logs.append) is expect
    assert not (crate / "Cargo.lock").exists()
    if not expect:
        assert "failed to query index" in logs[-1]


@pytest.mark.skipif(os.name != "posix", reason="uses a shell-script stand-in for cargo")
def test_probe_restores_existing_lockfile(tmp_path, crate, monkeypatch):
    _fake_cargo(tmp_path, monkeypatch, _FAKE)
    (crate / "Cargo.lock").write_text("original\n")
    assert cs.probe_crates_io(crate, lambda m: None) is True
    assert (crate / "Cargo.lock").read_text() == "original\n"


@pytest.mark.skipif(os.name != "posix", reason="uses a shell-script stand-in for cargo")
def test_probe_timeout_counts_as_unreachable(tmp_path, crate, monkeypatch):
    _fake_cargo(tmp_path, monkeypatch, '[ "$1" = locate-project ] && exit 1\nexec sleep 30\n')
    logs = []
    assert cs.probe_crates_io(crate, logs.append, timeout=0.5) is False
    assert "no answer within" in logs[-1]


@pytest.mark.skipif(os.name != "posix", reason="uses a shell-script stand-in for cargo")
def test_auto_success_writes_nothing(tmp_path, crate, monkeypatch):
    _fake_cargo(tmp_path, monkeypatch, _FAKE)
    assert cs.ensure_sources(crate, tmp_path / "cache", lambda m: None,
                             environ={}) == "crates.io"
    assert sorted(p.name for p in crate.iterdir()) == ["Cargo.toml"]


@pytest.mark.skipif(os.name != "posix", reason="uses a shell-script stand-in for cargo")
def test_auto_failure_falls_back_to_cached_debian(tmp_path, crate, monkeypatch):
    _fake_cargo(tmp_path, monkeypatch, _FAKE)
    monkeypatch.setenv("FETCH_RC", "101")
    cache = tmp_path / "cache"
    _fake_registry(cache)
    assert cs.ensure_sources(crate, cache, lambda m: None, environ={}) == "debian"
    assert cs.config_is_current(crate)
    assert not (crate / "Cargo.lock").exists()


# -------------------------------------------------------------------- CLI

def test_cli_bad_env_exits_2(crate, tmp_path):
    env = dict(os.environ, **{cs.ENV_VAR: "nope"})
    res = subprocess.run([sys.executable, str(_TOOL), str(crate), "--cache", str(tmp_path)],
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert cs.ENV_VAR in res.stderr


def test_cli_crates_io_source(crate, tmp_path):
    env = dict(os.environ, **{cs.ENV_VAR: "crates.io"})
    res = subprocess.run([sys.executable, str(_TOOL), str(crate), "--cache", str(tmp_path / "c")],
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "crates.io" in res.stdout
    assert not (crate / ".cargo").exists()
