#!/usr/bin/env python3
"""Make the sedac-core Rust crate buildable when crates.io cannot be reached.

Called by the project's noxfile before ``maturin build`` / ``cargo test``::

    python tools/cargo_sources.py CRATE_DIR [--cache DIR] [--extra-crate NAME ...]

or, from Python, ``ensure_sources(crate_dir, cache_dir)``, which returns the
source cargo will use: ``"crates.io"`` or ``"debian"``.

What it does, in order:

1. If ``CRATE_DIR/.cargo/config.toml`` was written by this script earlier and
   the crate directory it points at is still complete, nothing else is done.
2. Otherwise it probes crates.io with ``cargo fetch``.  When that works, nothing
   is written: a normal machine builds from crates.io untouched.
3. When crates.io cannot be reached, Debian trixie's packaged crate sources
   (the ``librust-*-dev`` packages) are downloaded with ``apt-get`` from the
   Debian archive this machine's own apt configuration names, unpacked with
   ``dpkg -x`` under the cache directory, and ``CRATE_DIR/.cargo/config.toml``
   is written to use them as a cargo "directory source" (offline).

The file has to be a project-level ``.cargo/config.toml``: cargo ignores the
environment-variable and ``--config`` forms of source replacement inside
maturin/pip builds.  Cargo reads it only when it runs with its working
directory at or below CRATE_DIR, so run the builds from there.

``SEDAC_CARGO_SOURCE`` (``auto`` by default) chooses the behaviour:
``crates.io`` skips the probe and writes nothing (it removes a config that this
script wrote earlier), ``debian`` skips the probe and always uses the Debian
crates.

Only the Python standard library is used (Python 3.9+).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable

__all__ = [
    "DEBIAN_CRATES",
    "ENV_VAR",
    "SOURCES",
    "AptSource",
    "config_is_current",
    "debian_archive_uri",
    "default_cache_dir",
    "ensure_sources",
    "missing_crates",
    "parse_deb822_sources",
    "parse_one_line_sources",
    "read_apt_sources",
    "remove_generated_config",
    "render_config",
    "crate_source",
    "write_config",
]

#: Crates (Debian package names without ``librust-`` / ``-dev``) needed by
#: sedac-core: pyo3 0.22 and rayon 1.10 with everything they depend on.
DEBIAN_CRATES: tuple[str, ...] = (
    "autocfg", "cfg-if", "crossbeam-deque", "crossbeam-epoch", "crossbeam-utils",
    "either", "heck", "indoc", "libc", "memoffset", "once-cell",
    "portable-atomic", "proc-macro2", "pyo3", "pyo3-build-config", "pyo3-ffi",
    "pyo3-macros", "pyo3-macros-backend", "quote", "rayon", "rayon-core", "syn",
    "target-lexicon", "unicode-ident", "unindent",
)

DEBIAN_SUITE = "trixie"
DEBIAN_COMPONENT = "main"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_PARTS = Path("/etc/apt/sources.list.d")

ENV_VAR = "SEDAC_CARGO_SOURCE"
SOURCES = ("auto", "crates.io", "debian")

SOURCE_NAME = "sedac-debian-crates"
MARKER = "# sedac-cargo-sources: generated file"

PROBE_TIMEOUT_S = 90
APT_TIMEOUT_S = 900

Log = Callable[[str], None]


# --------------------------------------------------------------------------
# SEDAC_CARGO_SOURCE
# --------------------------------------------------------------------------

def crate_source(environ: dict[str, str] | None = None) -> str:
    """The source chosen by ``SEDAC_CARGO_SOURCE``; ``auto`` when unset or empty."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in SOURCES:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not valid; accepted values: {', '.join(SOURCES)}"
        )
    return value


# --------------------------------------------------------------------------
# apt sources
# --------------------------------------------------------------------------

class AptSource:
    """One (type, URI) pair of an apt source entry."""

    __slots__ = ("components", "origin", "suites", "type", "uri")

    def __init__(self, type: str, uri: str, suites: Sequence[str],
                 components: Sequence[str], origin: str = "") -> None:
        self.type = type
        self.uri = uri
        self.suites = tuple(suites)
        self.components = tuple(components)
        self.origin = origin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AptSource):
            return NotImplemented
        return (self.type, self.uri, self.suites, self.components) == (
            other.type, other.uri, other.suites, other.components)

    def __repr__(self) -> str:
        return (f"AptSource({self.type!r}, {self.uri!r}, {list(self.suites)!r}, "
                f"{list(self.components)!r}, origin={self.origin!r})")


