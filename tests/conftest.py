import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rg1_uncr_path() -> Path:
    """The real CR chest radiograph shipped in PyPI's pydicom-data."""
    import data_store

    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD-v1.5-layout model (random weights, seed 0) saved in the diffusers layout."""
    from prism_export.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def dicom_path() -> Path:
    path = rg1_uncr_path()
    if not path.exists():
        pytest.fail(f"pydicom-data's RG1_UNCR.dcm is missing at {path}; pip install pydicom-data")
    return path


HEAVY_FIRST = ("test_variants.py", "test_export.py", "test_noise_blend.py", "test_pipeline.py", "test_batch.py",
               "test_evaluate.py", "test_attention_reference.py", "test_serve.py", "test_batch_ray.py")
"""Test files that take minutes, in the order they start: with ``-n auto --dist loadfile``
(scripts/test.sh) a long file that starts last would finish alone, long after the others."""


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
