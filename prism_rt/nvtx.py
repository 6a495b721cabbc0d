"""NVTX ranges around the engine's stages (encode, inversion, null-text, noise-blend maps, edit
loop, decode) and the torch backend's graph calls, visible in Nsight Systems (``nsys profile
prism-rt edit …``). They are emitted
through torch's NVTX bindings when torch is loaded and sees a CUDA device, and are nothing
otherwise: no import of torch from here, no cost on the CPU."""
from __future__ import annotations

import contextlib
import sys


def nvtx_range(name: str):
    """An NVTX range named ``name`` where torch sees CUDA; a no-op context elsewhere."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


def stage(name: str):
    """``with stage("edit_loop"): …`` → the NVTX range ``prism_rt.edit_loop``."""
    return nvtx_range(f"prism_rt.{name}")
