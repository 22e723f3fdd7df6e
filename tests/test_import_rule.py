"""House rules checked on the source: who may import what."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_sam"
FRAMEWORKS = {"tensorflow", "jax", "jaxlib", "torch"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imported_names(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno


@pytest.mark.parametrize(
    "path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_frameworks_are_imported_only_in_backend(path):
    in_backend = path.relative_to(PACKAGE).parts[0] == "backend"
    for name, line in _imported_names(path):
        root = name.split(".")[0]
        if root in FRAMEWORKS:
            assert in_backend, f"{path.name}:{line} imports {name}"
        assert not name.startswith(
            "keras.src"
        ), f"{path.name}:{line} imports private {name}"


@pytest.mark.parametrize(
    "path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_only_backend_branches_on_the_backend(path):
    if path.relative_to(PACKAGE).parts[0] == "backend":
        return
    source = path.read_text()
    assert "backend.backend()" not in source, path.name
    assert "keras.src" not in source, path.name


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom torch import nn\n")
    assert ("torch", 2) in list(_imported_names(bad))
