"""Rewrite a pure-Python wheel without the subpackages of one folder that a job never imports.

    python benchmarks/prune_wheel.py WHEEL PACKAGE/FOLDER KEEP [KEEP …]

e.g. ``transformers-….whl transformers/models clip auto siglip …``: every ``transformers/models/X/``
except those named is dropped (and its RECORD lines), the wheel rewritten in place. Used by
``prepare_gpu_wheels.sh`` to fit the GPU check into the 64 MiB carried to a GPU machine:
transformers and diffusers load model code lazily by scanning their folders, so a dropped model
is simply absent. Which ones the check needs was found by running it (prism_export.tiny build,
torch engine load, a direct inversion) with the pruned packages first on the path.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def prune(wheel: Path, folder: str, keep: set[str]) -> tuple[int, int]:
    prefix = folder.rstrip("/") + "/"

    def dropped(name: str) -> bool:
        if not name.startswith(prefix):
            return False
        rest = name[len(prefix):]
        return "/" in rest and rest.split("/", 1)[0] not in keep

    tmp = wheel.with_suffix(".pruning")
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python benchmarks/prune_wheel.py WHEEL PACKAGE/FOLDER KEEP [KEEP …]")
    before, after = prune(Path(sys.argv[1]), sys.argv[2], set(sys.argv[3:]))
    print(f"{Path(sys.argv[1]).name}: {before / 2**20:.1f} → {after / 2**20:.1f} MiB")
