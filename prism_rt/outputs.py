"""Writing an edit's outputs: PNGs mapped back to the input's geometry, signed difference maps,
and ``result.json``. Written to a staging folder first, so a failure never leaves a half-written
output folder behind."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .engine import EditResult
from .errors import OutputError
from .inversion import Inversion


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("prism-rt", "numpy", "onnxruntime", "tokenizers", "pillow", "pydicom", "torch", "diffusers", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_edit_outputs(out_dir, result: EditResult, inversion: Inversion, parameters: dict,
                       selection: list[dict] | None = None, figure: bool = False) -> Path:
    """``selection``: ``prism_rt.evaluate.select_edits``'s choice per edit (``selected-K.png`` is
    that counterfactual); ``figure``: also write ``figure.png`` (source | reconstruction | chosen
    counterfactual | signed change)."""
    from PIL import Image

    from .imageio import FitInfo, diff_heatmap, save_png, unfit

    out_dir = Path(out_dir)
    fit = FitInfo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in inversion.meta["fit"].items()})
    bits = 16 if int(inversion.meta.get("source_image", {}).get("bit_depth", 8) or 8) > 8 else 8
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: {exc.strerror}; choose another --out") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    try:
        recon = unfit(result.reconstruction, fit)
        save_png(stage / "reconstruction.png", recon, bits=bits)
        files = {"reconstruction": "reconstruction.png", "items": []}
        for item, image in zip(result.items, result.edits):
            edited = unfit(image, fit)
            save_png(stage / f"{item.name}.png", edited, bits=bits)
            diff_name = "diff-" + item.name.removeprefix("edit-") + ".png"
            Image.fromarray(diff_heatmap(edited, recon)).save(stage / diff_name)
            files["items"].append({"name": item.name, "edit": f"{item.name}.png", "diff": diff_name})
        if selection is not None:
            names = {item.name: i for i, item in enumerate(result.items)}
            for k, choice in enumerate(selection):
                if choice["selected_item"] is not None:
                    shutil.copy(stage / f"{choice['selected_item']}.png", stage / f"selected-{k}.png")
                    choice["file"] = f"selected-{k}.png"
        if figure:
            shown = None
            if selection and selection[0]["selected_item"] is not None:
                shown = selection[0]["selected_item"]
            elif result.items:
                shown = result.items[len(result.items) // 2].name
            if shown is not None:
                index = [item.name for item in result.items].index(shown)
                source = unfit(inversion.fitted_pixels, fit)
                edited = unfit(result.edits[index], fit)
                _side_by_side(stage / "figure.png", [("source", source), ("reconstruction", recon),
                                                     (f"counterfactual ({shown})", edited)], diff_heatmap(edited, recon))
                files["figure"] = "figure.png"
        record = {
            "parameters": parameters,
            "source_prompt": inversion.source_prompt,
            "inversion": {"method": inversion.method.value, "sampler": inversion.sampler.__dict__,
                          "timings": inversion.meta.get("timings", {}), "counts": inversion.meta.get("counts", {})},
            "reconstruction_error": result.reconstruction_error,
            "items": [dict(stat, files=f) for stat, f in zip(result.item_stats(), files["items"])],
            "edit_words": [list(words) for words in result.plan_words],
            "timings": result.timings,
            "counts": result.counts,
            "settings": result.settings,
            "provenance": {
                "source_image": inversion.meta.get("source_image", {}),
                "fit": inversion.meta.get("fit", {}),
                "model": inversion.meta.get("model", {}),
                "backend": inversion.meta.get("backend", {}),
                "libraries": library_versions(),
            },
            "files": files,
            **({"selection": selection} if selection is not None else {}),
            "notes": {"mean_abs_diff": "mean |edit − reconstruction| on the [0, 1] intensity scale, model space "
                      "(S×S); inside/outside the item's final LocalBlend mask when LocalBlend is on",
                      "reconstruction_error": "‖z_src − z*_0‖ / ‖z*_0‖ of the source branch's final latent",
                      "composite": "the item's difference-composite threshold (prism_rt.composite; 0 = plain): the "
                      "counterfactual is the reconstruction except where its blurred change exceeds it; "
                      "composite_fraction = the mean of that soft mask"},
        }
        (stage / "result.json").write_text(json.dumps(record, indent=2, default=_jsonable))
        _publish(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def _side_by_side(path: Path, panels: list, heatmap: np.ndarray) -> None:
    """One PNG: gray panels with a caption each, then the signed-difference heatmap."""
    from PIL import Image, ImageDraw

    from .imageio import to_uint

    height = max(p.shape[0] for _, p in panels)
    scale = max(1, 256 // height)
    tiles = []
    for title, pixels in panels:
        tile = Image.fromarray(to_uint(pixels, 8)).convert("RGB")
        tiles.append((title, tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)))
    heat = Image.fromarray(heatmap)
    heat = heat.resize((heat.width * tiles[0][1].height // heat.height, tiles[0][1].height), Image.NEAREST)
    tiles.append(("change (counterfactual - reconstruction)", heat))
    pad, caption = 6, 18
    width = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, tiles[0][1].height + caption + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, tile in tiles:
        canvas.paste(tile, (x, caption + pad))
        draw.text((x, 3), title, fill="black")
        x += tile.width + pad
    canvas.save(path)


def _publish(stage: Path, out_dir: Path):
    """Move the finished files into place: a fresh folder is renamed in one step; into an
    existing one each file replaces its namesake."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    if not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder; choose another --out")
    for path in stage.iterdir():
        os.replace(path, out_dir / path.name)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "value"):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
