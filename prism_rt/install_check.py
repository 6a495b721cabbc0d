"""``prism-rt check-install``: is this environment's ONNX Runtime the one the device needs?

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` (CUDA + TensorRT execution providers) are two
distributions of one import package, ``onnxruntime``: installed together, the files of whichever
was installed last win, and the CUDA / TensorRT providers silently vanish when that is the CPU
one (onnxruntime issue #26996). ``pip install 'prism-rt[gpu]'`` adds onnxruntime-gpu next to the
base dependency, so this check names the conflict and the commands that leave one of them.
torch-free and onnxruntime-free until asked for the providers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-training")
GPU_DISTRIBUTION = "onnxruntime-gpu"
GPU_WHEELS = ("onnxruntime-gpu from PyPI is built for CUDA 12.x with cuDNN 9; for CUDA 13 install the CUDA 13 build "
              "from the package index the onnxruntime install page names. The TensorRT EP needs the TensorRT major "
              "version that onnxruntime-gpu was built against (TensorRT 10.x: pip install tensorrt-cu12, or "
              "tensorrt-cu13 on CUDA 13; a TensorRT 11 build of onnxruntime-gpu for TensorRT 11)")
FIX = (f"pip uninstall -y {' '.join(ORT_DISTRIBUTIONS[:2])} && pip install --force-reinstall --no-deps "
       f"{GPU_DISTRIBUTION}")


@dataclass(frozen=True)
class InstallReport:
    distributions: dict[str, str]  # installed onnxruntime distributions → version
    providers: tuple[str, ...] | None = None  # what the imported onnxruntime offers (None: not asked)
    errors: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        found = ", ".join(f"{name} {version}" for name, version in self.distributions.items()) or "none"
        out = [f"onnxruntime distributions: {found}"]
        if self.providers is not None:
            out.append(f"execution providers: {', '.join(self.providers)}")
        return out + [f"error: {e}" for e in self.errors]


def installed_distributions(names=ORT_DISTRIBUTIONS) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def conflict(distributions: dict[str, str]) -> str | None:
    """The error line for several onnxruntime distributions in one environment, or None."""
    if len(distributions) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in distributions.items())
    return (f"{names} are installed together: they are one import package, the one installed last wins and the "
            "CUDA / TensorRT execution providers vanish when that is the CPU build (onnxruntime issue #26996); keep "
            f"only {GPU_DISTRIBUTION} on a GPU machine: {FIX}")


def check_install(device: str = "cpu", distributions: dict[str, str] | None = None,
                  providers: tuple[str, ...] | None = None) -> InstallReport:
    """What is installed, and an error for each thing that stops ``device`` (cpu, cuda, tensorrt)
    from running. ``distributions`` / ``providers``: as found here unless given (tests)."""
    distributions = installed_distributions() if distributions is None else dict(distributions)
    errors = []
    clash = conflict(distributions)
    if clash:
        errors.append(clash)
    if providers is None and distributions:
        try:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        except ImportError as exc:
            errors.append(f"onnxruntime cannot be imported ({exc}); reinstall it: {FIX if device != 'cpu' else 'pip install onnxruntime'}")
    if not distributions:
        errors.append("no onnxruntime is installed; pip install prism-rt (CPU) or 'prism-rt[gpu]' (CUDA / TensorRT)")
    kind = device.split(":")[0].lower()
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(kind)
    if wanted and providers is not None and wanted not in providers:
        why = "" if clash else f" ({GPU_DISTRIBUTION} is not installed)" if GPU_DISTRIBUTION not in distributions else ""
        errors.append(f"--device {kind} needs onnxruntime's {wanted}, which this environment lacks{why}; "
                      f"pip install 'prism-rt[gpu]' and see that only {GPU_DISTRIBUTION} stays installed. {GPU_WHEELS}")
    return InstallReport(distributions, providers, tuple(errors))
