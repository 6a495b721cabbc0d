"""ClipTokenizer: ids equal transformers' CLIPTokenizer on both loading paths; word → token positions."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prism_rt.errors import ModelError, PromptError
from prism_rt.tokenizer import ClipTokenizer

CAPTIONS = [
    "chest x-ray showing support devices",
    "Chest X-ray showing Pleural Effusion, Support Devices",
    "Normal chest X-ray with no significant findings",
    "CHEST X-RAY SHOWING CARDIOMEGALY",
    "chest x-ray of a patient without support devices!",
    "T12 fracture; 3 lines, 2 tubes (right-sided)",
    "patient's heart isn't enlarged -- it's 15.5 cm",
    "  extra   spaces\tand\nnewlines  ",
    "naïve café résumé",
    "Lung Opacity/Consolidation & Edema: 100% sure?",
    "x",
]


@pytest.fixture(scope="session")
def vocab_folder(tmp_path_factory) -> Path:
    """vocab.json + merges.txt (+ configs), as a diffusers tokenizer/ folder of SD v1.5 holds."""
    from prism_export.clip_vocab import write_clip_tokenizer_files

    return write_clip_tokenizer_files(tmp_path_factory.mktemp("tok-vocab"))


@pytest.fixture(scope="session")
def json_folder(vocab_folder, tmp_path_factory) -> Path:
    """tokenizer.json (+ tokenizer_config.json) as transformers saves it."""
    from transformers import CLIPTokenizer

    out = tmp_path_factory.mktemp("tok-json")
    CLIPTokenizer.from_pretrained(vocab_folder).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reference(vocab_folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(vocab_folder)


@pytest.fixture(scope="session")
def tok(vocab_folder) -> ClipTokenizer:
    return ClipTokenizer.from_folder(vocab_folder)


def test_hand_checked_ids(tok):
    assert tok.encode("chest x-ray showing support devices") == [49406, 10563, 343, 268, 3077, 3649, 1425, 9067, 49407]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49406, 49407, 49407, 77)


def test_both_loading_paths_equal_transformers(vocab_folder, json_folder, reference):
    assert (json_folder / "tokenizer.json").is_file() and not (json_folder / "vocab.json").exists()
    from_vocab = ClipTokenizer.from_folder(vocab_folder)
    from_json = ClipTokenizer.from_folder(json_folder)
    for caption in CAPTIONS:
        expected = reference(caption)["input_ids"]
        assert from_vocab.encode(caption) == expected, caption
        assert from_json.encode(caption) == expected, caption
    assert from_json.pad_id == from_vocab.pad_id == 49407


def test_pad_token_from_config(vocab_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_folder / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    tok = ClipTokenizer.from_folder(tmp_path)
    assert tok.pad_id == 0  # "!" is the first byte symbol (SD 2's convention)
    assert tok.encode_batch_padded(["chest"])[0].tolist() == [49406, 10563, 49407] + [0] * 74


def test_bad_folders(tmp_path):
    with pytest.raises(ModelError, match="nope"):
        ClipTokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(ModelError, match="neither tokenizer.json"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(tmp_path.name)):
        ClipTokenizer.from_folder(tmp_path)


def test_encode_batch_padded(tok, reference):
    ids = tok.encode_batch_padded(["chest x-ray showing support devices", "Chest X-ray showing Cardiomegaly"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    expected = reference(["chest x-ray showing support devices", "Chest X-ray showing Cardiomegaly"],
                         padding="max_length", max_length=77)["input_ids"]
    np.testing.assert_array_equal(ids, np.array(expected))
    assert ids[0, :10].tolist() == [49406, 10563, 343, 268, 3077, 3649, 1425, 9067, 49407, 49407]
    assert tok.encode_batch_padded([""], allow_empty=True)[0, :3].tolist() == [49406, 49407, 49407]


def test_empty_and_long_prompts(tok):
    for empty in ("", "   \t\n"):
        with pytest.raises(PromptError, match="the prompt is empty; give a caption such as"):
            tok.encode_batch_padded([empty])
    exact = " ".join(["chest"] * 75)  # 75 words + bos + eos = 77: fits
    assert tok.encode_batch_padded([exact]).shape == (1, 77)
    with pytest.raises(PromptError, match=r"78 tokens.*limit of 77.*truncate"):
        tok.encode_batch_padded(["chest x-ray", exact + " chest"])


def test_words_and_token_indices(tok):
    text = "Chest X-ray showing Pleural Effusion, Support Devices"
    # 0 bos, 1 chest, 2 x, 3 -, 4 ray, 5 showing, 6 ple, 7 ural, 8 ef, 9 fusion, 10 ",", 11 support, 12 devices
    assert tok.words(text) == ["Chest", "X-ray", "showing", "Pleural", "Effusion,", "Support", "Devices"]
    assert tok.word_token_indices(text, "x-ray") == [2, 3, 4]
    assert tok.word_token_indices(text, "X-RAY") == [2, 3, 4]
    assert tok.word_token_indices(text, 1) == [2, 3, 4]
    assert tok.word_token_indices(text, -1) == [12]
    assert tok.word_token_indices(text, "pleural") == [6, 7]
    assert tok.word_token_indices(text, "Effusion,") == [8, 9, 10]
    assert tok.word_token_indices(text, "effusion") == [8, 9]  # punctuation-stripped fallback
    assert tok.word_token_indices(text, "ray") == []  # part of a word is not a word
    assert tok.word_token_indices("a chest and a  chest", "chest") == [2, 5]
    with pytest.raises(PromptError, match="out of range"):
        tok.word_token_indices(text, 7)


def test_decode(tok):
    assert tok.decode(tok.encode("Chest X-ray showing Pleural Effusion")) == "chest x - ray showing pleural effusion"
