from importlib import metadata

import sedac_probes


def test_public_api_is_pinned():
    assert sorted(sedac_probes.__all__) == [
        "LREProbe", "ProbeBank", "ProbeDecider", "ProbeFileError", "ProbeSet", "TorchCascade", "__version__", "load",
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
    """Each module's imports of its siblings (at the top or inside a function) form no cycle, so every job
    can be read, and imported, on its own."""
    import ast
    from pathlib import Path

    folder = Path(sedac_probes.__file__).parent
    names = {p.stem for p in folder.glob("*.py")}
    edges = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sedac_probes."):
                deps.add(node.module.split(".")[1])
        edges[path.stem] = {d.split(".")[0] for d in deps} & names - {path.stem}

    def visit(name, stack):
        assert name not in stack, "import cycle: " + " -> ".join([*stack, name])
        for dep in sorted(edges[name]):
            visit(dep, [*stack, name])

    assert edges["evaluate"] >= {"fusion", "train"}  # the test reads real edges
    for name in sorted(edges):
        visit(name, [])
