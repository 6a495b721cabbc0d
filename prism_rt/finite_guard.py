"""The NaN/Inf guard of a loop, accumulated on the backend's device and read once.

A NaN or Inf in any output is an error, never a black image (ARCHITECTURE.md, Precision). Checking
each step's outputs with ``bool(all(isfinite(x)))`` reads a flag back to the host every step,
which on a GPU stalls the launch queue once per step; the guard instead keeps each step's flag as
a 0-d device array and reads them together after the loop (one host read per loop). The error
still names the graph and the first step whose outputs were not finite; the steps after it run
on NaNs, which costs time only in a run that fails anyway.
"""
from __future__ import annotations

import numpy as np

from .errors import NonFiniteError


class FiniteGuard:
    def __init__(self, backend, graph: str):
        self.backend, self.graph = backend, graph
        self.steps: list[int | None] = []
        self.flags: list = []

    def add(self, outputs: dict, step: int | None = None) -> dict:
        """Record whether every value of ``outputs`` is finite (on the device); returns ``outputs``."""
        xp = self.backend.xp
        for value in outputs.values():
            if value.shape and 0 in value.shape:
                continue
            self.steps.append(step)
            self.flags.append(xp.all(xp.isfinite(value)))
        return outputs

    def check(self) -> None:
        """The one host read: raises :class:`NonFiniteError` naming the first failing step."""
        if not self.flags:
            return
        xp = self.backend.xp
        finite = np.asarray(self.backend.to_numpy(xp.stack(self.flags)), dtype=bool)
        self.flags, steps = [], self.steps
        self.steps = []
        if not finite.all():
            raise NonFiniteError(self.graph, steps[int(np.argmin(finite))])
