from importlib import metadata

import sedac_bench


def test_public_api_is_pinned():
    assert sorted(sedac_bench.__all__) == ["__version__"]


def test_version_comes_from_the_installed_distribution():
    assert sedac_bench.__version__ == metadata.version("sedac-bench")


def test_depends_on_a_compatible_sedac_core():
    import sedac_core

    requires = metadata.requires("sedac-bench") or []
    core = [r for r in requires if r.startswith("sedac-core")]
    assert len(core) == 1, requires
    assert sorted(core[0][len("sedac-core"):].replace(" ", "").split(",")) == ["<0.2", ">=0.1"]
    major, minor = (int(p) for p in sedac_core.__version__.split(".")[:2])
    assert (major, minor) == (0, 1)


def test_sibling_packages_import_only_the_public_surface():
    """sedac-probes, sedac-vllm and sedac-bench reach sedac-monitor through its public modules only."""
    import re
    from pathlib import Path

    import sedac_bench
    import sedac_probes
    import sedac_vllm

    allowed = {"sedac_monitor", "sedac_monitor.api", "sedac_monitor.calibrate", "sedac_monitor.testing",
               "sedac_monitor.cli", "sedac_monitor.sparsity"}
    for pkg in (sedac_probes, sedac_vllm, sedac_bench):
        for path in Path(pkg.__file__).parent.rglob("*.py"):
            for module in re.findall(r"^\s*(?:from|import) (sedac_monitor[\w.]*)", path.read_text(), re.M):
                assert module in allowed, f"{path.name} imports {module}"


def test_every_package_is_typed():
    import importlib.resources

    for pkg in ("sedac_core", "sedac_monitor", "sedac_probes", "sedac_vllm", "sedac_bench"):
        assert importlib.resources.files(pkg).joinpath("py.typed").is_file(), pkg
