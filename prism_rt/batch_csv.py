"""What a batch job is asked to do: its images, their source captions and the edits that apply.

Two sources of work, both checked whole before any model work (one typed error line, nothing
written):

* a CheXpert-style CSV (``Path`` + label columns, values 1 / 0 / -1 uncertain / blank): the source
  caption is PRISM's from the labels (:func:`prism_rt.captions.chexpert_caption`); each requested
  edit ``ATTR=remove`` / ``ATTR=add`` flips one label and rebuilds the caption, and is *skipped*
  (with its reason) where it does not apply: removing an absent finding, adding a present one, or
  an uncertain label;
* a plain folder of images with one source caption and the same edited captions for all.

Missing or unreadable image files are not refused here: they are per-image failures of the job.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from .captions import CHEXPERT_LABELS, chexpert_caption
from .errors import PrismError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
ACTIONS = ("remove", "add")
NOT_PATHOLOGY = ("No Finding", "Support Devices")
"""CheXpert's "No Finding" is positive when no pathology is; support devices are not one."""
RESERVED_IDS = ("job.json", "results.csv")


class BatchInputError(PrismError):
    """A batch job's CSV, image folder or edit list is unusable; nothing was run."""


@dataclass(frozen=True)
class EditSpec:
    """One requested edit: ``attribute`` (a CheXpert label) to ``action`` (remove / add), or, for
    a plain folder, a fixed edited caption (``attribute`` None)."""

    text: str
    attribute: str | None = None
    action: str | None = None
    caption: str | None = None

    @classmethod
    def parse(cls, text: str) -> "EditSpec":
        """``"Support Devices=remove"`` → EditSpec; an unknown label or action is refused."""
        name, sep, action = (part.strip() for part in str(text).partition("="))
        if not sep or action.lower() not in ACTIONS:
            raise BatchInputError(f"--edit {text!r} is not ATTRIBUTE=remove or ATTRIBUTE=add, e.g. "
                                  "--edit 'Support Devices=remove'")
        label = next((lab for lab in CHEXPERT_LABELS if lab.lower() == name.lower()), None)
        if label is None:
            raise BatchInputError(f"--edit {text!r}: {name!r} is not a CheXpert label; valid labels are: "
                                  f"{', '.join(CHEXPERT_LABELS[1:])}")
        if label == "No Finding":
            raise BatchInputError(f"--edit {text!r}: 'No Finding' follows the other labels; edit a finding instead "
                                  "(removing the last finding makes the caption 'No Finding')")
        return cls(text=f"{label}={action.lower()}", attribute=label, action=action.lower())


@dataclass
class PlannedEdit:
    """One image × edit: the target caption, or why it was skipped."""

    edit: str
    target: str | None
    skip_reason: str | None = None


@dataclass
class ImageTask:
    image_id: str  # the output folder's name, unique in the job
    path: Path  # absolute
    source: str  # source caption
    edits: list[PlannedEdit] = field(default_factory=list)
    row: int | None = None  # CSV line, for messages
    keep_mask: Path | None = None  # absolute; the image never changes inside it (prism_rt.user_masks)
    edit_mask: Path | None = None  # absolute; the edit is confined to it
    masks: str = ""  # the masks' content digest, read once per run by attach_masks; recorded in the rows

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self.edits if e.skip_reason is None]


def parse_label(value, *, where: str) -> int | None:
    """A CheXpert cell: 1, 0, -1 (also 1.0, 0.0, -1.0) or blank (None); anything else is refused."""
    text = "" if value is None else str(value).strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number not in (1.0, 0.0, -1.0):
        raise BatchInputError(f"{where}: label value {text!r} is not 1, 0, -1 or blank; fix the CSV")
    return int(number)


def plan_edit(labels: dict[str, int | None], spec: EditSpec) -> PlannedEdit:
    """Flip one label and rebuild PRISM's caption, or say why the edit does not apply."""
    attribute, value = spec.attribute, labels.get(spec.attribute)
    if value == -1:
        return PlannedEdit(spec.text, None, f"{attribute} is uncertain (-1)")
    present = value == 1
    if spec.action == "remove" and not present:
        return PlannedEdit(spec.text, None, f"{attribute} is absent ({'blank' if value is None else value})")
    if spec.action == "add" and present:
        return PlannedEdit(spec.text, None, f"{attribute} is already present (1)")
    new = dict(labels)
    new[attribute] = 0 if spec.action == "remove" else 1
    if attribute not in NOT_PATHOLOGY:  # CheXpert: No Finding iff no pathology is positive or uncertain
        others = [new.get(lab) for lab in CHEXPERT_LABELS if lab not in NOT_PATHOLOGY]
        new["No Finding"] = 0 if any(v in (1, -1) for v in others) else 1
    return PlannedEdit(spec.text, chexpert_caption({k: v for k, v in new.items() if v is not None}))


def image_id(relative: str) -> str:
    """A folder name from the image's path: its parts joined by ``__``, suffix dropped, unsafe
    characters replaced (CheXpert's ``patient…/study…/view1_frontal.jpg`` names repeat)."""
    path = Path(relative)
    parts = [*path.parent.parts, path.stem] if path.suffix.lower() in IMAGE_SUFFIXES else list(path.parts)
    text = "__".join(p for p in parts if p not in ("", ".", "..", "/"))
    text = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "image"
    return text[:200]


