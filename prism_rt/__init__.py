"""prism_rt: the lean runtime of PRISM counterfactual chest X-ray generation.

    engine = prism_rt.Engine.load("model-or-engine", backend="torch")
    inversion = engine.invert("cxr.dcm", "Chest X-ray showing Support Devices", method="direct")
    result = engine.edit(inversion, ["Chest X-ray showing No Finding"])

Imports numpy, tokenizers and pillow only; torch is needed by the torch backend alone.
"""
from .config import ControlConfig, Fit, InversionConfig, InversionMethod, RunLimits, SamplerConfig
from .engine import EditResult, Engine
from .errors import PrismError
from .inversion import Inversion

__all__ = ["ControlConfig", "EditResult", "Engine", "Fit", "Inversion", "InversionConfig", "InversionMethod",
           "PrismError", "RunLimits", "SamplerConfig"]
__version__ = "0.1.0"
