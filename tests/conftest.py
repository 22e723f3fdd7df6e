"""Shared fixtures: seeds, execution modes, the current backend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# Execution modes of `compile`: eager, graph (traced, no XLA) and XLA jit.
# On torch, "graph" is Keras' default non-eager loop and "jit" is
# torch.compile, which Keras runs through dynamo.
MODES = {
    "eager": {"run_eagerly": True, "jit_compile": False},
    "graph": {"run_eagerly": False, "jit_compile": False},
    "jit": {"run_eagerly": False, "jit_compile": True},
}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.backend.clear_session()


# The modes that are distinct code paths on each backend: on JAX and torch,
# Keras runs the step without compilation whenever `jit_compile=False`, so
# "graph" is "eager" again there. torch.compile (torch's "jit") is not a
# supported mode on CPU here.
DISTINCT_MODES = {
    "tensorflow": ("eager", "graph", "jit"),
    "jax": ("eager", "jit"),
    "torch": ("eager",),
}


@pytest.fixture(params=list(MODES))
def mode(request):
    """Keyword arguments for `compile` selecting the execution mode."""
    if request.param not in DISTINCT_MODES[BACKEND]:
        pytest.skip(
            f"'{request.param}' is not a distinct execution mode on {BACKEND}"
        )
    return dict(MODES[request.param])


def backend_name():
    return BACKEND


def script_smoke_on(backend):
    """Runs a benchmark or example script's smoke test on `backend` only.

    The scripts are written in `keras.ops` on top of keras_sam, whose every
    code path the other tests run on every backend; running each script's
    minutes-long smoke test three times would only repeat that work (and
    keep CI over its time). Each script is still exercised end to end on
    one backend.
    """
    return pytest.mark.skipif(
        BACKEND != backend,
        reason=f"script smoke test: run on {backend} only (conftest)",
    )
