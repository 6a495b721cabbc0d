"""CLIP's BPE tokenizer for the runtime, on the ``tokenizers`` library alone (no torch, no
transformers).

Stable Diffusion v1.5 conditions on CLIP ViT-L/14 token ids (Radford et al. 2021): byte-level BPE
over lower-cased, whitespace-normalised text, ``<|startoftext|>`` … ``<|endoftext|>``, padded to
77 with ``<|endoftext|>``. An engine folder's ``tokenizer/`` holds either a ``tokenizer.json``
(loaded as is) or the classic ``vocab.json`` + ``merges.txt``, from which the tokenizer is built
exactly as transformers' ``CLIPConverter`` builds its fast tokenizer, so ids equal
``transformers.CLIPTokenizer``'s.

Prompt-to-prompt (Hertz et al. 2022) addresses *words* of a prompt through their tokens
(``ptp_utils.get_word_inds``). The published code finds them by decoding tokens and counting
characters; here the tokenizer's character offsets are used instead, which cannot drift on
punctuation or multi-token words ("x-ray" → x, -, ray).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelError, PromptError

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
EMPTY_PROMPT_HINT = "the prompt is empty; give a caption such as 'Chest X-ray showing Support Devices'"


def _token_name(value) -> str | None:
    """A special token as written in the configs: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read tokenizer config {path}: {exc}; re-export the engine's tokenizer folder") from exc
    return data if isinstance(data, dict) else {}


def build_clip_tokenizer(vocab_file: Path, merges_file: Path, bos: str = BOS_TOKEN, eos: str = EOS_TOKEN,
                         unk: str = EOS_TOKEN) -> Tokenizer:
    """CLIP's tokenizer from vocab.json + merges.txt, as transformers' ``CLIPConverter`` builds it."""
    vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # transformers registers bos/eos as special added tokens, so a literal "<|endoftext|>" in a
    # prompt is one token there; do the same to keep ids equal on every input.
    tokenizer.add_special_tokens([bos, eos])
    bos_id, eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
    # RobertaProcessing is CLIPConverter's way of adding bos … eos without touching ByteLevel offsets
    tokenizer.post_processor = processors.RobertaProcessing((eos, eos_id), (bos, bos_id), False, False)
    return tokenizer


class ClipTokenizer:
    """CLIP tokenizer: ids with bos/eos, padded batches of 77, and word → token positions."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str | None = None, max_length: int = MAX_LENGTH, source: str = "<memory>"):
        tokenizer.no_truncation()  # a silently truncated caption is an error here, not a feature
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.max_length = int(max_length)
        ids = {}
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token or eos_token)):
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ModelError(f"the tokenizer at {source} has no {role} token {token!r} in its vocabulary; "
                                 "export the CLIP tokenizer of the model again")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def from_folder(cls, path) -> "ClipTokenizer":
        """Load ``tokenizer.json`` if present, else build from ``vocab.json`` + ``merges.txt``."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder {folder} does not exist; pass the model's or engine's tokenizer/ folder")
        config = {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}
        bos = _token_name(config.get("bos_token")) or BOS_TOKEN
        eos = _token_name(config.get("eos_token")) or EOS_TOKEN
        unk = _token_name(config.get("unk_token")) or EOS_TOKEN
        pad = _token_name(config.get("pad_token")) or eos
        max_length = config.get("model_max_length", MAX_LENGTH)
        if not isinstance(max_length, int) or not 2 <= max_length <= MAX_LENGTH:
            max_length = MAX_LENGTH  # transformers writes 1e30 for "unlimited"; CLIP's positions are 77
        try:
            if (folder / "tokenizer.json").is_file():
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                tokenizer = build_clip_tokenizer(folder / "vocab.json", folder / "merges.txt", bos, eos, unk)
            else:
                raise ModelError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt; "
                                 "pass the model's tokenizer/ folder")
        except ModelError:
            raise
        except Exception as exc:  # tokenizers raises plain Exceptions on malformed files
            raise ModelError(f"cannot load the tokenizer in {folder}: {exc}; re-export the tokenizer files") from exc
        return cls(tokenizer, bos, eos, pad, max_length, source=str(folder))

    # ---- ids -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids with bos/eos; no padding, no truncation."""
        return list(self._tokenizer.encode(text).ids)

    def decode(self, ids) -> str:
        """Text of ids, special tokens dropped; "</w>" (CLIP's end of word) read as a space."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace("</w>", " ").strip()

    def check_prompt(self, text: str, allow_empty: bool = False) -> list[int]:
        """The ids of a prompt, or PromptError if it is empty or does not fit CLIP's 77 positions."""
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a string, got {type(text).__name__} {text!r}")
        if not allow_empty and not text.strip():
            raise PromptError(EMPTY_PROMPT_HINT)
        ids = self.encode(text)
        if len(ids) > self.max_length:
            raise PromptError(
                f"the prompt {text[:60]!r}{'…' if len(text) > 60 else ''} has {len(ids)} tokens including "
                f"start/end, more than CLIP's limit of {self.max_length}; CLIP would silently truncate the "
                "caption, so shorten it")
        return ids

    def encode_batch_padded(self, texts, allow_empty: bool = False) -> np.ndarray:
        """int32 [B, 77] ids padded with ``pad_id``; PromptError on an empty or over-long prompt.

        ``allow_empty`` admits "" (the unconditional prompt of classifier-free guidance).
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.check_prompt(t, allow_empty) for t in texts]
        out = np.full((len(rows), self.max_length), self.pad_id, dtype=np.int32)
        for b, ids in enumerate(rows):
            out[b, : len(ids)] = ids
        return out

    # ---- words ---------------------------------------------------------------------------------
    @staticmethod
    def words(text: str) -> list[str]:
        """The whitespace-separated words of a prompt."""
        return text.split()

    def word_token_indices(self, text: str, word: str | int) -> list[int]:
        """Positions (in the bos-prefixed sequence) of the tokens of ``word`` in ``text``.

        ``word`` is a string matched case-insensitively against every whitespace word (all
        occurrences), or an int: the number of the word (0-based, negative from the end).
        A string that matches no whitespace word as written is matched once more with the
        punctuation around the words stripped ("effusion" finds "Effusion,"), taking only the
        tokens inside the stripped span. Unknown words give [] (as p2p's ``get_word_inds``).
        """
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
            if not -len(spans) <= int(word) < len(spans):
                raise PromptError(f"word number {int(word)} is out of range: {text!r} has {len(spans)} words")
            chosen = [spans[int(word)]]
        elif isinstance(word, str):
            key = word.strip().lower()
            chosen = [s for s in spans if text[s[0]:s[1]].lower() == key]
            if not chosen and key:
                for a, b in spans:
                    m = re.search(r"[\w].*[\w]|[\w]", text[a:b])  # the word without leading/trailing punctuation
                    if m and m.group(0).lower() == key:
                        chosen.append((a + m.start(), a + m.end()))
        else:
            raise PromptError(f"a word must be a string or a word number, got {word!r}")
        if not chosen:
            return []
        encoding = self._tokenizer.encode(text)
        out = []
        for pos, ((start, end), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask)):
            if special or end <= start:
                continue
            if any(a <= start < b for a, b in chosen):
                out.append(pos)
        return out
