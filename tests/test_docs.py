"""The API reference in docs/api/ lists every public name, and only those.

A module's public names are its `__all__` where it has one; otherwise every
name not starting with `_` that is not a module and whose object is defined
in keras-sam's public modules (helpers imported from private modules such as
`keras_sam._validation` or `keras_sam.backend` are not public).
"""

import importlib
import os
import re
import types

import pytest

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
MODULES = [
    "keras_sam",
    "keras_sam.optimizers",
    "keras_sam.schedules",
    "keras_sam.callbacks",
    "keras_sam.sharpness",
    "keras_sam.manifolds",
    "keras_sam.layers",
    "keras_sam.optimum_shift",
    "keras_sam.tuning",
]


def _is_public_home(module_name):
    parts = module_name.split(".")
    return (
        parts[0] == "keras_sam"
        and not any(p.startswith("_") for p in parts)
        and "backend" not in parts
    )


def public_names(module_name):
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return set(module.__all__)
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        home = getattr(value, "__module__", None) or ""
        if _is_public_home(home):
            names.add(name)
    return names


def documented():
    found = {}
    api = os.path.join(DOCS, "api")
    for filename in sorted(os.listdir(api)):
        with open(os.path.join(api, filename)) as f:
            for ident in re.findall(r"^::: *([\w.]+)", f.read(), re.M):
                module, _, name = ident.rpartition(".")
                found.setdefault(module, set()).add(name)
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_api_reference_matches_public_names(module_name):
    if module_name == "keras_sam.tuning":
        pytest.importorskip("keras_tuner")
    expected = public_names(module_name)
    listed = documented().get(module_name, set())
    assert not expected - listed, (
        f"public names of {module_name} missing from docs/api/: "
        f"{sorted(expected - listed)}"
    )
    assert not listed - expected, (
        f"docs/api/ lists names {module_name} does not export: "
        f"{sorted(listed - expected)}"
    )


def test_every_api_page_is_in_the_nav():
    with open(os.path.join(DOCS, "..", "mkdocs.yml")) as f:
        nav = f.read()
    for filename in os.listdir(os.path.join(DOCS, "api")):
        assert f"api/{filename}" in nav, filename
