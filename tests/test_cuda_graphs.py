"""CUDA-graph replay of the UNet call (``prism_rt.torch_backend.cuda_graphs``, issue 27 §2).

On the CPU: one capture per call shape (the edit loop's batch and the inversion's), static input
buffers of the call's shapes, and the static-buffer path giving the eager outputs bit for bit.
The capture itself needs CUDA: that test is marked ``gpu`` (unverified in the sessions that wrote
it, which had no GPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prism_rt.errors import BackendError  # noqa: E402
from prism_rt.torch_backend.cuda_graphs import GraphedCall, capture_key  # noqa: E402

ENGINE_DIR = Path(__file__).resolve().parents[1] / "engines" / "phantom-demo"

ROOT_SEED = 0


def _unet_inputs(backend, batch: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from prism_bench.workers import graph_inputs

    return graph_inputs(backend, None, "unet", batch, np.random.default_rng(batch))


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    from prism_rt.torch_backend.backend import load_torch_backend

    return (load_torch_backend(tiny_model_dir, cuda_graphs=False), load_torch_backend(tiny_model_dir, cuda_graphs=True))


def test_capture_key_names_shapes_and_dtypes():
    a = {"text": torch.zeros(2, 77, 8), "latents": torch.zeros(2, 4, 16, 16, dtype=torch.float16), "steps": 3}
    assert capture_key(a) == (("latents", (2, 4, 16, 16), "float16"), ("text", (2, 77, 8), "float32"))
    assert capture_key(dict(a, latents=torch.zeros(12, 4, 16, 16, dtype=torch.float16))) != capture_key(a)


def test_cuda_graphs_default_follows_the_device(tiny_model_dir):
    from prism_rt.torch_backend.backend import load_torch_backend

    assert load_torch_backend(tiny_model_dir).cuda_graphs is False  # CPU: off by default, on for CUDA


def test_one_capture_per_call_shape_with_static_buffers(backends):
    eager, graphed = backends
    for batch in (2, 12, 2, 12, 2):
        inputs = _unet_inputs(eager, batch)
        want = eager.run("unet", **inputs)
        got = graphed.run("unet", **inputs)
        for name in ("noise", "blend_maps"):
            assert torch.equal(want[name], got[name]), (batch, name)
    captures = graphed._graphed_unet.captures
    assert len(captures) == 2  # the inversion-like batch 2 and the edit batch 2·(1+5)
    for key, entry in captures.items():
        batch = dict((name, shape) for name, shape, _ in key)["latents"][0]
        assert entry.replays == (3 if batch == 2 else 2)
        assert {name: tuple(b.shape) for name, b in entry.inputs.items()} == {name: shape for name, shape, _ in key}
        assert entry.graph is None  # no capture without CUDA
    # the buffers hold the last call's values (copied in), not references to the caller's tensors
    last = _unet_inputs(eager, 2)
    entry = next(e for k, e in captures.items() if dict((n, s) for n, s, _ in k)["latents"][0] == 2)
    assert torch.equal(entry.inputs["latents"], last["latents"]) and entry.inputs["latents"] is not last["latents"]


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch sees none)")
    torch.manual_seed(ROOT_SEED)
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1)).cuda()

    def fn(latents, scale):
        return conv(latents) * scale, latents.mean()

    graphed = GraphedCall(fn, capture=True)
    outs = []
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(2, 4, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            s = torch.full((1,), 0.5 + seed, device="cuda")
            got = graphed(latents=x, scale=s)
            want = fn(x, s)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            outs.append((got[0], want[0]))
    for got, want in outs:  # earlier outputs were cloned: a later replay did not overwrite them
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphed.captures) == 1 and next(iter(graphed.captures.values())).graph is not None


@pytest.mark.slow
def test_cli_cuda_graphs_flag_reaches_the_backend(tiny_model_dir):
    import argparse

    from prism_rt.cli_args import load_engine, model_args

    parser = argparse.ArgumentParser()
    model_args(parser)
    assert parser.parse_args(["--model", str(tiny_model_dir)]).cuda_graphs is None  # the device decides
    args = parser.parse_args(["--model", str(tiny_model_dir), "--cuda-graphs"])
    assert load_engine(args).backend.cuda_graphs is True
    args = parser.parse_args(["--model", str(tiny_model_dir), "--no-cuda-graphs"])
    assert load_engine(args).backend.cuda_graphs is False


def test_channels_last_changes_the_layout_not_the_outputs(backends, tiny_model_dir):
    """NHWC convolutions (``--channels-last``): the UNet's weights and 4-D inputs in channels-last
    layout, the same noise, maps and decoded pixels as NCHW to float rounding, with CUDA graphs too."""
    import argparse

    from prism_rt.cli_args import load_engine, model_args

    eager, _ = backends
    parser = argparse.ArgumentParser()
    model_args(parser)
    nhwc = load_engine(parser.parse_args(["--model", str(tiny_model_dir), "--channels-last", "--cuda-graphs"])).backend
    assert nhwc.channels_last and nhwc.describe()["channels_last"] is True
    conv = nhwc.graphs["unet"].unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    inputs = _unet_inputs(eager, 12)
    want, got = eager.run("unet", **inputs), nhwc.run("unet", **inputs)
    for name in ("noise", "blend_maps"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    latents = inputs["latents"][:1]
    torch.testing.assert_close(nhwc.run("vae_decoder", latents=latents)["pixels"],
                               eager.run("vae_decoder", latents=latents)["pixels"], rtol=1e-4, atol=1e-4)
    nhwc.use_channels_last(False)
    assert nhwc.graphs["unet"].unet.conv_in.weight.is_contiguous()
    with pytest.raises(BackendError, match="--channels-last apply to the torch backend"):
        from prism_rt.engine import Engine

        Engine.load(ENGINE_DIR, channels_last=True)
