"""The C ABI (bindings/c) from a C++ host (examples/cpp) and a plain-C one: the counterfactuals
equal the Python API's bit for bit, from one thread and two, and errors come back as a status and
one line."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prism_rt import ControlConfig, Engine, OrtOptions
from prism_rt.imageio import to_uint

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engines" / "phantom-demo"
IMAGE = ENGINE / "images" / "phantom-1000003.png"
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"
VENV = Path(sys.prefix)  # the venv running the tests: the host embeds it

C_HOST = r"""
#include <prism_rt.h>
#include <stdio.h>
#include <stdlib.h>

/* argv: venv engine pixels.u16 height width out.u16 */
int main(int argc, char** argv) {
    const char* targets[] = {"Chest X-ray showing No Finding"};
    const char* source = "Chest X-ray showing No Finding, Support Devices";
    prism_result* result = NULL;
    int height = atoi(argv[4]), width = atoi(argv[5]), h = 0, w = 0, status;
    uint16_t* pixels = malloc(sizeof(uint16_t) * height * width);
    FILE* file = fopen(argv[3], "rb");
    if (argc != 7 || fread(pixels, sizeof(uint16_t), height * width, file) != (size_t)(height * width)) return 9;
    fclose(file);
    /* prism_last_error() only after the call: its text changes with each call of this thread */
    status = prism_engine_load(argv[2], NULL) == NULL;
    printf("before init: %d|%s\n", status, prism_last_error());
    if (prism_init(argv[1]) != PRISM_OK) { printf("init: %s\n", prism_last_error()); return 1; }
    status = prism_engine_load(argv[2], "{\"colour\": 1}") == NULL;
    printf("unknown engine key: %d|%s\n", status, prism_last_error());
    prism_engine* engine = prism_engine_load(argv[2], "{\"threads\": 1}");
    status = prism_edit(engine, NULL, pixels, height, width, 16, source, targets, 1, "{\"stepz\": 3}", &result);
    printf("unknown edit key: %d|%s\n", status, prism_last_error());
    status = prism_edit(engine, NULL, pixels, height, width, 12, source, targets, 1, NULL, &result);
    printf("bits: %d|%s\n", status, prism_last_error());
    status = prism_edit(engine, NULL, pixels, height, width, 16, source, targets, 1,
                        "{\"steps\": 3, \"self_replace\": 0.5, \"fit\": \"pad\"}", &result);
    if (status != PRISM_OK) { printf("edit: %s\n", prism_last_error()); return 1; }
    const uint16_t* image = prism_result_image(result, 0, &h, &w);
    printf("result: %d %d %d %d\n", prism_result_count(result), h, w, prism_result_image(result, 1, NULL, NULL) == NULL);
    file = fopen(argv[6], "wb");
    fwrite(image, sizeof(uint16_t), (size_t)height * width, file);
    fclose(file);
    prism_result_free(result);
    prism_engine_free(engine);
    prism_shutdown();
    return 0;
}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the C ABI needs {', '.join(missing)}, not found on PATH")
    pytest.importorskip("pybind11", reason="building the C ABI needs pybind11: pip install 'prism-rt[embed]'")
    folder = tmp_path_factory.mktemp("cpp-build")
    for command in (["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(folder),
                     f"-DPython_EXECUTABLE={sys.executable}"],
                    ["cmake", "--build", str(folder), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return folder


@pytest.fixture(scope="module")
def engine():
    return Engine.from_dir(ENGINE, options=OrtOptions(threads=1))


def _expected(engine: Engine, image, fit: str = "resize") -> np.ndarray:
    inversion = engine.invert(image, SOURCE, method="direct", sampler=engine.sampler(steps=3), fit=fit)
    result = engine.edit(inversion, [TARGET], ControlConfig(self_replace=(0.5,)))
    return to_uint(result.images("input")[0], 16)


def _read_pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, size, top, pixels = data.split(b"\n", 3)  # the host writes one header field a line
    assert (magic, top) == (b"P5", b"65535")
    width, height = size.split()
    return np.frombuffer(pixels, dtype=">u2").reshape(int(height), int(width)).astype(np.uint16)


def test_the_cpp_host_edits_like_the_python_api_from_one_and_two_threads(build, engine, tmp_path):
    done = subprocess.run([str(build / "prism_edit"), "--venv", str(VENV), "--steps", "3", "--self-replace", "0.5",
                           "--threads", "1", "--out", str(tmp_path / "cf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "two threads: both equal the serial edit" in done.stdout
    expected = _expected(engine, IMAGE)
    pgm = _read_pgm(tmp_path / "cf.pgm")
    raw = np.fromfile(tmp_path / "cf.raw", dtype=np.uint16).reshape(expected.shape)
    assert np.array_equal(pgm, expected) and np.array_equal(raw, expected)
    assert '"self_replace": 0.5' in (tmp_path / "cf.json").read_text()


def test_a_bad_engine_path_is_a_status_and_one_line(build, tmp_path):
    done = subprocess.run([str(build / "prism_edit"), "--venv", str(VENV), "--engine", str(tmp_path / "no-engine"),
                           "--steps", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-engine" in lines[0] and "does not exist" in lines[0]


def test_a_c_host_edits_a_pixel_buffer_and_gets_typed_errors(build, engine, tmp_path):
    from PIL import Image

    pixels = np.asarray(Image.open(IMAGE), dtype=np.uint16)[:100, 8:128]  # not square: the pad fit is undone
    (tmp_path / "in.u16").write_bytes(np.ascontiguousarray(pixels).tobytes())
    (tmp_path / "host.c").write_text(C_HOST)
    library = build / "prism_rt_c"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{ROOT / 'bindings' / 'c'}", str(tmp_path / "host.c"),
                    f"-L{library}", "-lprism_rt_c", f"-Wl,-rpath,{library}", "-o", str(tmp_path / "host")], check=True)
    done = subprocess.run([str(tmp_path / "host"), str(VENV), str(ENGINE), str(tmp_path / "in.u16"), "100", "120",
                           str(tmp_path / "out.u16")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert report["before init"].startswith("1|prism_rt is not initialised")
    assert report["unknown engine key"].startswith("1|the engine options has unknown keys ['colour']")
    assert report["unknown edit key"].startswith("1|the edit options has unknown keys ['stepz']")
    assert report["bits"].startswith("2|prism_edit: a pixel buffer needs")
    assert report["result"] == "1 100 120 1"
    expected = _expected(engine, pixels.astype(np.float32) / np.float32(65535), fit="pad")
    assert np.array_equal(np.fromfile(tmp_path / "out.u16", dtype=np.uint16).reshape(100, 120), expected)
