"""Smoke tests of the benchmark scripts, so that they cannot rot.

Runs both scripts' `main` on tiny settings and checks the CIFAR-10 loader of
`benchmarks/accuracy.py` on tensorflow-datasets' mock data (no download).
"""

import concurrent.futures
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import script_smoke_on

ROOT = os.path.join(os.path.dirname(__file__), "..")
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _load(name):
    path = os.path.join(BENCHMARKS, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@script_smoke_on("tensorflow")
def test_step_time_main_tiny(tmp_path):
    step_time = _load("step_time")
    out = tmp_path / "step_time.json"
    report = step_time.main(
        [
            "--model",
            "tiny",
            "--batch-size",
            "4",
            "--steps",
            "5",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    methods = [r["method"] for r in report["results"]]
    assert methods == list(step_time.method_table())
    assert methods[:3] == ["plain", "sam", "asam"]
    for r in report["results"]:
        assert r["median_step_s"] > 0 and np.isfinite(r["ratio"])
        assert r["steps"] == 5
    plain = report["results"][0]
    assert plain["ratio"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["markdown"] == report["markdown"]
    assert "| tiny | sam |" in report["markdown"]


@script_smoke_on("jax")
def test_step_time_memory_on_jax(tmp_path):
    # XLA's memory analysis of each compiled step: available on CPU too.
    step_time = _load("step_time")
    report = step_time.main(
        ["--model", "tiny", "--batch-size", "4", "--steps", "2"]
        + ["--warmup", "1", "--methods", "sam", "--out", str(tmp_path / "s")]
    )
    plain, sam = report["results"]
    assert plain["memory_bytes"] > plain["weights_bytes"]
    assert sam["memory_bytes"] > plain["memory_bytes"]
    assert 0.0 < sam["extra_memory_over_weights"] < 4.0


def test_step_time_sam_every_window():
    step_time = _load("step_time")
    assert step_time.method_table()["sam_every5"][0] == 5


@script_smoke_on("tensorflow")
def test_accuracy_main_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    accuracy = _load("accuracy")
    report = accuracy.main(
        ["--quick", "--noise", "0.2", "--out", str(tmp_path)]
    )
    methods = list(accuracy.method_table())
    assert [r["method"] for r in report["runs"]] == methods
    for r in report["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0
    for name in ("accuracy.md", "accuracy.json", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| sam |" in (tmp_path / "accuracy.md").read_text()


def test_label_noise_is_symmetric():
    accuracy = _load("accuracy")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 20000).astype("int32")
    noisy = accuracy.add_label_noise(y, 0.4, 10, rng)
    flipped = noisy != y
    assert abs(flipped.mean() - 0.4) < 0.02
    # Flipped labels are spread evenly over the other classes.
    counts = np.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 0.8 * counts[1:].mean()
    assert np.array_equal(accuracy.add_label_noise(y, 0.0, 10, rng), y)


def test_cifar10_loader_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    accuracy = _load("accuracy")
    with tfds.testing.mock_data(
        num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        (x_train, y_train), (x_test, y_test) = accuracy.load_cifar10()
        train, val, test = accuracy.make_splits("cifar10", 0.4, seed=0)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.shape == (20,) and y.dtype == np.int32
        assert 0 <= y.min() and y.max() < 10
    assert len(train[0]) == 18 and len(val[0]) == 2
    assert np.array_equal(test[1], y_test)


@script_smoke_on("torch")
def test_equal_compute_main_tiny(tmp_path):
    equal_compute = _load("equal_compute")
    report = equal_compute.main(
        ["--quick", "--methods", "sam_every5,msam", "--out", str(tmp_path)]
    )
    summary = report["summary"]
    assert list(summary) == ["plain", "sam", "sam_every5", "msam", "plain_long"]
    assert summary["plain"]["cost"] == 1.0
    assert summary["sam"]["sam_fraction"] == 1.0
    assert summary["msam"]["sam_fraction"] == 0.0
    assert 0.0 < summary["sam_every5"]["sam_fraction"] < 0.3
    for name in ("equal_compute.json", "equal_compute.md", "equal_compute.png"):
        assert (tmp_path / name).exists()
    assert report["conclusion"]


@script_smoke_on("torch")
def test_sampa_accuracy_main_quick(tmp_path):
    sampa_accuracy = _load("sampa_accuracy")
    report = sampa_accuracy.main(["--quick", "--out", str(tmp_path)])
    assert report["picked_rho"] == {
        "sam": 0.1,
        "sampa": 0.1,
        "sampa_current": 0.1,
    }
    assert set(report["results"]) == {"plain", "sam", "sampa", "sampa_current"}
    for row in report["results"].values():
        for scores in row.values():
            assert all(0.0 <= a <= 1.0 for a in scores["test"])
    assert (tmp_path / "sampa_accuracy.md").exists()


@script_smoke_on("jax")
def test_which_sam_smoke_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    which_sam = _load("which_sam")
    argv = ["--smoke", "--methods", "plain,sam_every5,wsam"]
    data = which_sam.main(argv + ["--out", str(tmp_path)])
    picks = data["picks"]
    assert {"digits|0.2|plain", "digits|0.2|sam_every5"} <= set(picks)
    assert len(picks["digits|0.2|plain"]["runs"]) == 2
    assert picks["digits|0.2|plain"]["runs"][0]["passes"] == 1.0
    assert 1.0 < picks["digits|0.2|sam_every5"]["runs"][0]["passes"] < 1.3
    for name in ("which_sam.json", "which_sam.md", "which_sam_digits.png"):
        assert (tmp_path / name).exists()
    # Resumable: a second call finds every run in the JSON.
    monkeypatch.setattr(
        which_sam, "train", lambda *a, **k: pytest.fail("ran again")
    )
    again = which_sam.main(argv + ["--out", str(tmp_path)])
    assert again["runs"] == data["runs"]
    # The cost comes from the timing stage (one run at a time), plain first.
    assert list(data["timing"]) == [
        f"digits|{m}|3" for m in ("plain", "sam_every5", "wsam")
    ]


def _fake_train(task, method, rho, knob, noise, seed, epochs, lr=None):
    """Validation accuracy peaks at rho 0.25 (beyond the grid's edge) and
    knob 0.3; test accuracy depends on every argument."""
    time.sleep(0.002 * (seed % 3))  # finish out of order
    val = -abs(np.log(rho / 0.25)) if rho else 0.0
    val -= 0.0 if knob is None else abs(knob - 0.3)
    test = (hash((task, method, rho, knob, noise, seed)) % 1000) / 1000
    return {
        "val_accuracy": float(val),
        "test_accuracy": test,
        "passes": 1.0,
        "epoch_seconds": 0.0,
        "final_rho": rho,
        "final_loss": 0.0,
    }


@pytest.mark.parametrize("workers", [1, 3])
def test_which_sam_workers_schedule_like_one_process(workers, monkeypatch):
    # The scheduling of `--workers` (threads stand in for the processes):
    # the same runs and picks as one run at a time, edge extensions too.
    which_sam = _load("which_sam")
    monkeypatch.setattr(which_sam, "train", _fake_train)
    args = which_sam.parse_args(["--seeds", "3", "--noise", "0,0.2"])
    args.methods = ["plain", "sam", "looksam", "random"]
    chains, stores = {}, {}
    for n in (1, workers):
        store = which_sam.Store(os.devnull + "_absent", {})
        store.save = lambda: None
        chains[n] = [
            which_sam.method_chain(store, "digits", m, noise, 2, args)
            for noise in args.noise
            for m in args.methods
        ]
        executor = None
        if n > 1:
            executor = concurrent.futures.ThreadPoolExecutor(n)
        which_sam.pool.drive(
            chains[n], store, n, executor=executor, train=_fake_train
        )
        stores[n] = store.data
    one, many = stores[1], stores[workers]
    assert one["runs"] == many["runs"]
    assert sorted(one["picks"]) == sorted(many["picks"])
    assert all(one["picks"][k] == many["picks"][k] for k in one["picks"])
    picks = one["picks"]
    assert picks["digits|0.2|sam"]["rho"] == 0.25  # 0.1 extended once
    assert picks["digits|0.2|looksam"]["knob"] == 0.3
    assert picks["digits|0.2|random"]["knob"] == 0.3
    assert len(picks["digits|0|plain"]["runs"]) == 3


def test_which_sam_mnist1d_networks_are_the_papers():
    setup = _load("which_sam_setup")
    # ConvBase of the MNIST-1D code: 3 Conv1d of 25 channels (5, 3, 3;
    # stride 2, padding 1), Linear(125, 10); MLPBase: 40-100-100-10.
    cnn = setup.mnist1d_cnn()
    assert cnn.layers[-2].output.shape[-1] == 125
    assert cnn.count_params() == 150 + 1900 + 1900 + 1260
    assert setup.mnist1d_mlp().count_params() == 4100 + 10100 + 1010


def _run_script(*argv):
    """A script in a child process with this backend and this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.abspath(ROOT), env.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@script_smoke_on("torch")
def test_transformer_small_lora_smoke(tmp_path):
    pytest.importorskip("keras_hub", exc_type=ImportError)
    out = tmp_path / "transformer.json"
    _run_script(
        os.path.join(BENCHMARKS, "transformer.py"),
        *("--size", "small", "--methods", "plain_lora,sam_lora"),
        *("--steps", "25", "--warmup", "5", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["config"]["steps"] == 25
    plain, sam = (report["results"][m] for m in ("plain_lora", "sam_lora"))
    for r in (plain, sam):
        assert "error" not in r, r
        # only the LoRA factors and the biases of their layers train
        assert 0 < r["trainable"] < r["weights"] / 10
        assert r["timed_steps"] == 5 and r["step_ms_mean"] > 0
        assert isinstance(r["step_ms_async"], float)
        assert np.isfinite(r["val_loss"]) and r["val_loss"] < np.log(260)
    assert plain["trainable"] == sam["trainable"]
    assert plain["ratio"] == 1.0 and sam["ratio"] > 1.0


def test_transformer_bisect_search(monkeypatch):
    """The search from a guess: outward in doubling steps, then bisection;
    its answer is the largest rung that fits, whatever the guess."""
    transformer = _load("transformer")
    largest = 13
    probed = []

    def fake_child(method, args, extra=()):
        hidden = int(extra[extra.index("--hidden") + 1])
        rung = (hidden - 768) // 128
        probed.append(rung)
        if rung > largest:
            return {"method": method, "oom": True, "error": "oom"}
        return {"method": method}

    monkeypatch.setattr(transformer, "child", fake_child)

    class Args:
        max_rung, probe_steps, ladder_depth = 40, 2, 24

    for guess in (13, 14, 12, 0, 40):
        probed.clear()
        Args.guess = str(guess)
        found = transformer.bisect(Args, ["plain"])["plain"]
        assert found["largest_rung"] == largest, (guess, probed)
        assert found["config"] == {"layers": 24, "hidden": 2432, "heads": 38}
        # two probes from a right guess, about 2 log2(distance) more else
        distance = abs(guess - largest) + 1
        assert len(probed) <= 2 + 2 * math.ceil(math.log2(distance)) + 1
        assert len(probed) == len(set(probed))  # no rung probed twice
    probed.clear()
    Args.guess = "13"
    transformer.bisect(Args, ["plain"])
    assert probed == [13, 14]
    Args.guess, Args.max_rung = "0", 10  # everything fits up to the top
    assert transformer.bisect(Args, ["plain"])["plain"]["largest_rung"] == 10
    assert transformer.ladder(4) == {"layers": 24, "hidden": 1024, "heads": 16}


@script_smoke_on("torch")
def test_lm_lora_sam_example_smoke():
    pytest.importorskip("keras_hub", exc_type=ImportError)
    out = _run_script(
        os.path.join(ROOT, "examples", "lm_lora_sam.py"),
        *("--pretrain-steps", "20", "--steps", "10", "--seq", "32"),
    )
    losses = {
        name: (float(before), float(after))
        for name, before, after in re.findall(
            r"(plain|sam) \+ LoRA .*validation loss ([\d.]+) -> ([\d.]+)",
            out,
        )
    }
    assert set(losses) == {"plain", "sam"}, out
    assert losses["plain"][0] == losses["sam"][0]  # from the same weights
    for before, after in losses.values():
        assert np.isfinite(after) and after < np.log(257)
