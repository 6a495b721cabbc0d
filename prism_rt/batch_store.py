"""A batch job's state on disk, crash-safe by construction.

``OUT/`` holds:

``job.json``                 the job's settings and model identity, written once (atomically); a
                             rerun with other settings is refused instead of mixing results
``<image id>/``              one image's ``prism-rt edit`` outputs, published whole
                             (``write_edit_outputs``); its ``result.json`` carries the image's
                             table rows under ``parameters.batch.rows``. An image is *done* iff
                             its folder is published: a kill never leaves half of one
``.failed/<image id>.json``  the rows of an image that failed (retried by a rerun)
``.cache/inversions/*.npz``  inversions keyed by image, model and inversion settings
``results.csv``              rebuilt from the above (staged file + ``os.replace``) after every
                             group and at the end: never a half row, never a duplicate

Nothing is appended in place, so there is nothing to repair after a ``kill -9``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

from .errors import OutputError, PrismError
from .publish import staged_dir, staged_file

JOB_FILE = "job.json"
RESULTS_FILE = "results.csv"
FAILED_DIR = ".failed"
LOCK_FILE = ".batch-lock"
COLUMNS = ("image_id", "path", "source_caption", "target_caption", "edit", "status", "error", "output",
           "selected_file", "files", "reconstruction_error", "invert_s", "edit_s", "inversion", "p_source",
           "p_counterfactual", "masks")
JOB_FORMAT = 1


class JobMismatchError(PrismError):
    """``--out`` holds a batch job run with other settings."""


def model_identity(engine, precision: str) -> dict:
    """What makes two engines give the same inversions: the graphs' hashes where the engine folder
    has them (else the model's absolute path), the precision and the backend."""
    provenance = engine.backend.info.provenance or {}
    graphs = provenance.get("engine_sha256")
    if graphs:
        model = hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest()
    else:
        model = os.path.abspath(engine.model_path)
    return {"model": model, "precision": str(precision), "backend": engine.backend.kind.value}


def inversion_key(image_sha256: str, source_prompt: str, identity: dict, settings: dict) -> str:
    """The cache key of one inversion: image bytes, the caption it was inverted under, the model
    and the inversion settings (method, steps, guidance, fit, null-text settings)."""
    record = {"image": image_sha256, "prompt": source_prompt, "model": identity, "settings": settings}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


class JobStore:
    """Reads and writes one job's ``OUT`` (see the module docstring)."""

    def __init__(self, out, cache=None):
        self.out = Path(os.path.abspath(out))
        self.cache = Path(os.path.abspath(cache)) if cache else self.out / ".cache" / "inversions"
        self.rows: dict[str, list[dict]] = {}  # image id → its rows as on disk: what the table shows

    # -- the job manifest --------------------------------------------------------------------------
    def check_out(self) -> None:
        """``OUT`` is new, empty, or a batch job's folder (it has ``job.json``)."""
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} exists and is not a folder; choose another --out")
        if self.out.is_dir() and not (self.out / JOB_FILE).is_file():
            entries = sorted(e for e in os.listdir(self.out) if not e.startswith("."))
            if entries:
                raise OutputError(f"--out {self.out} is not a prism-rt batch folder (no {JOB_FILE}; it holds "
                                  f"{', '.join(entries[:3])}{', …' if len(entries) > 3 else ''}); give a new or empty folder")

    def claim(self, settings: dict) -> bool:
        """Write ``job.json``, or check it against ``settings``; True if the job is resumed."""
        path = self.out / JOB_FILE
        record = {"format": JOB_FORMAT, **settings}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise JobMismatchError(f"--out {self.out}: {JOB_FILE} cannot be read ({exc}); give a new --out") from None
            old = json.loads(json.dumps(old))
            new = json.loads(json.dumps(record, default=str))
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if differ:
                shown = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in differ[:3])
                raise JobMismatchError(f"--out {self.out} holds a job run with other settings ({shown}); rerun it with "
                                       "the same settings to resume, or give a new --out (--cache OLD/.cache/inversions "
                                       "reuses its inversions)")
            return True
        self.out.mkdir(parents=True, exist_ok=True)
        with staged_file(path, flag="--out") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str))
        return False

    def lock(self) -> None:
        """Hold ``OUT/.batch-lock`` (flock) for the process's life: a second job on the same ``OUT``
        at the same time is refused; the kernel frees it whenever the holder dies, even by SIGKILL.
        The file names the holder (pid, host and a token of this run, for :meth:`held_by`)."""
        import fcntl
        import socket
        import uuid

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            raise OutputError(f"--out {self.out} is in use by another prism-rt batch job (pid "
                              f"{' on '.join(holder[:2]) or 'unknown'}); wait for it or give another --out") from None
        self.token = f"{os.getpid()} {socket.gethostname()} {uuid.uuid4().hex}"
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.token}\n".encode())
        self._lock_fd = fd  # kept open: closing it would release the lock

    def held_by(self, token: str) -> bool:
        """Whether the run that took the lock with ``token`` still holds it: a Ray actor asks before
        each group, so that actors outliving a killed driver stop instead of writing beside a rerun."""
        import fcntl

        try:
            fd = os.open(self.out / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return False
        try:
            if os.read(fd, 200).decode(errors="replace").strip() != token:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # locked, and by the run that wrote the token
            return False  # nobody holds it: that run is gone
        finally:
            os.close(fd)

    def unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    # -- per-image state ---------------------------------------------------------------------------
    def folder(self, image_id: str) -> Path:
        return self.out / image_id

    def scan(self, image_ids: list[str]) -> set[str]:
        """Read what earlier runs left (once, at the start); returns the ids already done."""
        done = set()
        for image_id in image_ids:
            rows = self.done_rows(image_id)
            if rows is not None:
                done.add(image_id)
            else:
                rows = self.failed_rows(image_id)
            if rows is not None:
                self.rows[image_id] = rows
        return done

    def finished(self, image_id: str, rows: list[dict]) -> None:
        """An image's folder was published with these rows; an earlier failure of it is void."""
        self.rows[image_id] = rows
        try:
            os.unlink(self.out / FAILED_DIR / f"{image_id}.json")
        except FileNotFoundError:
            pass

    def done_rows(self, image_id: str) -> list[dict] | None:
        """The rows of a finished (published) image, or None."""
        try:
            record = json.loads((self.folder(image_id) / "result.json").read_text())
            return list(record["parameters"]["batch"]["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def failed_rows(self, image_id: str) -> list[dict] | None:
        try:
            return list(json.loads((self.out / FAILED_DIR / f"{image_id}.json").read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_failure(self, image_id: str, rows: list[dict]) -> None:
        with staged_file(self.out / FAILED_DIR / f"{image_id}.json", flag="--out") as tmp:
            tmp.write_text(json.dumps({"rows": rows}, indent=2, default=str))
        self.rows[image_id] = rows

    def publish_skipped(self, image_id: str, batch: dict) -> None:
        """An image none of whose edits apply: a folder with its ``result.json`` (rows) only."""
        with staged_dir(self.folder(image_id)) as stage:
            record = {"parameters": {"batch": batch}, "files": ["result.json"],
                      "notes": {"batch": "no requested edit applies to this image; see the rows' errors"}}
            (stage / "result.json").write_text(json.dumps(record, indent=2, default=str))
        self.finished(image_id, batch["rows"])

    def cache_path(self, key: str) -> Path:
        return self.cache / f"{key}.npz"

    # -- the table -------------------------------------------------------------------------------
    def write_table(self, image_ids: list[str]) -> tuple[Path, list[dict]]:
        """Rebuild ``results.csv`` from every finished or failed image (as :meth:`scan` read them
        and this run wrote them), in the job's order."""
        rows = [row for image_id in image_ids for row in self.rows.get(image_id, [])]
        path = self.out / RESULTS_FILE
        with staged_file(path, flag="--out") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
        return path, rows
