"""pytest fixtures shared by the sedac-monitor and sedac-probes test suites (not part of any package).

A suite's ``conftest.py`` puts this folder on ``sys.path`` and imports the fixtures it uses from here
(pytest picks up fixtures by name from the conftest's namespace).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sedac_monitor.attach import HFAttachment
from sedac_monitor.decide import RecordingDecider
from sedac_monitor.engine import SkipRuntime
from sedac_monitor.layouts import find_layout
from sedac_monitor.testing import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def warm_torch():
    """One forward of a tiny model before any test. A process's first forward is not always bit-identical to
    the same forward repeated: measured on 2 cores, a tiny Llama's first attention differed from every later
    one in about 1 of 4 processes (rows of one sequence, up to 5e-3), so a test whose reference was the
    process's first forward failed at random. After one small forward of any model every repeat agreed
    (14 of 14 processes)."""
    with torch.no_grad():
        tiny_model("qwen2")(input_ids=torch.arange(3, 11).unsqueeze(0))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folders of tiny random Llama and Qwen2 models (with a byte tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    for family in ("llama", "qwen2"):
        tiny_model(family, root / family)
    return root


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def assets():
    """The real assets built by `sedac-bench assets` (nox sets SEDAC_ASSETS); missing assets fail, not skip."""
    value = os.environ.get("SEDAC_ASSETS")
    assert value, "SEDAC_ASSETS is not set: run the suite through `nox -s tests`, which builds the real assets"
    root = Path(value)
    assert (root / "manifest.json").is_file(), f"no SEDAC assets at {root}; run `sedac-bench assets --cache {root}`"
    return root


def assert_no_import_cycle(package) -> dict:
    """Each module's imports of its siblings (at the top or inside a function) form no cycle, so every job
    can be read, and imported, on its own. Returns the edges (module -> siblings it imports)."""
    import ast

    folder = Path(package.__file__).parent
    names = {p.stem for p in folder.glob("*.py")}
    own = package.__name__ + "."
    edges = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(own):
                deps.add(node.module[len(own):])
        edges[path.stem] = {d.split(".")[0] for d in deps} & names - {path.stem}

    def visit(name, stack):
        assert name not in stack, "import cycle: " + " -> ".join([*stack, name])
        for dep in sorted(edges[name]):
            visit(dep, [*stack, name])

    for name in sorted(edges):
        visit(name, [])
    return edges


def record_sims(model, x):
    """Every layer's similarity S_l for every token of ``x`` (the model unchanged), [tokens, layers]."""
    layout = find_layout(model)
    rec = RecordingDecider(layout.num_layers)
    att = HFAttachment(layout, SkipRuntime(rec, layout.num_layers))
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        att.detach()
    return torch.stack(rec.sims, 1)


def tau_in_a_gap(sims, quantile=0.5):
    """A tau near the given quantile of the similarities but far (relatively) from every observed value,
    so float noise between batched and single runs cannot flip a decision."""
    v = np.sort(sims.flatten().numpy())
    centre = np.quantile(v, quantile)
    gaps = np.diff(v)
    near = np.abs((v[:-1] + v[1:]) / 2 - centre)
    score = gaps / (1 + 20 * near)
    i = int(np.argmax(score))
    return float((v[i] + v[i + 1]) / 2)
