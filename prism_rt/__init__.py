"""prism_rt: the lean runtime of PRISM counterfactual chest X-ray generation.

    engine = prism_rt.Engine.from_dir("engines/phantom-demo", options=prism_rt.OrtOptions(threads=2))
    inversion = engine.invert("cxr.dcm", "Chest X-ray showing Support Devices")
    result = engine.edit(inversion, ["Chest X-ray showing No Finding"])
    result.save("out/cxr")

``Engine.from_checkpoint(path, unet_weights=…)`` runs a diffusers checkpoint on PyTorch instead.

Imports numpy, tokenizers and pillow only; torch is needed by the torch backend alone.
"""
from .config import ControlConfig, Fit, InversionConfig, InversionMethod, OrtOptions, RunLimits, SamplerConfig
from .engine import EditResult, Engine
from .errors import PrismError
from .inversion import Inversion
from .precision import Precision

__all__ = ["ControlConfig", "EditResult", "Engine", "Fit", "Inversion", "InversionConfig", "InversionMethod",
           "OrtOptions", "Precision", "PrismError", "RunLimits", "SamplerConfig"]
from .version import __version__  # noqa: E402
