"""One Engine called from many threads gives exactly the outputs of the same calls run one after
another: ONNX Runtime sessions run concurrently, the torch backend serialises its graph calls."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from prism_rt import ControlConfig, Engine, OrtOptions

ENGINE = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"
IMAGES = sorted(p for p in (ENGINE / "images").glob("phantom-*.png") if "_" not in p.stem)
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGETS = ("Chest X-ray showing No Finding", "Chest X-ray showing Cardiomegaly, Support Devices",
           "Chest X-ray showing Pleural Effusion, Support Devices")


def _jobs(threads: int, edits: int, images) -> list[tuple]:
    """(image, target, self_replace, cross_replace) per call, all different."""
    return [(images[(t + e) % len(images)], TARGETS[(t * edits + e) % len(TARGETS)], (0.5,), 0.6 + 0.05 * ((t + e) % 4))
            for t in range(threads) for e in range(edits)]


def _edit(engine: Engine, job, steps: int) -> list[np.ndarray]:
    image, target, self_replace, cross_replace = job
    inversion = engine.invert(image, SOURCE, method="direct", sampler=engine.sampler(steps=steps))
    result = engine.edit(inversion, [target], ControlConfig(self_replace=self_replace, cross_replace=cross_replace))
    return [result.reconstruction, *result.edits]


def _serial_and_threaded(engine: Engine, jobs: list, threads: int, steps: int):
    serial = [_edit(engine, job, steps) for job in jobs]
    per_thread = len(jobs) // threads

    def worker(t):
        return [_edit(engine, job, steps) for job in jobs[t * per_thread:(t + 1) * per_thread]]

    with ThreadPoolExecutor(threads) as pool:
        threaded = [out for outs in pool.map(worker, range(threads)) for out in outs]
    return serial, threaded


def _assert_same(serial, threaded):
    assert len(serial) == len(threaded)
    for k, (a, b) in enumerate(zip(serial, threaded)):
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), f"call {k}: threaded outputs differ from serial"


def test_eight_threads_on_one_onnxruntime_engine_equal_a_serial_run():
    assert len(IMAGES) >= 3, f"engines/phantom-demo/images has {len(IMAGES)} patients"
    engine = Engine.from_dir(ENGINE, options=OrtOptions(threads=1))
    serial, threaded = _serial_and_threaded(engine, _jobs(8, 3, IMAGES), threads=8, steps=3)
    _assert_same(serial, threaded)


def test_four_threads_on_one_torch_engine_equal_a_serial_run(tiny_model_dir):
    pytest.importorskip("torch")
    engine = Engine.load(tiny_model_dir, backend="torch", threads=1)
    rng = np.random.default_rng(0)
    images = [np.clip(0.5 + 0.15 * rng.standard_normal((40 + 8 * k, 48)), 0, 1).astype(np.float32) for k in range(3)]

    serial, threaded = _serial_and_threaded(engine, _jobs(4, 2, images), threads=4, steps=3)
    _assert_same(serial, threaded)