def parse_one_line_sources(text: str, origin: str = "") -> list[AptSource]:
    """Entries of a one-line-style ``sources.list`` (``deb [opts] URI suite comp...``)."""
    out: list[AptSource] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        kind = tokens.pop(0)
        if kind not in ("deb", "deb-src"):
            continue
        if tokens and tokens[0].startswith("["):
            # Options: "[a=b c=d]", "[ a=b ]" -- skip up to the closing bracket.
            while tokens and not tokens[0].endswith("]"):
                tokens.pop(0)
            if not tokens:
                continue  # unterminated option list: apt rejects this line too
            tokens.pop(0)
        if len(tokens) < 2:
            continue
        uri, suite, comps = tokens[0], tokens[1], tokens[2:]
        out.append(AptSource(kind, uri, [suite], comps, f"{origin}:{lineno}"))
    return out


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:  # continuation line
                fields[last] += "\n" + line.strip()
            continue
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        last = key.strip().lower()
        fields[last] = value.strip()
    if fields:
        stanzas.append(fields)
    return stanzas


def parse_deb822_sources(text: str, origin: str = "") -> list[AptSource]:
    """Entries of a deb822-style ``*.sources`` file (``Types:``/``URIs:`` stanzas)."""
    out: list[AptSource] = []
    for n, st in enumerate(_deb822_stanzas(text), 1):
        if st.get("enabled", "yes").strip().lower() == "no":
            continue
        types = st.get("types", "").split()
        uris = st.get("uris", "").split()
        suites = st.get("suites", "").split()
        comps = st.get("components", "").split()
        for kind in types:
            if kind not in ("deb", "deb-src"):
                continue
            for uri in uris:
                out.append(AptSource(kind, uri, suites, comps, f"{origin}#{n}"))
    return out


def read_apt_sources(sources_list: Path = APT_SOURCES_LIST,
                     sources_parts: Path = APT_SOURCES_PARTS) -> list[AptSource]:
    """All entries of apt's source files, in the order apt reads them.

    ``sources_list`` is a one-line-style file; in ``sources_parts`` the
    ``*.list`` files are one-line style and ``*.sources`` files deb822 style
    (other names are ignored, as apt does).
    """
    files: list[Path] = []
    if sources_list.is_file():
        files.append(sources_list)
    if sources_parts.is_dir():
        files.extend(sorted(p for p in sources_parts.iterdir()
                            if p.is_file() and p.suffix in (".list", ".sources")))
    out: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            out.extend(parse_deb822_sources(text, str(path)))
        else:
            out.extend(parse_one_line_sources(text, str(path)))
    return out


def _is_debian_archive(src: AptSource) -> bool:
    m = re.match(r"^([a-z][a-z0-9+.-]*)://([^/]*)(/.*)?$", src.uri, re.IGNORECASE)
    if not m:
        return False
    scheme, host, path = m.group(1).lower(), m.group(2).lower(), m.group(3) or "/"
    if scheme not in ("http", "https", "ftp", "file", "mirror+http", "mirror+https"):
        return False
    if host.startswith("security.") or any("security" in s for s in src.suites):
        return False
    # The main archive lives in a directory called "debian" on the mirror host.
    return path.rstrip("/").rsplit("/", 1)[-1].lower() == "debian"


def debian_archive_uri(sources: Iterable[AptSource]) -> str | None:
    """URI of the first Debian archive (not the security archive) among ``sources``.

    ``deb`` entries win over ``deb-src`` ones.
    """
    sources = list(sources)
    for wanted in ("deb", "deb-src"):
        for src in sources:
            if src.type == wanted and _is_debian_archive(src):
                return src.uri.rstrip("/")
    return None


# --------------------------------------------------------------------------
# cargo config
# --------------------------------------------------------------------------

def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything a path holds.
    return json.dumps(value, ensure_ascii=False)


