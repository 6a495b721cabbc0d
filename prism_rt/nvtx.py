"""NVTX ranges around the engine's stages (encode, inversion, null-text, noise-blend maps, edit
loop, decode), visible in Nsight Systems (``nsys profile prism-rt edit …``). They are emitted
through torch's NVTX bindings when torch is loaded and sees a CUDA device, and are nothing
otherwise: no import of torch from here, no cost on the CPU."""
from __future__ import annotations

import contextlib
import sys


def _range(name: str):
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


def stage(name: str):
    """``with stage("edit_loop"): …`` → the NVTX range ``prism_rt.edit_loop``."""
    return _range(f"prism_rt.{name}")
