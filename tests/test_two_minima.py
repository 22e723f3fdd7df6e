"""`examples/two_minima.py`: SAM leaves the sharp minimum, SGD stays in it.

Both runs start inside the sharp pit and take the same SGD steps; only the
SAM run is thrown out (its stability condition `lr * lam * (1 + rho * lam)
< 2` fails there while SGD's `lr * lam < 2` holds) and settles in the wide
well. Checked against the same steps written in numpy.
"""

import importlib.util
import os

import numpy as np

EXAMPLE = os.path.join(
    os.path.dirname(__file__), "..", "examples", "two_minima.py"
)


def _load():
    spec = importlib.util.spec_from_file_location("two_minima", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numpy_grad(ex, w):
    d = w - np.array(ex.FLAT_CENTER)
    s2 = ex.FLAT_WIDTH**2
    g = ex.FLAT_DEPTH * np.exp(-(d @ d) / (2 * s2)) * d / s2
    c = w - np.array(ex.SHARP_CENTER)
    if c @ c < ex.SHARP_RADIUS**2:
        g = g + ex.SHARP_DEPTH * 2 * c / ex.SHARP_RADIUS**2
    return g


def _numpy_path(ex, steps, lr, rho):
    w = np.array(ex.START, "float64")
    for _ in range(steps):
        g = _numpy_grad(ex, w)
        if rho:
            g = _numpy_grad(ex, w + rho * g)  # ascend to w + eps, unnormalized
        w = w - lr * g
    return w


def test_sam_ends_flat_and_sgd_ends_sharp():
    ex = _load()
    paths = ex.run(steps=150, lr=0.15, rho=0.1)
    sgd, sam = paths["SGD"][-1], paths["SAM"][-1]
    assert ex.basin(sgd) == "sharp", sgd
    assert ex.basin(sam) == "flat", sam
    np.testing.assert_allclose(sgd, ex.SHARP_CENTER, atol=0.05)
    np.testing.assert_allclose(sam, ex.FLAT_CENTER, atol=0.05)
    # The same steps in numpy end at the same points.
    np.testing.assert_allclose(sgd, _numpy_path(ex, 150, 0.15, 0), atol=1e-3)
    np.testing.assert_allclose(sam, _numpy_path(ex, 150, 0.15, 0.1), atol=1e-3)