def render_config(registry: Path) -> str:
    return (
        f"{MARKER}\n"
        "# Written by packages/sedac-core-rs/tools/cargo_sources.py because crates.io\n"
        "# could not be reached (or SEDAC_CARGO_SOURCE=debian): cargo builds this crate\n"
        f"# offline from Debian {DEBIAN_SUITE}'s packaged crate sources unpacked below.\n"
        "# Delete this file (or the whole .cargo directory) to build from crates.io\n"
        "# again; do not commit it, nor a Cargo.lock made while it is in place.\n"
        "\n"
        "[source.crates-io]\n"
        f"replace-with = {_toml_str(SOURCE_NAME)}\n"
        "\n"
        f"[source.{SOURCE_NAME}]\n"
        f"directory = {_toml_str(str(registry))}\n"
        "\n"
        "[net]\n"
        "offline = true\n"
    )


def config_path(crate_dir: Path) -> Path:
    return Path(crate_dir) / ".cargo" / "config.toml"


def write_config(crate_dir: Path, registry: Path) -> Path:
    path = config_path(crate_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_config(Path(registry).resolve()), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _read_generated_config(crate_dir: Path) -> tuple[bool, bool, Path | None]:
    """(exists, written by us, directory it names)."""
    path = config_path(crate_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False, False, None
    except OSError:
        return True, False, None
    if not text.startswith(MARKER):
        return True, False, None
    m = re.search(r'^directory\s*=\s*("(?:[^"\\]|\\.)*")\s*$', text, re.MULTILINE)
    if not m:
        return True, True, None
    try:
        return True, True, Path(json.loads(m.group(1)))
    except ValueError:
        return True, True, None


def _crate_key(name: str) -> str:
    return name.lower().replace("_", "-")


def missing_crates(registry: Path, crates: Iterable[str] = DEBIAN_CRATES) -> list[str]:
    """Crates of ``crates`` with no usable ``NAME-VERSION`` directory in ``registry``."""
    present = set()
    try:
        entries = list(Path(registry).iterdir())
    except OSError:
        entries = []
    for entry in entries:
        m = re.match(r"^(.+?)-(\d+\.\d+\.\d+\S*)$", entry.name)
        if m and (entry / ".cargo-checksum.json").is_file() and (entry / "Cargo.toml").is_file():
            present.add(_crate_key(m.group(1)))
    return [c for c in crates if _crate_key(c) not in present]


def config_is_current(crate_dir: Path, crates: Iterable[str] = DEBIAN_CRATES) -> bool:
    """True when our generated config is in place and its crate directory is complete."""
    _, ours, registry = _read_generated_config(crate_dir)
    return bool(ours and registry is not None and registry.is_dir()
                and not missing_crates(registry, crates))


def remove_generated_config(crate_dir: Path) -> bool:
    """Remove ``.cargo/config.toml`` if this script wrote it; True when removed."""
    _, ours, _ = _read_generated_config(crate_dir)
    if not ours:
        return False
    path = config_path(crate_dir)
    path.unlink()
    try:
        path.parent.rmdir()  # only when empty
    except OSError:
        pass
    return True


# --------------------------------------------------------------------------
# crates.io probe
# --------------------------------------------------------------------------

def _lockfile_path(crate_dir: Path, cargo: str) -> Path:
    """Where cargo keeps the lockfile (the workspace root's Cargo.lock)."""
    try:
        res = subprocess.run(
            [cargo, "locate-project", "--workspace", "--message-format", "plain",
             "--manifest-path", str(crate_dir / "Cargo.toml")],
            cwd=crate_dir, capture_output=True, text=True, check=False, timeout=30)
        if res.returncode == 0 and res.stdout.strip():
            return Path(res.stdout.strip()).parent / "Cargo.lock"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return crate_dir / "Cargo.lock"


def probe_crates_io(crate_dir: Path, log: Log = print,
                    timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``cargo fetch`` for the crate succeeds (crates.io reachable).

    Leaves the lockfile exactly as it was: removed again when the probe created it.
    """
    cargo = shutil.which("cargo")
    if cargo is None:
        raise RuntimeError("cargo was not found on PATH; install a Rust toolchain "
                           "(https://rustup.rs) to build sedac-core")
    lock = _lockfile_path(crate_dir, cargo)
    before = lock.read_bytes() if lock.is_file() else None
    env = dict(os.environ, CARGO_NET_RETRY="0", CARGO_HTTP_TIMEOUT="20")
    log(f"cargo_sources: probing crates.io (cargo fetch, timeout {timeout:.0f} s) ...")
    t0 = time.monotonic()
    ok = False
    detail = ""
    try:
        res = subprocess.run(
            [cargo, "fetch", "--manifest-path", str(crate_dir / "Cargo.toml")],
            cwd=crate_dir, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, check=False, timeout=timeout)
        ok = res.returncode == 0
        if not ok:
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            detail = lines[-1].strip() if lines else f"exit status {res.returncode}"
    except subprocess.TimeoutExpired:
        detail = f"no answer within {timeout:.0f} s"
    finally:
        if before is None:
            if lock.is_file():
                lock.unlink()
        elif not lock.is_file() or lock.read_bytes() != before:
            lock.write_bytes(before)
    took = time.monotonic() - t0
    if ok:
        log(f"cargo_sources: crates.io is reachable ({took:.1f} s)")
    else:
        log(f"cargo_sources: crates.io is not reachable ({took:.1f} s): {detail}")
    return ok


# --------------------------------------------------------------------------
# Debian crates
# --------------------------------------------------------------------------

def _unreachable(reason: str) -> RuntimeError:
    return RuntimeError(
        "crates.io cannot be reached and the Debian fallback is not available: "
        f"{reason}.\nTo build sedac-core, either give cargo access to crates.io "
        "(check proxy settings; set SEDAC_CARGO_SOURCE=crates.io to skip the probe), "
        "or run on a Debian-based machine whose apt sources name a Debian archive "
        f"(the {DEBIAN_SUITE} librust-*-dev packages are used), or provide the crates "
        "yourself with `cargo vendor` and a .cargo/config.toml source replacement "
        "in the crate directory."
    )


def _run_checked(cmd: list[str], what: str, cwd: Path | None = None,
                 timeout: float = APT_TIMEOUT_S) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        out = (res.stderr.strip() or res.stdout.strip())[-2000:]
        raise RuntimeError(f"{what} failed (exit status {res.returncode}):\n{out}")


def fetch_debian_crates(cache_dir: Path, crates: Sequence[str] = DEBIAN_CRATES,
                        log: Log = print,
                        sources: Sequence[AptSource] | None = None) -> Path:
    """Download and unpack Debian's crate packages under ``cache_dir``.

    Returns the cargo registry directory (``cache_dir/root/usr/share/cargo/registry``).
    Does no network work when that directory already holds all ``crates``.
    """
    cache_dir = Path(cache_dir).resolve()
    registry = cache_dir / "root" / "usr" / "share" / "cargo" / "registry"
    if registry.is_dir() and not missing_crates(registry, crates):
        log(f"cargo_sources: using cached Debian crates in {registry}")
        return registry

    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise _unreachable(f"`{tool}` is not installed")
    if not DEBIAN_KEYRING.is_file():
        raise _unreachable(f"the Debian archive keyring {DEBIAN_KEYRING} is missing "
                           "(package debian-archive-keyring)")
    if sources is None:
        sources = read_apt_sources()
    uri = debian_archive_uri(sources)
    if uri is None:
        raise _unreachable(f"no Debian archive found in {APT_SOURCES_LIST} or "
                           f"{APT_SOURCES_PARTS}")

    apt = cache_dir / "apt"
    debs = cache_dir / "debs"
    for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial",
              apt / "state"):
        d.mkdir(parents=True, exist_ok=True)
    if debs.exists():
        shutil.rmtree(debs)
    debs.mkdir(parents=True)
    (apt / "sources.list").write_text(
        f"deb [signed-by={DEBIAN_KEYRING}] {uri} {DEBIAN_SUITE} {DEBIAN_COMPONENT}\n",
        encoding="utf-8")
    (apt / "status").write_text("", encoding="utf-8")
    opts = [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        "-o", f"Dir::State={apt / 'state'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::State::status={apt / 'status'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Debug::NoLocking=1",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # apt would drop to the _apt user, who cannot write into cache_dir.
        opts += ["-o", "APT::Sandbox::User=root"]

    t0 = time.monotonic()
    log(f"cargo_sources: reading the package index of {uri} {DEBIAN_SUITE} "
        f"{DEBIAN_COMPONENT} (apt-get update) ...")
    _run_checked(["apt-get", *opts, "-qq", "update"], "apt-get update")
    pkgs = [f"librust-{c}-dev" for c in crates]
    log(f"cargo_sources: downloading {len(pkgs)} librust-*-dev packages into {debs} ...")
    _run_checked(["apt-get", *opts, "-qq", "download", *pkgs], "apt-get download", cwd=debs)

    root_tmp = cache_dir / "root.tmp"
    if root_tmp.exists():
        shutil.rmtree(root_tmp)
    root_tmp.mkdir()
    files = sorted(debs.glob("*.deb"))
    log(f"cargo_sources: unpacking {len(files)} packages (dpkg -x) ...")
    for deb in files:
        _run_checked(["dpkg", "-x", str(deb), str(root_tmp)], f"dpkg -x {deb.name}")
    missing = missing_crates(root_tmp / "usr" / "share" / "cargo" / "registry", crates)
    if missing:
        raise RuntimeError("the Debian packages did not provide the crates: "
                           + ", ".join(missing))
    root = cache_dir / "root"
    if root.exists():
        shutil.rmtree(root)
    os.replace(root_tmp, root)
    log(f"cargo_sources: {len(list(registry.iterdir()))} crates ready in {registry} "
        f"({time.monotonic() - t0:.1f} s)")
    return registry


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------

def ensure_sources(crate_dir: Path, cache_dir: Path, log: Log = print,
                   extra_crates: Sequence[str] = (),
                   environ: dict[str, str] | None = None) -> str:
    """Make sure cargo can get the crate's dependencies; returns "crates.io" or "debian".

    See the module docstring for the steps.  Raises ValueError for a bad
    ``SEDAC_CARGO_SOURCE`` and RuntimeError when no source can be set up.
    """
    source = crate_source(environ)
    crate_dir = Path(crate_dir).resolve()
    cache_dir = Path(cache_dir).expanduser().resolve()
    crates = tuple(dict.fromkeys([*DEBIAN_CRATES, *extra_crates]))
    if not (crate_dir / "Cargo.toml").is_file():
        raise RuntimeError(f"{crate_dir / 'Cargo.toml'} does not exist")

    if source == "crates.io":
        if remove_generated_config(crate_dir):
            log(f"cargo_sources: {ENV_VAR}=crates.io: removed the generated "
                f"{config_path(crate_dir)}")
        log(f"cargo_sources: {ENV_VAR}=crates.io: using crates.io")
        return "crates.io"

    if config_is_current(crate_dir, crates):
        log(f"cargo_sources: {config_path(crate_dir)} is in place; "
            "building offline from Debian's crates")
        return "debian"

    exists, ours, _ = _read_generated_config(crate_dir)
    if exists and not ours:
        log(f"cargo_sources: note: {config_path(crate_dir)} was not written by this "
            "script; cargo uses it as it is")
    if source == "auto":
        if ours:
            # Stale (its crates are gone): it would make the probe fail offline.
            remove_generated_config(crate_dir)
            log(f"cargo_sources: removed the stale generated {config_path(crate_dir)}")
        if probe_crates_io(crate_dir, log):
            return "crates.io"
    else:
        log(f"cargo_sources: {ENV_VAR}=debian: skipping the crates.io probe")

    exists, ours, _ = _read_generated_config(crate_dir)
    if exists and not ours:
        raise RuntimeError(
            f"{config_path(crate_dir)} exists and was not written by this script; "
            "not overwriting it. Remove it to let cargo_sources.py set up Debian's "
            "crates, or keep it if it already points cargo at a working source."
        )
    registry = fetch_debian_crates(cache_dir, crates, log)
    path = write_config(crate_dir, registry)
    log(f"cargo_sources: wrote {path}; cargo will build offline from Debian's crates")
    return "debian"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sedac" / f"debian-{DEBIAN_SUITE}-crates"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Use crates.io when it is reachable; otherwise set up Debian's "
                    "packaged crates as an offline cargo source for CRATE_DIR.")
    parser.add_argument("crate_dir", type=Path, metavar="CRATE_DIR",
                        help="directory holding the crate's Cargo.toml")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help=f"where Debian's crates are kept (default: {default_cache_dir()})")
    parser.add_argument("--extra-crate", action="append", default=[], metavar="NAME",
                        help="another crate to fetch from Debian (librust-NAME-dev); repeatable")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else default_cache_dir()
    try:
        source = ensure_sources(args.crate_dir, cache, extra_crates=args.extra_crate)
    except (RuntimeError, ValueError) as exc:
        print(f"cargo_sources: error: {exc}", file=sys.stderr)
        return 2
    print(f"cargo_sources: source = {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
