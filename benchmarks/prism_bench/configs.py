"""The bench's presets, its end-to-end configurations and the environment its results record."""
from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "prism-rt-bench/1"
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int  # DDIM steps of the end-to-end runs
    repeats: int  # timed repeats per graph measurement (after warm-up)
    warmup: int
    batches: tuple[int, ...]  # per-graph batch sizes; the edit batch 2·(1+K·S) is added
    sweep: tuple[float, ...]  # the self-window values (S of them)
    mode: str  # "full" (per graph + end to end) or "graphs" (per graph only)
    throughput_images: int  # G
    e2e_repeats: int = 1
    cpu_batches: tuple[int, ...] | None = None  # per-graph batches on a CPU (None: batches + the edit batch)
    graphs: tuple[str, ...] | None = None  # per-graph measurements of these graphs (None: all)
    add_edit_batch: bool = True  # per-graph batches include the edit batch 2·(1+K·S) (off: exactly ``batches``)


PRESETS = {
    "tiny": Preset("tiny", steps=20, repeats=5, warmup=1, batches=(1, 2, 4), sweep=(0.4, 0.5, 0.6, 0.7, 0.8),
                   mode="full", throughput_images=2),
    # on a CPU one SD v1.5 UNet call at the edit batch (12) takes about a minute: batches 1 and 2 there
    "sd15": Preset("sd15", steps=50, repeats=3, warmup=2, batches=(1, 2, 4), sweep=(0.4, 0.5, 0.6, 0.7, 0.8),
                   mode="auto", throughput_images=2, cpu_batches=(1, 2)),
}


@dataclass(frozen=True)
class Config:
    """One end-to-end configuration: how one counterfactual is made."""

    name: str
    backend: str
    precision: str
    inversion: str
    sweep: str  # "sequential" (PRISM's published code: one run per self-window value) or "batched"
    role: str = ""  # reference | algorithmic | runtime

    @property
    def model_kind(self) -> str:
        return "checkpoint" if self.backend == "torch" else "engine"


REFERENCE = Config("PRISM reference (torch fp32, null-text, sweep value by value)", "torch", "fp32", "null-text",
                   "sequential", "reference")


def e2e_configs(engine_precisions: tuple[str, ...], have_checkpoint: bool, have_engine: bool, gpu: bool) -> list[Config]:
    configs = []
    if have_checkpoint:
        configs += [REFERENCE,
                    Config("torch fp32, null-text, batched sweep", "torch", "fp32", "null-text", "batched", "algorithmic"),
                    Config("torch fp32, direct, batched sweep", "torch", "fp32", "direct", "batched", "algorithmic")]
        if gpu:
            configs.append(Config("torch fp16, direct, batched sweep", "torch", "fp16", "direct", "batched", "runtime"))
    if have_engine:
        configs.append(Config("onnxruntime fp32, negative-prompt, batched sweep", "onnxruntime", "fp32",
                              "negative-prompt", "batched", "algorithmic"))
        for precision in engine_precisions:
            configs.append(Config(f"onnxruntime {precision}, direct, batched sweep", "onnxruntime", precision, "direct",
                                  "batched", "runtime"))
    return configs


# -- environment ------------------------------------------------------------------------------------
def environment(threads: int | None, device: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": threads or os.cpu_count(), "device": device}
    for module in ("numpy", "onnxruntime", "torch", "diffusers", "transformers", "onnx"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            env["gpu_driver"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
