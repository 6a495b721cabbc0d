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
