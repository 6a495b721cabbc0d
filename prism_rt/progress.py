"""Progress of the engine's loops: a tqdm bar on a terminal, periodic lines elsewhere."""
from __future__ import annotations

import sys
import time


class Progress:
    """Progress over steps when asked: a tqdm bar on a terminal; elsewhere (a log file, a service)
    one line on stderr at every tenth of the work, so a long run is never silent."""

    def __init__(self, enabled: bool, total: int, desc: str, stream=None):
        self.bar, self.total, self.desc, self.done = None, max(int(total), 1), desc, 0
        self.stream = stream or sys.stderr
        self.enabled, self.start, self.next_report = bool(enabled), time.perf_counter(), 0.1
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, file=self.stream)

    def update_one(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and self.done / self.total >= self.next_report - 1e-9:
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc}: {self.done}/{self.total} steps, {elapsed:.0f} s", file=self.stream, flush=True)
            while self.next_report <= self.done / self.total + 1e-9:
                self.next_report += 0.1

    def close(self):
        if self.bar is not None:
            self.bar.close()
