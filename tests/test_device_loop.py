"""The torch backend's loops stay on the device (issue 27 §2): after the per-loop setup (control
tensors for every step, the timesteps, each copied once) no step copies anything between the host
and the device, and the NaN/Inf guard is read once per loop.

The host copies are counted device-agnostically on the CPU: a ``TorchFunctionMode`` sees every
call that moves data across (``Tensor.__bool__ / item / numpy / tolist / __float__ / __int__ /
cpu``, ``torch.as_tensor / tensor`` of host data), which on CUDA would each be a transfer and a
synchronisation. The count per loop must not grow with the number of steps. The values are the
same as with every array passing through the host at every call (and bit-identical to the loop
before this change: checked when it was made, 4 steps, direct and DDIM, tiny model)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.overrides import TorchFunctionMode  # noqa: E402

import prism_rt.engine as engine_module  # noqa: E402
from prism_rt.config import ControlConfig, RunLimits  # noqa: E402
from prism_rt.errors import NonFiniteError  # noqa: E402

SOURCE, TARGET = "Chest X-ray showing No Finding, Support Devices", "Chest X-ray showing No Finding"
HOST_READS = {"__bool__", "item", "numpy", "tolist", "__float__", "__int__", "__index__", "cpu"}
HOST_WRITES = {"as_tensor", "tensor"}


class HostTransfers(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        data = args[0] if args else kwargs.get("data")
        if name in HOST_READS or (name in HOST_WRITES and not isinstance(data, torch.Tensor)):
            self.events.append(name)
        return func(*args, **kwargs)


def _counting(loop, counts: list):
    def wrapped(*args, **kwargs):
        with HostTransfers() as mode:
            result = loop(*args, **kwargs)
        counts.append(list(mode.events))
        return result
    return wrapped


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from prism_rt.engine import Engine

    return Engine.load(tiny_model_dir, backend="torch")


def _counterfactual(engine, image, steps: int, method: str = "direct"):
    inversion = engine.invert(image, SOURCE, method=method, sampler=engine.sampler(steps=steps))
    return np.stack(engine.edit(inversion, [TARGET], ControlConfig(), RunLimits(max_batch=63)).edits)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["direct", "ddim"])
def test_loops_copy_nothing_per_step(engine, dicom_path, monkeypatch, method):
    counts = {}
    for steps in (2, 5):
        inversion, edit = [], []
        monkeypatch.setattr(engine_module, "ddim_inversion", _counting(_original("ddim_inversion"), inversion))
        monkeypatch.setattr(engine_module, "edit_loop_groups", _counting(_original("edit_loop_groups"), edit))
        _counterfactual(engine, dicom_path, steps, method)
        assert len(inversion) == 1 and len(edit) == 1
        counts[steps] = (inversion[0], edit[0])
    assert counts[2] == counts[5], counts
    inversion_events, edit_events = counts[5]
    # once per loop: the timesteps (a host array → one tensor), the controls, the guard's one read
    assert len(inversion_events) <= 8 and len(edit_events) <= 12, counts[5]
    assert sum(e in HOST_READS for e in inversion_events) == 1 and sum(e in HOST_READS for e in edit_events) == 1


def _original(name: str):
    import prism_rt.loop

    return getattr(prism_rt.loop, name)


class HostRoundTrip:
    """The backend with every graph input and output passed through host numpy arrays, as a loop
    kept on the host would see them; and optionally a NaN in the UNet's output at one call."""

    def __init__(self, backend, nan_at_call: int | None = None):
        self._backend, self.nan_at_call, self.unet_calls = backend, nan_at_call, 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, graph, **inputs):
        b = self._backend
        outputs = b.run(graph, **{k: b.asarray(b.to_numpy(v)) if v.is_floating_point() else v for k, v in inputs.items()})
        outputs = {k: b.asarray(b.to_numpy(v)) for k, v in outputs.items()}
        if graph == "unet":
            if self.unet_calls == self.nan_at_call:
                outputs["noise"] = outputs["noise"] * float("nan")
            self.unet_calls += 1
        return outputs


@pytest.mark.slow
def test_device_loop_equals_host_round_trips(engine, dicom_path, monkeypatch):
    device = _counterfactual(engine, dicom_path, 3)
    monkeypatch.setattr(engine, "backend", HostRoundTrip(engine.backend))
    host = _counterfactual(engine, dicom_path, 3)
    np.testing.assert_array_equal(device, host)


@pytest.mark.slow
def test_guard_names_first_non_finite_step(engine, dicom_path, monkeypatch):
    inversion = engine.invert(dicom_path, SOURCE, method="direct", sampler=engine.sampler(steps=4))
    monkeypatch.setattr(engine, "backend", HostRoundTrip(engine.backend, nan_at_call=2))
    with pytest.raises(NonFiniteError, match=r"graph 'unet' at step 2"):
        engine.edit(inversion, [TARGET], ControlConfig(), RunLimits(max_batch=63))
    monkeypatch.setattr(engine, "backend", HostRoundTrip(engine.backend._backend, nan_at_call=1))
    with pytest.raises(NonFiniteError, match=r"graph 'unet' at step 1"):
        engine.invert(dicom_path, SOURCE, method="direct", sampler=engine.sampler(steps=4))
