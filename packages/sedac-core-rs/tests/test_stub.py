"""The hand-written _native.pyi must describe the compiled module: same public
names, same parameter names in the same order; and the numpy backend must offer
the same kernels with the same parameters."""

import ast
import inspect
from pathlib import Path

import pytest

import sedac_core
from sedac_core import _native, _numpy

STUB = Path(sedac_core.__file__).with_name("_native.pyi")


def stub_signatures():
    tree = ast.parse(STUB.read_text())
    funcs, classes, names = {}, {}, set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {
                item.name: [a.arg for a in item.args.args][1:]
                for item in node.body if isinstance(item, ast.FunctionDef)
            }
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return funcs, classes, names


def public(module):
    return {n for n in dir(module) if not n.startswith("_")} | {"__version__"}


def test_stub_is_installed_with_the_package():
    assert STUB.is_file()


def test_stub_names_match_the_module():
    funcs, classes, names = stub_signatures()
    assert set(funcs) | set(classes) | names == public(_native)


@pytest.mark.parametrize("name", sorted(stub_signatures()[0]))
def test_function_parameters_match(name):
    stub = stub_signatures()[0][name]
    assert list(inspect.signature(getattr(_native, name)).parameters) == stub
    assert list(inspect.signature(getattr(_numpy, name)).parameters) == stub


def test_class_methods_match():
    _, classes, _ = stub_signatures()
    for cls_name, methods in classes.items():
        for backend in (_native, _numpy):
            cls = getattr(backend, cls_name)
            for method, params in methods.items():
                if method == "observations":  # property
                    static = inspect.getattr_static(cls, "observations")
                    assert isinstance(static, (property, type(_native.ThresholdState.observations)))
                    continue
                sig = inspect.signature(cls if method == "__init__" else getattr(cls, method))
                got = [p for p in sig.parameters if p != "self"]
                assert got == params, (backend.__name__, cls_name, method)
