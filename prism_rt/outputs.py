"""Writing an edit's outputs: PNGs mapped back to the input's geometry (with provenance text
chunks), their DICOM twins when the input is DICOM (``prism_rt.dicom_out``), optionally the
reconstruction and signed difference maps, and ``result.json``. Written to a staging folder and
published whole (``prism_rt.publish``), so a failure or a kill never leaves a half-written or
mixed output folder behind."""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dicom_out import SYNTHETIC, DicomOptions, derivation_description
from .publish import LOCK_WAIT_S, staged_dir
from .version import __version__

if TYPE_CHECKING:  # the engine (and its backends) is not needed to write files
    from .result import EditResult
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
                       selection: list[dict] | None = None, figure: bool = False, *, extras: bool = False,
                       wait_s: float = LOCK_WAIT_S, dicom: DicomOptions | None = DicomOptions()) -> Path:
    """Write the result and publish it onto ``out_dir`` in one step (``prism_rt.publish``): an
    existing result there is replaced whole, never merged into.

    By default only what a reader looks at: the counterfactuals (``edit-*.png``), ``selected-K.png``
    per chosen edit, ``result.json``, and ``figure.png`` with ``figure``. ``extras`` adds the
    reconstruction (``reconstruction.png``) and one signed difference map per edit
    (``diff-*.png``). ``selection``: ``prism_rt.evaluate.select_edits``'s choice per edit;
    ``figure``: source | reconstruction | chosen counterfactual | signed change. ``wait_s``: how
    long to wait for another process publishing to the same folder. ``result.json``'s ``files``
    lists exactly the files written (itself included).

    ``dicom``: when the input was a DICOM, each counterfactual PNG (``edit-*``, ``selected-*``)
    gets a marked-synthetic DICOM twin of the same stem (``prism_rt.dicom_out``); None: none.
    With ``dicom.anonymize`` result.json leaves out the source's path and SOP Instance UID too.
    """
    from .imageio import FitInfo

    fit = FitInfo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in inversion.meta["fit"].items()})
    bits = 16 if int(inversion.meta.get("source_image", {}).get("bit_depth", 8) or 8) > 8 else 8
    with staged_dir(out_dir, wait_s=wait_s) as stage:
        _write(stage, result, inversion, parameters, selection, figure, extras, fit, bits, dicom)
    return Path(out_dir)


def _write(stage: Path, result: EditResult, inversion: Inversion, parameters: dict, selection, figure: bool,
           extras: bool, fit, bits: int, dicom: DicomOptions | None) -> None:
    from PIL import Image

    from .imageio import diff_heatmap, save_png, unfit

    written = []
    source_meta = inversion.meta.get("source_image", {})
    series = None
    if dicom is not None and source_meta.get("kind") == "dicom":
        from .dicom_out import DicomSeries

        series = DicomSeries(source_meta.get("path"), dicom, sha256=source_meta.get("sha256"))
    recon = unfit(result.reconstruction, fit)
    if extras:
        save_png(stage / "reconstruction.png", recon, bits=bits)
        written.append("reconstruction.png")
    items = []
    for number, (item, image) in enumerate(zip(result.items, result.edits), start=1):
        edited = unfit(image, fit)
        provenance = _provenance(inversion, item, result.settings)
        save_png(stage / f"{item.name}.png", edited, bits=bits, text=_png_text(provenance))
        files = {"name": item.name, "edit": f"{item.name}.png"}
        written.append(files["edit"])
        if series is not None:
            files["dicom"] = series.write(stage / f"{item.name}.dcm", edited, provenance, number).name
            written.append(files["dicom"])
        if extras:
            files["diff"] = "diff-" + item.name.removeprefix("edit-") + ".png"
            Image.fromarray(diff_heatmap(edited, recon)).save(stage / files["diff"], compress_level=1)
            written.append(files["diff"])
        items.append(files)
    if selection is not None:
        for k, choice in enumerate(selection):
            if choice["selected_item"] is not None:
                shutil.copyfile(stage / f"{choice['selected_item']}.png", stage / f"selected-{k}.png")
                choice["file"] = f"selected-{k}.png"
                written.append(choice["file"])
                if series is not None:  # the same image: the same SOP instance, so a PACS keeps one copy
                    shutil.copyfile(stage / f"{choice['selected_item']}.dcm", stage / f"selected-{k}.dcm")
                    choice["dicom"] = f"selected-{k}.dcm"
                    written.append(choice["dicom"])
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
            written.append("figure.png")
    written.append("result.json")
    record = {
        "parameters": parameters,
        "source_prompt": inversion.source_prompt,
        "inversion": {"method": inversion.method.value, "sampler": inversion.sampler.__dict__,
                      "timings": inversion.meta.get("timings", {}), "counts": inversion.meta.get("counts", {})},
        "reconstruction_error": result.reconstruction_error,
        "items": [dict(stat, files=f) for stat, f in zip(result.item_stats(), items)],
        "edit_words": [list(words) for words in result.plan_words],
        "timings": result.timings,
        "counts": result.counts,
        "settings": result.settings,
        "provenance": {
            "source_image": _identity_free(source_meta) if dicom is not None and dicom.anonymize else source_meta,
            "fit": inversion.meta.get("fit", {}),
            "model": inversion.meta.get("model", {}),
            "backend": inversion.meta.get("backend", {}),
            "libraries": library_versions(),
        },
        "files": sorted(written),
        **({"selection": selection} if selection is not None else {}),
        "notes": {"mean_abs_diff": "mean |edit − reconstruction| on the [0, 1] intensity scale, model space "
                  "(S×S); inside/outside the item's final LocalBlend mask when LocalBlend is on",
                  "reconstruction_error": "‖z_src − z*_0‖ / ‖z*_0‖ of the source branch's final latent",
                  "composite": "the item's difference-composite threshold (prism_rt.composite; 0 = plain): the "
                  "counterfactual is the reconstruction except where its blurred change exceeds it; "
                  "composite_fraction = the mean of that soft mask",
                  "files": "every file written; reconstruction.png and diff-*.png only with extras",
                  "dicom": f"*.dcm: {SYNTHETIC}; a Secondary Capture twin of the PNG of the same stem, in a new "
                  "series of the source's study (a new study with --anonymize)"},
    }
    (stage / "result.json").write_text(json.dumps(record, indent=2, default=_jsonable))


def _provenance(inversion: Inversion, item, settings: dict) -> dict:
    """What made one counterfactual: written into its PNG's text chunks and its DICOM twin."""
    model = inversion.meta.get("model", {})
    graphs = (model.get("provenance") or {}).get("engine_sha256")
    engine_hash = hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest() if graphs else None
    return {"warning": SYNTHETIC, "software": f"prism_rt {__version__}",
            "source_sha256": inversion.meta.get("source_image", {}).get("sha256"),
            "source_prompt": inversion.source_prompt, "inversion": inversion.method.value,
            # what the edit item knows of itself (a caller's duck-typed result may know only its name)
            **{key: getattr(item, key, None) for key in ("target", "self_replace", "blend_threshold", "composite")},
            "model_path": str(model.get("path")), "engine_hash": engine_hash, "settings": settings}


def _png_text(provenance: dict) -> dict:
    return {"Warning": SYNTHETIC, "Software": provenance["software"],
            "Source": f"sha256:{provenance['source_sha256']}", "Description": derivation_description(provenance),
            "prism_rt:provenance": json.dumps(provenance, default=_jsonable)}


def _identity_free(source_meta: dict) -> dict:
    return {k: v for k, v in source_meta.items() if k not in ("path", "sop_instance_uid")}


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
