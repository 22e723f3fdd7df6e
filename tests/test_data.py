"""`keras_sam._data`: user data -> batches (sharpness, optimum shifting,
the learned radius)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_sam import _data


def _arrays(n=10, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


class _Sequence(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, i):
        s = slice(i * self.size, (i + 1) * self.size)
        return self.x[s], self.y[s]


# ---------------------------------------------------------------------------
# Helpers.


def test_unpack():
    x, y = _arrays()
    assert _data.unpack(x)[1:] == (None, None)
    assert _data.unpack((x,))[1:] == (None, None)
    assert _data.unpack([x, y])[1] is y
    assert _data.unpack((x, y, x))[2] is x
    with pytest.raises(ValueError, match="tuple of 4 elements"):
        _data.unpack((x, y, x, y))


def test_num_samples_and_slicing():
    x, y = _arrays(7)
    assert _data.num_samples(x) == 7
    assert _data.num_samples({"a": None, "b": x}) == 7
    assert _data.num_samples(None) == 0
    part = _data.slice_samples({"a": x, "b": y}, 2, 5)
    np.testing.assert_array_equal(part["a"], x[2:5])
    np.testing.assert_array_equal(part["b"], y[2:5])
    assert _data.slice_samples(None, 0, 1) is None
    taken = _data.take_samples((x, y), np.array([0, 6]))
    np.testing.assert_array_equal(taken[1], y[[0, 6]])
    assert _data.take_samples(None, [0]) is None


def test_conversions():
    x, _ = _arrays()
    assert _data.to_numpy(None) is None
    assert _data.to_tensor(None) is None
    tensor = _data.to_tensor(x)
    assert ops.is_tensor(tensor)
    assert _data.to_tensor(tensor) is tensor
    np.testing.assert_array_equal(_data.to_numpy(tensor), x)
    assert isinstance(_data.to_numpy([1.0, 2.0]), np.ndarray)


# ---------------------------------------------------------------------------
# as_batches: read once, tensors.


def test_as_batches_cuts_arrays_and_reads_iterables():
    x, y = _arrays(10)
    w = np.ones(10, "float32")
    batches = _data.as_batches((x, y, w), batch_size=4)
    assert [n for n, _, _, _ in batches] == [4, 4, 2]
    n, xb, yb, wb = batches[-1]
    assert ops.is_tensor(xb) and ops.is_tensor(yb) and ops.is_tensor(wb)
    np.testing.assert_array_equal(ops.convert_to_numpy(xb), x[8:])
    # x alone, one batch; the targets are None.
    ((n, xb, yb, wb),) = _data.as_batches(x)
    assert n == 10 and yb is None and wb is None
    # A list, a generator (at most `steps` batches), a PyDataset.
    pairs = [(x[:6], y[:6]), [x[6:], y[6:]]]
    assert [b[0] for b in _data.as_batches(pairs)] == [6, 4]
    generator = (p for p in pairs)
    assert [b[0] for b in _data.as_batches(generator, steps=1)] == [6]
    sequence = _Sequence(x, y, 3)
    assert [b[0] for b in _data.as_batches(sequence)] == [3, 3, 3, 1]


def test_as_batches_drops_empty_batches_and_refuses_no_data():
    x, y = _arrays(4)
    batches = _data.as_batches([(x[:0], y[:0]), (x, y)])
    assert [b[0] for b in batches] == [4]
    for data in ((x[:0], y[:0]), [], iter([])):
        with pytest.raises(ValueError, match="`data` is empty"):
            _data.as_batches(data)
    with pytest.raises(ValueError, match="data=None"):
        _data.as_batches(None)
    with pytest.raises(TypeError, match="of type int"):
        _data.as_batches(3)


# ---------------------------------------------------------------------------
# Batches: re-iterable, numpy.


def test_batches_are_re_iterable_numpy():
    x, y = _arrays(10)
    batches = _data.Batches((x, ops.convert_to_tensor(y)), 4)
    assert batches.kind == "arrays" and batches.size == 10
    first = [b[0].shape[0] for b in batches]
    second = [b[0].shape[0] for b in batches]
    assert first == second == [4, 4, 2]
    last = list(batches)[-1]
    assert isinstance(last[1], np.ndarray) and last[2] is None
    np.testing.assert_array_equal(last[1], y[8:])
    # Dicts, lists of batches and PyDatasets.
    assert _data.Batches({"a": x}, 4).kind == "arrays"
    listed = _data.Batches([x[:5], x[5:]], 128)
    assert listed.kind == "iterable"
    assert [b[0].shape[0] for b in listed] == [5, 5]
    sequence = _data.Batches(_Sequence(x, y, 6), 128)
    assert sequence.kind == "pydataset"
    assert [b[1].shape[0] for b in sequence] == [6, 4]


def test_batches_refuse_bad_data():
    x, y = _arrays(10)
    with pytest.raises(TypeError, match="re-iterable"):
        _data.Batches((b for b in [x]), 4)
    with pytest.raises(ValueError, match=r"same number of samples.*\[9, 10\]"):
        _data.Batches((x, y[:9]), 4)
    with pytest.raises(ValueError, match="`data` is empty"):
        _data.Batches(x[:0], 4)
    with pytest.raises(TypeError, match="of type str"):
        _data.Batches("x", 4)


# ---------------------------------------------------------------------------
# validation_arrays: one set of floatx arrays.


def test_validation_arrays_joins_batches_in_floatx():
    x, y = _arrays(6)
    labels = np.arange(6)
    (xv, yv, wv), n = _data.validation_arrays((x.astype("float64"), labels))
    assert n == 6 and wv is None
    assert xv.dtype == keras.config.floatx()
    assert yv.dtype == labels.dtype  # integers are kept
    batches = [(x[:4], y[:4], np.ones(4)), (x[4:], y[4:], np.ones(2))]
    (xv, yv, wv), n = _data.validation_arrays(iter(batches))
    assert n == 6
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(wv, np.ones(6))
    (xv, _, _), n = _data.validation_arrays([x, ops.convert_to_tensor(y)])
    assert n == 6 and isinstance(xv, np.ndarray)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (None, ValueError, "validation_data=None"),
        ((np.zeros((0, 4)), np.zeros((0, 1))), ValueError, "0 samples"),
        (
            (np.zeros((10, 4)), np.zeros((9, 1))),
            ValueError,
            "x with 10 samples, y with 9 samples",
        ),
        (
            (np.zeros((10, 4)), np.zeros((10, 1)), np.ones(8)),
            ValueError,
            "sample_weight with 8 samples",
        ),
        (
            ({"a": np.zeros((5, 2)), "b": np.zeros((6, 2))}, np.zeros(5)),
            ValueError,
            "different numbers of samples",
        ),
        ((np.zeros(()), np.zeros(())), ValueError, "leading sample axis"),
        ((np.zeros((4, 4)),), ValueError, "length 1"),
        ((None, np.zeros(4)), ValueError, "x=None, y=given"),
        (np.zeros((4, 4)), TypeError, "ndarray"),
        ({"x": np.zeros(4)}, TypeError, "dict"),
        ([], ValueError, "length 0"),
        (iter([]), ValueError, "0 batches"),
        (iter([np.zeros(3)]), ValueError, "validation_data batch=ndarray"),
        (
            iter([(np.zeros((2, 3)), np.zeros(2)), (np.zeros((2, 4)), [0, 1])]),
            ValueError,
            "mismatched",
        ),
    ],
)
def test_validation_arrays_bad_input(data, error, match):
    with pytest.raises(error, match=match):
        _data.validation_arrays(data)
