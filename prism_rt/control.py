"""Prompt-to-prompt's control tensors, computed on the host in numpy (PRISM_METHOD §5).

Prompt-to-prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention
Control"; code: google/prompt-to-prompt, ``seq_aligner.py`` and ``ptp_utils.py``) edits an image by
replacing the attention maps of the edited prompts with the source prompt's. The controlled UNet
takes that control as small input tensors (ARCHITECTURE.md, "controlled UNet") so that
``A_k ← a·eq·(r·(A_0 M_k) + (1−r)·A_k) + (1−a)·A_k``; this module computes ``M_k`` (token_mapper),
``r`` (refine_alpha), ``eq`` (equalizer), ``a`` (cross_alpha), the self-attention windows and
LocalBlend's token weights, reproducing the published code's semantics.

Deliberate deviations from the published code:
- ``replacement_mapper``: after the last swapped word p2p sets ``mapper[j, j]``, which misaligns
  every later token when the swapped words have different token counts (source row j is no longer
  the token aligned with target column j). Here the aligned ``(i, j)`` pairs are mapped, and target
  columns left once the source's 77 positions are used up map ``(j, j)``. With equal token counts
  the result is p2p's.
- ``cross_alpha_schedule`` has ``steps`` rows with window ``int(c·steps)``; p2p allocates
  ``steps + 1`` rows and uses ``int(c·(steps + 1))``. The two agree for PRISM's 50 steps and
  windows that are multiples of 1/50 (0.8 → the first 40 steps either way).
- Words are found through the tokenizer's character offsets and any whitespace (see
  ``ClipTokenizer.word_token_indices``), not by decoding and counting characters after
  ``split(" ")``.
- A configured edit word found in none of the targets is a PromptError (p2p silently reweights
  nothing, which hides a typo).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import ControlConfig
from .errors import PromptError, SettingsError
from .tokenizer import MAX_LENGTH, ClipTokenizer

# global alignment scores of seq_aligner.get_refinement_mapper: ScoreParams(gap=0, match=1, mismatch=-1)
GAP, MATCH, MISMATCH = 0, 1, -1
_LEFT, _UP, _DIAG = 1, 2, 3  # seq_aligner's traceback codes


def _check_len(ids: Sequence[int], max_len: int, what: str) -> None:
    if len(ids) > max_len:
        raise PromptError(f"the {what} prompt has {len(ids)} tokens, more than the limit of {max_len}; shorten it")


def refinement_alignment(source_ids: Sequence[int], target_ids: Sequence[int],
                         max_len: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """``seq_aligner.get_refinement_mapper`` for one pair: (mapper int64 [max_len], refine_alpha f32).

    Needleman–Wunsch over the unpadded ids (with bos/eos), gap 0, match +1, mismatch −1; ties
    prefer left (a token inserted in the target), then up (a source token deleted), then the
    diagonal. ``mapper[j]`` is the source position aligned with target token j, −1 for an
    inserted token (``refine_alpha`` 0 there: the edit keeps its own attention for new words);
    positions past the target's end map to themselves. With gap 0 a changed word is cheaper as
    deletion + insertion than as a substitution, so "with" → "without" is new, not mapped.
    """
    x, y = [int(t) for t in source_ids], [int(t) for t in target_ids]
    _check_len(x, max_len, "source")
    _check_len(y, max_len, "target")
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    score[0, 1:] = np.arange(1, m + 1) * GAP
    score[1:, 0] = np.arange(1, n + 1) * GAP
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    trace[0, 1:], trace[1:, 0] = _LEFT, _UP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i, j - 1] + GAP
            up = score[i - 1, j] + GAP
            diag = score[i - 1, j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = _LEFT if best == left else _UP if best == up else _DIAG
    source_of = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if trace[i, j] == _DIAG:
            i, j = i - 1, j - 1
            source_of[j] = i
        elif trace[i, j] == _LEFT:
            j -= 1
            source_of[j] = -1
        else:
            i -= 1
    mapper = np.arange(max_len, dtype=np.int64)
    mapper[:m] = source_of
    refine_alpha = (mapper != -1).astype(np.float32)
    return mapper, refine_alpha


def refinement_matrix(mapper: np.ndarray, refine_alpha: np.ndarray) -> np.ndarray:
    """The one-hot [77, 77] matrix M with ``(A_0 · M)[q, j] = A_0[q, mapper[j]]`` where r = 1.

    p2p gathers ``attn_base[..., mapper]``; a matmul with M is the same where ``refine_alpha`` is 1
    (columns of inserted tokens are 0, and ``r = 0`` drops them anyway) and runs inside a graph.
    """
    mapper, refine_alpha = np.asarray(mapper), np.asarray(refine_alpha)
    n = mapper.shape[0]
    matrix = np.zeros((n, n), dtype=np.float32)
    cols = np.nonzero((refine_alpha == 1) & (mapper >= 0) & (mapper < n))[0]
    matrix[mapper[cols], cols] = 1.0
    return matrix


def replacement_mapper(source: str, target: str, tokenizer: ClipTokenizer, max_len: int = MAX_LENGTH) -> np.ndarray:
    """``seq_aligner.get_replacement_mapper_`` (word swap): float32 [max_len, max_len].

    Prompts must have the same number of words. A swapped word maps its source token(s) onto the
    target token(s): one-to-one when the counts are equal, else every source token to each target
    token with weight 1/len(target tokens) (a word's attention is spread over its pieces). Other
    tokens map along the aligned diagonal (see the module docstring for the fix after the last swap).
    """
    for text, what in ((source, "source"), (target, "target")):
        _check_len(tokenizer.check_prompt(text), max_len, what)
    words_x, words_y = tokenizer.words(source), tokenizer.words(target)
    if len(words_x) != len(words_y):
        raise PromptError(
            f"a word-swap (replace) edit needs prompts with the same number of words, but the source has "
            f"{len(words_x)} and the target {len(words_y)} ({source!r} → {target!r}); use mode 'refine'")
    swapped = [k for k in range(len(words_y)) if words_x[k] != words_y[k]]
    inds_source = [tokenizer.word_token_indices(source, k) for k in swapped]
    inds_target = [tokenizer.word_token_indices(target, k) for k in swapped]
    mapper = np.zeros((max_len, max_len), dtype=np.float32)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(swapped) and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                for t in tgt:
                    mapper[src, t] = 1.0 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        else:
            mapper[i, j] = 1.0
            i += 1
            j += 1
    for jj in range(j, max_len):  # the source's positions ran out first: pad onto pad
        mapper[jj, jj] = 1.0
    return mapper


def default_edit_words(source: str, target: str) -> tuple[str, ...]:
    """The whitespace words of ``target`` not in ``source`` (case-insensitive), in order, once each."""
    known = {w.lower() for w in source.split()}
    out: list[str] = []
    for word in target.split():
        if word.lower() not in known and word.lower() not in (o.lower() for o in out):
            out.append(word)
    return tuple(out)


def equalizer(tokenizer: ClipTokenizer, text: str, words: str | int | Iterable[str | int],
              weight: float, max_len: int = MAX_LENGTH) -> np.ndarray:
    """p2p's ``get_equalizer``: float32 [77], ``weight`` on the tokens of ``words``, else 1."""
    if isinstance(words, (str, int)):
        words = (words,)
    eq = np.ones(max_len, dtype=np.float32)
    for word in words:
        eq[tokenizer.word_token_indices(text, word)] = weight
    return eq


def cross_alpha_schedule(steps: int, cross_replace: float, n_items: int, max_len: int = MAX_LENGTH) -> np.ndarray:
    """p2p's ``get_time_words_attention_alpha`` for a window (0, cross_replace): [steps, n_items, 77].

    Rows ``int(0·steps) <= i < int(cross_replace·steps)`` are 1 (the edit's cross-attention is the
    source's, mapped), the rest 0; the same for every token.
    """
    _check_steps(steps)
    alpha = np.zeros((steps, n_items, max_len), dtype=np.float32)
    alpha[int(0.0 * steps): int(cross_replace * steps)] = 1.0
    return alpha


def self_replace_schedule(steps: int, values: Sequence[float]) -> np.ndarray:
    """[steps, len(values)]: column k is 1 for ``0 <= i < int(steps·values[k])`` (p2p's
    ``num_self_replace``), when the edit's self-attention is the source's."""
    _check_steps(steps)
    out = np.zeros((steps, len(values)), dtype=np.float32)
    for k, value in enumerate(values):
        out[: int(steps * value), k] = 1.0
    return out


def blend_token_weights(tokenizer: ClipTokenizer, text: str, word: str, max_len: int = MAX_LENGTH) -> np.ndarray:
    """LocalBlend's ``alpha_layers`` row: float32 [77], 1 on the tokens of ``word``, else 0; all 0
    for an empty word (that prompt adds nothing to the mask: :func:`prism_rt.blend.blend_mask`)."""
    if not word.strip():
        return np.zeros(max_len, dtype=np.float32)
    inds = tokenizer.word_token_indices(text, word)
    if not inds:
        raise PromptError(f"the LocalBlend word {word!r} is not in the prompt {text!r}; "
                          "blend words must be words of their prompts")
    weights = np.zeros(max_len, dtype=np.float32)
    weights[inds] = 1.0
    return weights


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@dataclass(frozen=True)
class EditItem:
    """One edited branch of the batch: an edit prompt run with one self-attention window (and,
    with a noise blend, one mask threshold)."""

    edit_index: int  # which target (0-based)
    target: str
    self_replace: float
    name: str  # file stem: depends only on the edit, its window and its blend threshold
    blend_threshold: float | None = None  # noise_blend's mask threshold; None without a noise blend
    composite: float | None = None  # the difference composite's threshold; None without one


@dataclass(frozen=True, eq=False)
class ControlPlan:
    """Everything the controlled UNet needs for K edit items (source excluded), per step."""

    items: tuple[EditItem, ...]  # edit-major: for each target, each noise-blend threshold, each self value
    token_mapper: np.ndarray  # [K, 77, 77]
    refine_alpha: np.ndarray  # [K, 77]
    equalizer: np.ndarray  # [K, 77]
    cross_alpha: np.ndarray  # [steps, K, 77]
    self_replace: np.ndarray  # [steps, K]
    blend_words: np.ndarray | None  # [1 + K, 77]: row 0 the source, row 1 + k item k
    edit_words: tuple[tuple[str, ...], ...]  # per target (indexed by EditItem.edit_index)

    def subset(self, indices: Sequence[int]) -> "ControlPlan":
        """The plan restricted to some items (a chunk of the batch); blend row 0 (source) kept.
        ``edit_words`` stays per target, since items keep their ``edit_index``."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.items)):
            raise IndexError(f"item indices {idx.tolist()} out of range for {len(self.items)} items")
        blend = None
        if self.blend_words is not None:
            blend = self.blend_words[np.concatenate([[0], idx + 1])]
        return ControlPlan(
            items=tuple(self.items[k] for k in idx), token_mapper=self.token_mapper[idx],
            refine_alpha=self.refine_alpha[idx], equalizer=self.equalizer[idx],
            cross_alpha=self.cross_alpha[:, idx], self_replace=self.self_replace[:, idx],
            blend_words=blend, edit_words=self.edit_words)


def build_control_plan(tokenizer: ClipTokenizer, source: str, targets: Sequence[str],
                       config: ControlConfig, steps: int) -> ControlPlan:
    """The control tensors for editing ``source`` into each target, for every self window.

    ``config.legacy`` reproduces the published PRISM code, whose hooks never attach: cross and
    self windows all 0 and no LocalBlend, so the edit is a plain prompt swap.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise PromptError("no edit prompts given; pass at least one target caption, "
                          "e.g. 'Chest X-ray showing Pleural Effusion'")
    _check_steps(steps)
    max_len = tokenizer.max_length
    tokenizer.encode_batch_padded([source, *targets])  # empty / over-long prompts → PromptError
    source_ids = tokenizer.encode(source)
    weight = 1.0 if config.edit_weight is None else float(config.edit_weight)

    mappers, alphas, eqs, words_used = [], [], [], []
    for target in targets:
        if config.mode == "replace":
            mappers.append(replacement_mapper(source, target, tokenizer, max_len))
            alphas.append(np.ones(max_len, dtype=np.float32))
        else:
            mapper, alpha = refinement_alignment(source_ids, tokenizer.encode(target), max_len)
            mappers.append(refinement_matrix(mapper, alpha))
            alphas.append(alpha)
        if config.edit_words is None:
            words = default_edit_words(source, target)
        else:
            words = tuple(w for w in config.edit_words if tokenizer.word_token_indices(target, w))
        words_used.append(words)
        eqs.append(equalizer(tokenizer, target, words, weight, max_len))
    if config.edit_words is not None:
        missing = [w for w in config.edit_words if not any(w in used for used in words_used)]
        if missing:
            raise PromptError(f"edit word(s) {missing} appear in none of the edit prompts {targets}; "
                              "edit_words must be words of the targets")

    thresholds = config.noise_blend_threshold if config.noise_blend and not config.legacy else (None,)
    items = tuple(EditItem(e, target, float(s), f"edit-{e + 1}-s{s:.2f}" + (f"-m{m:.2f}" if len(thresholds) > 1 else ""), m)
                  for e, target in enumerate(targets) for m in thresholds for s in config.self_replace)
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise SettingsError(f"self_replace values {config.self_replace} (or noise-blend thresholds {config.noise_blend_threshold}) "
                            "give duplicate output names; use distinct values (two decimals)")
    per_item = np.array([item.edit_index for item in items], dtype=np.int64)
    k = len(items)
    if config.legacy:
        cross = np.zeros((steps, k, max_len), dtype=np.float32)
        self_rep = np.zeros((steps, k), dtype=np.float32)
        blend = None
    else:
        cross = cross_alpha_schedule(steps, config.cross_replace, k, max_len)
        self_rep = self_replace_schedule(steps, [item.self_replace for item in items])
        blend = None
        if config.blend_words is not None:
            source_word, edit_word = config.blend_words
            rows = [blend_token_weights(tokenizer, source, source_word, max_len)]
            rows += [blend_token_weights(tokenizer, item.target, edit_word, max_len) for item in items]
            blend = np.stack(rows)
    return ControlPlan(
        items=items, token_mapper=np.stack(mappers)[per_item], refine_alpha=np.stack(alphas)[per_item],
        equalizer=np.stack(eqs)[per_item], cross_alpha=cross, self_replace=self_rep,
        blend_words=blend, edit_words=tuple(words_used))
