"""``prism-rt triton-repo``: the config.pbtxt parses as Triton's ModelConfig with ``serve``'s tensors;
the generated model.py, run against a fake ``triton_python_backend_utils``, gives the Python API's
counterfactual and answers a bad request with an error while its neighbour succeeds; and the
repository loads on the tritonserver binary shipped in nvidia-pytriton (skipped, with the reason,
where it cannot start here)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from prism_rt.cli import main
from prism_rt.config import ControlConfig, OrtOptions
from prism_rt.engine import Engine
from prism_rt.imageio import to_uint
from prism_rt.triton_repo import write_repo

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engines" / "phantom-demo"
IMAGE, PROMPT, TARGET = "phantom-1000003.png", "Chest X-ray showing No Finding, Support Devices", \
    "Chest X-ray showing No Finding"
PARAMS = {"steps": 3, "self_replace": [0.5]}


def _levels() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ENGINE / "images" / IMAGE)).astype(np.uint16)


@pytest.fixture(scope="module")
def expected():
    engine = Engine.from_dir(ENGINE, options=OrtOptions(threads=1))
    inversion = engine.invert(ENGINE / "images" / IMAGE, PROMPT, sampler=engine.sampler(steps=3))
    result = engine.edit(inversion, [TARGET], ControlConfig(self_replace=(0.5,)))
    return np.stack([to_uint(image, 16) for image in result.images("input")])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "models"
    assert main(["triton-repo", str(ENGINE), str(out), "--max-batch-size", "4", "--instances", "1",
                 "--threads", "1"]) == 0
    return out


def _request(levels=None, prompt=PROMPT, params=PARAMS):
    return {"image": (_levels() if levels is None else levels)[None],
            "prompt": np.array([[prompt.encode()]], dtype=object),
            "targets": np.array([[TARGET.encode()]], dtype=object),
            "params": np.array([[json.dumps(params).encode()]], dtype=object)}


def test_config_parses_as_tritons_model_config(repo):
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config = text_format.Parse((repo / "prism" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("prism", "python", 4)
    T = pb2.DataType
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in config.input] == [
        ("image", T.TYPE_UINT16, [-1, -1], False), ("prompt", T.TYPE_STRING, [1], False),
        ("targets", T.TYPE_STRING, [-1], False), ("params", T.TYPE_STRING, [1], False),
        ("keep_mask", T.TYPE_UINT8, [-1, -1], True), ("edit_mask", T.TYPE_UINT8, [-1, -1], True)]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("counterfactuals", T.TYPE_UINT16, [-1, -1, -1]), ("result", T.TYPE_STRING, [1])]
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb2.ModelInstanceGroup.KIND_CPU)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["engine"] == str(ENGINE.resolve()) and params["precision"] == "fp32" and params["threads"] == "1"
    assert (repo / "prism" / "1" / "model.py").is_file()


def test_copy_engine_and_no_batching(tmp_path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    write_repo(ENGINE, tmp_path / "r", max_batch_size=1, copy_engine=True, instances=2)
    config = text_format.Parse((tmp_path / "r" / "prism" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert not config.HasField("dynamic_batching") and config.instance_group[0].count == 2
    assert config.parameters["engine"].string_value == "1/engine"
    assert (tmp_path / "r" / "prism" / "1" / "engine" / "manifest.json").is_file()
    write_repo(ENGINE, tmp_path / "r")  # a previous repository is replaced; another folder is not
    assert not (tmp_path / "r" / "prism" / "1" / "engine").exists()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not a prism-rt result"):
        write_repo(ENGINE, tmp_path / "docs")


def test_a_bad_engine_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["triton-repo", str(tmp_path / "missing"), str(tmp_path / "out")]) != 0
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error


class _Error:
    def __init__(self, message):
        self.message = message


def test_model_py_matches_the_python_api_and_isolates_a_bad_request(repo, expected, monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = _Tensor, _Response, _Error
    fake.get_input_tensor_by_name = lambda request, name: (_Tensor(name, request[name]) if name in request else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("prism_triton_model", repo / "prism" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"parameters": {k: {"string_value": v} for k, v in
                             {"engine": str(ENGINE), "precision": "fp32", "threads": "1", "max_pixels": "20000",
                              "max_targets": "2"}.items()}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "prism"),
                      "model_version": "1"})
    bad = _request(params={"steps": 3, "bogus": 1})
    good, bad, missing = model.execute([_request(), bad, {k: v for k, v in _request().items() if k != "params"}])
    assert good.error is None and bad.error is not None and missing.error is not None
    assert "bogus" in bad.error.message and "params" in missing.error.message
    outputs = {t.name(): t.as_numpy() for t in good.output_tensors}
    assert outputs["counterfactuals"].dtype == np.uint16 and outputs["counterfactuals"].shape == (1, 1, 128, 128)
    assert np.array_equal(outputs["counterfactuals"][0], expected)
    assert json.loads(outputs["result"].reshape(-1)[0])["settings"]["steps"] == 3


def _server_tree(tmp: Path) -> tuple[Path, dict]:
    """The tritonserver of nvidia-pytriton with this Python's stub, and the environment its stub needs
    (as pytriton sets it up: the stub env's bin first on PATH, libpython and the server's libs)."""
    pytriton = pytest.importorskip("pytriton")
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    from prism_rt.serve import stub_environment

    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        pytest.skip(f"no tritonserver binary in {dist}")
    tree = tmp / "tritonserver"
    shutil.copytree(dist, tree, ignore=shutil.ignore_patterns("python_backend_stubs", "caches"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                tree / "backends" / "python" / "triton_python_backend_stub")
    try:
        stub_env = stub_environment(None) or Path(sys.exec_prefix)
    except Exception as exc:  # noqa: BLE001 - the reason becomes the skip's
        pytest.skip(f"no numpy<2 environment for the Python stub: {exc}")
    env = dict(os.environ)
    env["PATH"] = f"{stub_env / 'bin'}:{env['PATH']}"
    libs = [sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", ""), str(get_libs_path())]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PYTHONPATH"] = ":".join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return tree, env


def test_the_repository_loads_on_tritonserver(expected, tmp_path):
    # the engine copied in: the model resolves its engine parameter "1/engine" from its own folder
    repo = write_repo(ENGINE, tmp_path / "models", copy_engine=True, threads=1, max_batch_size=4)
    http = pytest.importorskip("tritonclient.http")
    from prism_rt.serve_client import decode, free_ports, request_inputs

    tree, env = _server_tree(tmp_path)
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path / "tritonserver.log"
    command = [str(tree / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
               str(tree / "backends"), "--http-address", "127.0.0.1", "--http-port", str(http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--allow-metrics", "false", "--backend-config", f"python,shm-region-prefix-name=prism{os.getpid()}_",
               "--exit-timeout-secs", "5"]
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    client = http.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=120)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.skip(f"tritonserver exited ({server.returncode}) before model 'prism' was ready: "
                            + " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:]))
            try:
                if client.is_model_ready("prism"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.skip("model 'prism' not ready on tritonserver within 60 s: "
                            + " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:]))
            time.sleep(0.5)
        images, report = decode(client.infer("prism", request_inputs(http, _levels(), PROMPT, [TARGET], PARAMS)))
        assert np.array_equal(images, expected) and report["settings"]["steps"] == 3

        def ask(params):  # concurrent: the dynamic batcher may hand them to one execute()
            one = http.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=120)
            try:
                return decode(one.infer("prism", request_inputs(http, _levels(), PROMPT, [TARGET], params)))
            except Exception as exc:  # noqa: BLE001 - the bad request's error, checked below
                return exc
            finally:
                one.close()

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, [PARAMS, {"bogus": 1}, PARAMS]))
        assert "bogus" in str(answers[1])
        for answer in (answers[0], answers[2]):
            assert not isinstance(answer, Exception), answer
            assert np.array_equal(answer[0], expected)
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