def _check_unique(tasks: list[ImageTask], what: str) -> None:
    seen: dict[str, ImageTask] = {}
    for task in tasks:
        if task.image_id in RESERVED_IDS:
            raise BatchInputError(f"{what}: the image {task.path} would be written to {task.image_id!r}, a name the "
                                  "job uses itself; rename the file")
        if task.image_id in seen:
            raise BatchInputError(f"{what}: {seen[task.image_id].path} and {task.path} both map to the output folder "
                                  f"{task.image_id!r}; list each image once (or rename one)")
        seen[task.image_id] = task


def read_chexpert_csv(csv_path, root, edits: list[EditSpec]) -> list[ImageTask]:
    """The CSV's images with their captions and planned edits. ``root``: the folder the ``Path``
    column is relative to (absolute paths are kept)."""
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise BatchInputError(f"--csv {csv_path} does not exist or is not a file")
    if not edits:
        raise BatchInputError("give at least one --edit such as --edit 'Support Devices=remove'")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BatchInputError(f"--csv {csv_path} cannot be read as a CSV ({exc})") from None
    if "Path" not in header:
        raise BatchInputError(f"--csv {csv_path} has no 'Path' column (columns: {', '.join(header[:8]) or 'none'}); "
                              "a CheXpert CSV has Path and the 14 label columns")
    labels_here = [lab for lab in CHEXPERT_LABELS if lab in header]
    if not labels_here:
        raise BatchInputError(f"--csv {csv_path} has none of the CheXpert label columns ({', '.join(CHEXPERT_LABELS)})")
    missing = sorted({e.attribute for e in edits} - set(labels_here))
    if missing:
        raise BatchInputError(f"--csv {csv_path} has no column for the edited label(s) {missing}; add the column or "
                              "drop the --edit")
    if not rows:
        raise BatchInputError(f"--csv {csv_path} lists no images")
    tasks = []
    for line, raw in enumerate(rows, start=2):
        raw = {(k or "").strip(): v for k, v in raw.items()}
        rel = (raw.get("Path") or "").strip()
        if not rel:
            raise BatchInputError(f"--csv {csv_path} line {line}: the Path cell is empty")
        labels = {lab: parse_label(raw.get(lab), where=f"--csv {csv_path} line {line}, column {lab!r}")
                  for lab in labels_here}
        source = chexpert_caption({k: v for k, v in labels.items() if v is not None})
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        masks = {}
        for column, key in MASK_COLUMNS.items():
            cell = (raw.get(column) or "").strip()
            if cell:
                mask = (Path(cell) if Path(cell).is_absolute() else root / cell).absolute()
                if not mask.is_file():
                    raise BatchInputError(f"--csv {csv_path} line {line}, column {column!r}: {mask} does not exist; fix "
                                          "the path (relative to --root) or leave the cell blank")
                masks[key] = mask
        tasks.append(ImageTask(image_id(rel), path.absolute(), source, [plan_edit(labels, e) for e in edits], line,
                               **masks))
    _check_unique(tasks, f"--csv {csv_path}")
    return tasks


MASK_COLUMNS = {"KeepMask": "keep_mask", "EditMask": "edit_mask"}
"""Optional CSV columns: an image's own keep / edit mask (a path relative to --root; blank: none)."""


def attach_masks(tasks: list[ImageTask], keep=None, edit=None) -> None:
    """``--keep-mask`` / ``--edit-mask``: a file (the same mask for every image) or a folder (each
    image's mask under the image's file name); an image's CSV cell wins. A missing mask is
    refused here, before any work. Then every task's ``masks`` digest (of CSV and flag masks alike)."""
    for flag, key, given in (("--keep-mask", "keep_mask", keep), ("--edit-mask", "edit_mask", edit)):
        if given is None:
            continue
        given = Path(given).absolute()
        if not given.exists():
            raise BatchInputError(f"{flag} {given} does not exist; give a mask image, or a folder of masks named as "
                                  "the images")
        for task in tasks:
            if getattr(task, key) is not None:
                continue
            mask = given / task.path.name if given.is_dir() else given
            if not mask.is_file():
                raise BatchInputError(f"{flag} {given} has no mask for {task.path.name} (expected {mask}); add it, "
                                      "or give one mask file for every image")
            setattr(task, key, mask)
    for task in tasks:
        task.masks = mask_digest(task.keep_mask, task.edit_mask)


def mask_digest(keep: Path | None, edit: Path | None) -> str:
    """The content of an image's keep and edit masks (sha256, 16 hex), "" without masks: recorded in
    its rows, so that a rerun redoes an image whose mask files changed instead of calling it done."""
    if keep is None and edit is None:
        return ""
    h = hashlib.sha256()
    for kind, path in (("keep", keep), ("edit", edit)):
        h.update(kind.encode())
        if path is not None:
            try:
                h.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError:
                h.update(b"unreadable")  # the image fails with the mask's own error when it is run
    return h.hexdigest()[:16]


def read_image_folder(folder, prompt: str, targets: list[str]) -> list[ImageTask]:
    """Every image file directly in ``folder`` (sorted), each with ``prompt`` and every target."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BatchInputError(f"--images {folder} is not a folder")
    if not prompt or not prompt.strip():
        raise BatchInputError("--images needs --prompt, the source caption of every image")
    if not targets:
        raise BatchInputError("--images needs at least one --target (an edited caption)")
    if len(set(targets)) != len(targets):
        raise BatchInputError(f"--target lists a caption twice ({targets}); give each once")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchInputError(f"--images {folder} holds no {', '.join(IMAGE_SUFFIXES)} files")
    tasks = [ImageTask(image_id(p.name), p.absolute(), prompt.strip(), [PlannedEdit(t, t) for t in targets])
             for p in files]
    _check_unique(tasks, f"--images {folder}")
    return tasks
