#!/usr/bin/env bash
# Set up and run the test suite (CPU; accelerator tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -n auto: a worker per core, each test file whole on one worker (--dist loadfile: its module fixtures,
# such as an exported engine, are built once); the heaviest files start first (tests/conftest.py)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile "$@"
