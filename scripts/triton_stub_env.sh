#!/usr/bin/env bash
# A Python environment for Triton's Python stub under `prism-rt serve` (default: .venv/triton-stub).
# nvidia-pytriton 0.7's stub is built with pybind11 2.11, which misreads numpy >= 2 arrays (every
# element becomes the first): the stub needs numpy < 2, while prism-rt itself runs on numpy 2. This
# makes a venv of the same interpreter holding only numpy < 2, with the main environment's
# packages after it on sys.path (a .pth file), so the stub imports pytriton from there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.venv/triton-stub}
MAIN=${MAIN_VENV:-.venv}
BASE=$("$MAIN/bin/python" -c "import sys; print(sys.base_prefix)")
SITE=$("$MAIN/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$BASE/bin/python3" -m venv --without-pip "$OUT"
STUB_SITE=$("$OUT/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$MAIN/bin/python" -m pip install --quiet --no-deps --target "$STUB_SITE" "numpy>=1.21,<2"
echo "$SITE" > "$STUB_SITE/zz_prism_rt_main_env.pth"
"$OUT/bin/python" -c "import numpy, pytriton; assert int(numpy.__version__.split('.')[0]) < 2; print('triton stub env:', numpy.__version__)"
