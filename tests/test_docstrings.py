"""The `>>>` examples in keras-sam's public docstrings run.

Collected at test time from the imported package (every public name of the
modules in tests/test_docs.py, and the public methods of public classes),
run with `doctest` in a namespace holding `keras`, `keras_sam` and `np`.

Keras-style examples often show no output and end where the reader fills in
their own data, so the runner is lenient where that is intended:

- an example with no expected output passes whatever it prints or returns;
  one with output lines is checked (ellipsis and whitespace normalized);
- the reader's own objects an example uses without defining (`x`, `y`,
  `x_val`, `model`, `build_model`, ...) are given, small (`_readers_objects`);
  an example that needs one not given (a finished `tuner`) is reported as
  skipped, with the name, not as failed. Any other exception fails the
  test.
"""

import doctest
import inspect
import tempfile

import keras
import numpy as np
import pytest

import keras_sam
from tests.test_docs import MODULES
from tests.test_docs import public_names


class _LenientChecker(doctest.OutputChecker):
    def check_output(self, want, got, optionflags):
        if not want.strip():
            return True
        return super().check_output(want, got, optionflags)


class _Placeholder(Exception):
    pass


class _Runner(doctest.DocTestRunner):
    """Stops at the first failure; an undefined name means a placeholder."""

    def report_unexpected_exception(self, out, test, example, exc_info):
        error = exc_info[1]
        if isinstance(error, NameError):
            raise _Placeholder(str(error))
        raise error.with_traceback(exc_info[2])

    def report_failure(self, out, test, example, got):
        raise AssertionError(
            f"{test.name}, line {example.lineno}:\n{example.source}"
            f"expected:\n{example.want}got:\n{got}"
        )


def _objects():
    import importlib

    seen = set()
    found = []
    for module_name in MODULES:
        if module_name == "keras_sam.tuning":
            try:
                import keras_tuner  # noqa: F401
            except ImportError:
                continue
        module = importlib.import_module(module_name)
        for name in sorted(public_names(module_name)):
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append((f"{module_name}.{name}", obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if callable(member) or isinstance(member, property):
                        found.append((f"{module_name}.{name}.{attr}", member))
    return found


def _examples():
    parser = doctest.DocTestParser()
    cases = []
    for qualname, obj in _objects():
        doc = (
            inspect.getdoc(obj)
            if not isinstance(obj, property)
            else (obj.__doc__)
        )
        if not doc or ">>>" not in doc:
            continue
        test = parser.get_doctest(doc, {}, qualname, None, 0)
        if test.examples:
            cases.append(pytest.param(test, id=qualname))
    return cases


def _readers_objects():
    """What the examples take as the reader's own: small data of 64
    features and 10 classes, a compiled model and a model builder."""
    rng = np.random.default_rng(0)

    def data(n):
        return (
            rng.normal(size=(n, 64)).astype("float32"),
            rng.integers(0, 10, size=(n,)),
        )

    def build_model():
        return keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    model = build_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    objects = {"build_model": build_model, "base": build_model()}
    objects["model"] = model
    for name in ("", "_train", "_val", "_probe"):
        objects["x" + name], objects["y" + name] = data(64 if name else 128)
    objects["w"] = np.ones((3, 2), "float32")
    objects["u"] = np.full((3, 2), 0.5, "float32")
    try:
        import keras_tuner

        objects["keras_tuner"] = keras_tuner
    except ImportError:
        pass
    return objects


@pytest.mark.parametrize("test", _examples())
def test_docstring_example_runs(test, monkeypatch):
    globs = {"keras": keras, "keras_sam": keras_sam, "np": np}
    globs.update(_readers_objects())
    test.globs = globs
    runner = _Runner(
        checker=_LenientChecker(),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.chdir(tmp)  # examples that save files write here
        try:
            runner.run(test, out=lambda s: None, clear_globs=False)
        except _Placeholder as error:
            pytest.skip(f"uses a placeholder for the reader's data: {error}")
