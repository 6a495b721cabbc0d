"""Typed errors of prism_rt.

Every error says what was wrong (with the value) and what to do about it. The CLI prints
``error: <message>`` on one line and exits with :attr:`PrismError.exit_code`.
"""
from __future__ import annotations


class PrismError(Exception):
    """Base class of every error prism_rt raises on purpose."""

    exit_code = 2


class InputImageError(PrismError):
    """The input image cannot be read or is not a usable radiograph."""


class MaskError(InputImageError):
    """A keep or edit mask cannot be read, is empty, or does not fit the image."""


class PromptError(PrismError):
    """A prompt is empty, too long, or an edit cannot be built from it."""


class ModelError(PrismError):
    """A model folder, checkpoint or engine cannot be loaded."""


class CheckpointKeysError(ModelError):
    """A state dict does not match the model it is loaded into."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str],
                 hint: str = "check that it is a state dict of the same architecture (SD v1.x)"):
        self.missing = list(missing)
        self.unexpected = list(unexpected)

        def show(keys: list[str]) -> str:
            head = ", ".join(keys[:8])
            return head + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = [f"{what} does not match the model"]
        if missing:
            parts.append(f"missing keys: {show(self.missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(self.unexpected)}")
        parts.append(hint)
        super().__init__("; ".join(parts))


class MissingExtraError(PrismError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, module: str, purpose: str):
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{module}' package, which is not installed; "
            f"install it with: pip install 'prism-rt[{extra}]'"
        )


class SettingsError(PrismError, ValueError):
    """A setting is out of range or contradicts another (a ValueError too, as Python's own checks)."""


class BackendError(PrismError):
    """A backend cannot run what was asked (missing capability, provider or device)."""


class InversionFileError(PrismError):
    """A saved inversion cannot be read or does not fit the edit asked for."""


class NonFiniteError(PrismError):
    """A graph produced NaN or Inf."""

    def __init__(self, graph: str, step: int | None = None):
        where = f"graph '{graph}'" + (f" at step {step}" if step is not None else "")
        super().__init__(
            f"{where} produced NaN or Inf values; the result would be a black or corrupt image. "
            "Try fp32 precision, check the model weights, or report the input that causes it"
        )
        self.graph = graph
        self.step = step


class OutputError(PrismError):
    """The output location cannot be written."""
