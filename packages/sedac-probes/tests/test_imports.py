from importlib import metadata

import sedac_probes


def test_public_api_is_pinned():
    assert sorted(sedac_probes.__all__) == [
        "LREProbe", "ProbeBank", "ProbeDecider", "ProbeFileError", "ProbeSet", "TorchProbeRule", "__version__", "load",
        "save"]
    assert all(hasattr(sedac_probes, name) for name in sedac_probes.__all__)


def test_version_comes_from_the_installed_distribution():
    assert sedac_probes.__version__ == metadata.version("sedac-probes")


def test_depends_on_a_compatible_sedac_core():
    import sedac_core

    requires = metadata.requires("sedac-probes") or []
    core = [r for r in requires if r.startswith("sedac-core")]
    assert len(core) == 1, requires
    assert sorted(core[0][len("sedac-core"):].replace(" ", "").split(",")) == ["<0.2", ">=0.1"]
    major, minor = (int(p) for p in sedac_core.__version__.split(".")[:2])
    assert (major, minor) == (0, 1)


def test_modules_import_each_other_without_a_cycle():
    from sedac_fixtures import assert_no_import_cycle

    edges = assert_no_import_cycle(sedac_probes)
    assert edges["evaluate"] >= {"fusion", "train"}  # the check reads real edges
