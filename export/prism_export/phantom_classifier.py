"""The phantom attribute classifier (Support Devices, Pleural Effusion, Cardiomegaly): trained on the
rendered phantoms by ``prism-export train-phantom`` and exported to ``classifier.onnx``, which the
evaluation uses to judge whether an edit changed the attribute it should.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .phantom_training import LABEL_NAMES, TrainConfig, log_line, lr_at


def _classifier():
    """The attribute classifier: four strided conv blocks, mean + max pooling, one linear layer."""
    import torch
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class AttributeClassifier(nn.Module):
        """gray [0,1] 128 → logits of (Support Devices, Pleural Effusion, Cardiomegaly)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 48), block(48, 64))
            self.head = nn.Linear(128, len(LABEL_NAMES))

        def forward(self, image):
            f = self.features(image * 2.0 - 1.0)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            return self.head(pooled)

    return AttributeClassifier()


def train_classifier(cfg: TrainConfig, images, labels, held_images, held_labels, log=log_line):
    """Train the classifier on ``images`` / ``labels``; returns it, its held-out accuracy per label, the losses."""
    import numpy as np
    import torch

    torch.manual_seed(cfg.seed + 3)
    model = _classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.cls_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    x_all = torch.from_numpy(images)[:, None]
    y_all = torch.from_numpy(labels)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(cfg.cls_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.cls_steps, cfg.cls_lr, warmup=20)
        idx = torch.randint(0, len(x_all), (cfg.cls_batch,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x_all[idx].float()), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.cls_steps:
            dt = (time.perf_counter() - t0) / (step + 1)
            log(f"classifier step {step + 1}/{cfg.cls_steps} loss {np.mean(losses[-cfg.log_every:]):.4f} {dt:.3f} s/step")
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(held_images[i:i + 64])[:, None]) for i in range(0, len(held_images), 64)])
    pred = (logits > 0).numpy().astype(np.float32)
    acc = {name: float((pred[:, k] == held_labels[:, k]).mean()) for k, name in enumerate(LABEL_NAMES)}
    return model, acc, losses


def export_classifier(model, path: Path, size: int = 128) -> None:
    """``classifier.onnx``: input ``image`` [B,1,size,size] gray in [0,1], output ``logits``, checked against torch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    model.eval()
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=63)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18, input_names=["image"],
                                output_names=["logits"], dynamic_shapes={"image": {0: batch}}, verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    for key, value in (("prism.labels", json.dumps(list(LABEL_NAMES))), ("prism.input", f"gray [0,1] {size}")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    # parity check at two batch sizes
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x = torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["logits"], {"image": x.numpy()})[0]
        if got.shape != (b, len(LABEL_NAMES)) or not np.allclose(got, ref, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"classifier.onnx differs from torch at batch {b}: max err {np.abs(got - ref).max()}")
