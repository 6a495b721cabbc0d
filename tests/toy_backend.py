"""A closed-form stand-in backend, written once against the array API, so the loops can be run
on numpy and on torch and compared (and run where torch is not installed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from prism_rt.backend import BackendKind, ModelInfo


class ToyBackend:
    kind = BackendKind.ONNXRUNTIME  # any non-torch kind
    supports_autograd = False

    def __init__(self, namespace: str = "numpy", nan_at_step: int | None = None):
        self.namespace = namespace
        self.nan_at_step = nan_at_step
        self.calls = 0
        self.info = ModelInfo(image_size=64, latent_channels=4, latent_downsample=8, text_width=8, max_tokens=77,
                              tokenizer_dir=Path("."))

    @property
    def xp(self):
        if self.namespace == "numpy":
            import array_api_compat.numpy as xp
        else:
            import array_api_compat.torch as xp
        return xp

    def asarray(self, array):
        if self.namespace == "numpy":
            array = np.asarray(array)
            return array.astype(np.float32) if array.dtype.kind == "f" else array
        import torch

        array = np.asarray(array)
        return torch.as_tensor(array, dtype=torch.float32 if array.dtype.kind == "f" else None)

    def to_numpy(self, array):
        return np.asarray(array.numpy() if hasattr(array, "numpy") else array)

    def run(self, graph, **inputs):
        xp = self.xp
        assert graph == "unet"
        z, text, alpha = inputs["latents"], inputs["text"], inputs["cross_alpha"]
        self.calls += 1
        # noise depends on the latent and (through its mean) on the prompt
        noise = 0.3 * z + xp.mean(text, axis=(1, 2))[:, None, None, None] + 0.01 * xp.sin(z)
        if self.nan_at_step is not None and self.calls - 1 == self.nan_at_step:
            noise = noise * float("nan")
        groups, items = int(alpha.shape[0]), int(alpha.shape[1]) + 1
        n_cond = groups * items
        cond = z[z.shape[0] - n_cond:]
        level = xp.reshape(xp.mean(cond[:, :1, :4, :4], axis=1), (groups, items, 1, 4, 4))
        tokens = xp.reshape(xp.astype(xp.arange(77), z.dtype), (1, 1, 77, 1, 1)) / 77.0
        maps = xp.exp(level * tokens)
        return {"noise": noise, "blend_maps": maps / xp.sum(maps, axis=2, keepdims=True)}

    def describe(self):
        return {"backend": "toy", "namespace": self.namespace}


def run_toy_edit(namespace: str, method: str, nan_at_step: int | None = None) -> np.ndarray:
    from prism_rt.config import ControlConfig, InversionMethod
    from prism_rt.control import build_control_plan
    from prism_rt.loop import Counter, EditInputs, edit_loop
    from prism_rt.schedule import DDIMSchedule
    from prism_rt.config import SamplerConfig
    from prism_rt.tokenizer import ClipTokenizer

    backend = ToyBackend(namespace, nan_at_step)
    tok_dir = Path(__file__).parent / "_toy_tokenizer"
    if not (tok_dir / "vocab.json").exists():
        from prism_export.clip_vocab import write_clip_tokenizer_files

        write_clip_tokenizer_files(tok_dir)
    tok = ClipTokenizer.from_folder(tok_dir)
    steps = 10
    schedule = DDIMSchedule.from_config(SamplerConfig(steps=steps))
    plan = build_control_plan(tok, "chest x-ray with devices", ["chest x-ray without devices"],
                              ControlConfig(self_replace=(0.4, 0.8), blend_words=("devices", "devices")), steps)
    rng = np.random.default_rng(0)
    a = lambda shape: backend.asarray(rng.standard_normal(shape).astype(np.float32))
    trajectory = [a((1, 4, 8, 8)) for _ in range(steps + 1)]
    inputs = EditInputs(method=InversionMethod(method), latents_T=trajectory[-1], source_embedding=a((1, 77, 8)),
                        target_embeddings=backend.xp.concat([a((1, 77, 8))] * 2, axis=0), null_embedding=a((1, 77, 8)),
                        trajectory=trajectory, guidance=7.5)
    out = edit_loop(backend, schedule, plan, inputs, Counter())
    return backend.to_numpy(out.latents)
