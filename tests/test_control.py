"""Prompt-to-prompt control tensors against hand-worked expectations and a transliteration of
google/prompt-to-prompt's seq_aligner (global_align / get_aligned_sequences / get_mapper)."""
import numpy as np
import pytest

from prism_rt.config import ControlConfig
from prism_rt.control import (
    ControlPlan, build_control_plan, blend_token_weights, cross_alpha_schedule, default_edit_words,
    equalizer, refinement_alignment, refinement_matrix, replacement_mapper, self_replace_schedule,
)
from prism_rt.errors import PromptError, SettingsError
from prism_rt.tokenizer import ClipTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ClipTokenizer:
    from prism_export.clip_vocab import write_clip_tokenizer_files

    return ClipTokenizer.from_folder(write_clip_tokenizer_files(tmp_path_factory.mktemp("tok")))


def ident_from(start: int, stop: int = 77) -> list[int]:
    return list(range(start, stop))


# ---- p2p's seq_aligner, transliterated (torch → numpy), as an independent reference ------------
def p2p_global_align(x, y, gap=0, match=1, mismatch=-1):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def p2p_get_aligned_sequences(x, y, trace_back):
    x_seq, y_seq = [], []
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            x_seq.append(x[i - 1])
            y_seq.append(y[j - 1])
            i = i - 1
            j = j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            x_seq.append("-")
            y_seq.append(y[j - 1])
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            x_seq.append(x[i - 1])
            y_seq.append("-")
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return x_seq, y_seq, np.array(mapper_y_to_x, dtype=np.int64).reshape(-1, 2)


def p2p_get_mapper(x_seq, y_seq, max_len=77):
    _, trace_back = p2p_global_align(x_seq, y_seq)
    mapper_base = p2p_get_aligned_sequences(x_seq, y_seq, trace_back)[-1]
    alphas = np.ones(max_len, dtype=np.float32)
    alphas[: mapper_base.shape[0]] = (mapper_base[:, 1] != -1).astype(np.float32)
    mapper = np.zeros(max_len, dtype=np.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + np.arange(max_len - len(y_seq))
    return mapper, alphas


# ---- refinement alignment, worked by hand ---------------------------------------------------
def test_with_to_without_is_deletion_plus_insertion(tok):
    # 0 bos 1 chest 2 x 3 - 4 ray 5 of 6 a 7 patient 8 with|without 9 support 10 devices 11 eos
    src = tok.encode("chest x-ray of a patient with support devices")
    tgt = tok.encode("chest x-ray of a patient without support devices")
    assert src[8] == 593 and tgt[8] == 2193 and len(src) == len(tgt) == 12
    # DP: after the 8 common tokens, cell (with, without): left = 8, up = 8, diag = 8 - 1 = 7, so
    # with gap 0 the substitution loses; the tie left == up prefers left: "without" is an insertion
    # (-1), then at (with, patient) up = 8 beats left = 7 and diag = 6: "with" is deleted.
    mapper, alpha = refinement_alignment(src, tgt)
    assert mapper.dtype == np.int64 and alpha.dtype == np.float32 and mapper.shape == alpha.shape == (77,)
    assert mapper.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, 9, 10, 11] + ident_from(12)
    assert alpha.tolist() == [1.0] * 8 + [0.0] + [1.0] * 68


def test_insertion(tok):
    src = tok.encode("chest x-ray")  # bos chest x - ray eos
    tgt = tok.encode("chest x-ray showing pleural effusion")  # ... ray showing ple ural ef fusion eos
    assert len(src) == 6 and len(tgt) == 11
    mapper, alpha = refinement_alignment(src, tgt)
    assert mapper.tolist() == [0, 1, 2, 3, 4, -1, -1, -1, -1, -1, 5] + ident_from(11)
    assert alpha.tolist() == [1.0] * 5 + [0.0] * 5 + [1.0] * 67


def test_deletion(tok):
    src = tok.encode("chest x-ray showing pleural effusion")
    tgt = tok.encode("chest x-ray")
    mapper, alpha = refinement_alignment(src, tgt)
    assert mapper.tolist() == [0, 1, 2, 3, 4, 10] + ident_from(6)  # eos ← source eos
    assert alpha.tolist() == [1.0] * 77


def test_duplicate_token_tie_prefers_left():
    # x = [S, A, E], y = [S, A, A, E]: at (x[:2], y[:3]) left = 2 == diag = 1 + 1, left wins, so the
    # *second* A is the inserted one and the first maps to source 1.
    mapper, alpha = refinement_alignment([7, 5, 9], [7, 5, 5, 9], max_len=6)
    assert mapper.tolist() == [0, 1, -1, 2, 4, 5]
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1]


def test_alignment_matches_p2p_transliteration():
    rng = np.random.default_rng(0)
    for trial in range(24):
        alphabet = 4 if trial % 2 else 12  # small alphabets make ties common
        body = rng.integers(0, alphabet, size=rng.integers(0, 20)).tolist()
        if trial % 3 == 0:  # an edited copy: substitute, insert, delete
            other = list(body)
            for _ in range(3):
                op, pos = rng.integers(0, 3), int(rng.integers(0, len(other) + 1))
                if op == 0 and pos < len(other):
                    other[pos] = int(rng.integers(0, alphabet))
                elif op == 1:
                    other.insert(pos, int(rng.integers(0, alphabet)))
                elif other and pos < len(other):
                    del other[pos]
        else:
            other = rng.integers(0, alphabet, size=rng.integers(0, 20)).tolist()
        x, y = [100] + body + [101], [100] + other + [101]
        mapper, alpha = refinement_alignment(x, y)
        ref_mapper, ref_alpha = p2p_get_mapper(x, y)
        np.testing.assert_array_equal(mapper, ref_mapper, err_msg=f"{x} → {y}")
        np.testing.assert_array_equal(alpha, ref_alpha, err_msg=f"{x} → {y}")


def test_refinement_matrix_gathers():
    mapper = np.array([0, 1, -1, 2, 4, 5])
    alpha = np.array([1, 1, 0, 1, 1, 1], dtype=np.float32)
    m = refinement_matrix(mapper, alpha)
    expected = np.zeros((6, 6), dtype=np.float32)
    for i, j in [(0, 0), (1, 1), (2, 3), (4, 4), (5, 5)]:
        expected[i, j] = 1
    np.testing.assert_array_equal(m, expected)
    a0 = np.random.default_rng(1).random((3, 6)).astype(np.float32)
    np.testing.assert_allclose((a0 @ m)[:, [0, 1, 3, 4, 5]], a0[:, [0, 1, 2, 4, 5]])


def test_too_long_ids():
    with pytest.raises(PromptError, match="78 tokens"):
        refinement_alignment(list(range(78)), [1, 2])


# ---- word swap -----------------------------------------------------------------------------
def test_replacement_one_token_swap(tok):
    m = replacement_mapper("chest x-ray showing mild effusion", "chest x-ray showing severe effusion", tok)
    assert m.dtype == np.float32 and m.shape == (77, 77)
    np.testing.assert_array_equal(m, np.eye(77, dtype=np.float32))  # mild (6) → severe (6)


def test_replacement_fewer_target_tokens(tok):
    # source: 6..9 pneu mo thor ax, 10 with, 11 tubes, 12 eos; target: 6 fracture, 7 with, 8 tubes, 9 eos
    m = replacement_mapper("chest x-ray showing pneumothorax with tubes", "chest x-ray showing fracture with tubes", tok)
    expected = np.zeros((77, 77), dtype=np.float32)
    for r in range(6):
        expected[r, r] = 1
    expected[6:10, 6] = 1.0  # ratio 1 / len(target tokens) = 1
    for d in range(67):  # aligned pairs after the swap: (10, 7) … (76, 73) (p2p would map (j, j))
        expected[10 + d, 7 + d] = 1
    for j in (74, 75, 76):  # the source's positions ran out: target columns map (j, j)
        expected[j, j] = 1
    np.testing.assert_array_equal(m, expected)


def test_replacement_fractional(tok):
    # source: 6 fracture, 7 with, 8 tubes; target: 6..9 pneu mo thor ax, 10 with, 11 tubes
    m = replacement_mapper("chest x-ray showing fracture with tubes", "chest x-ray showing pneumothorax with tubes", tok)
    expected = np.zeros((77, 77), dtype=np.float32)
    for r in range(6):
        expected[r, r] = 1
    expected[6, 6:10] = 0.25
    for d in range(67):  # (7, 10) … (73, 76)
        expected[7 + d, 10 + d] = 1
    np.testing.assert_array_equal(m, expected)
    # 2 source tokens (ef fusion) onto 4 target tokens: every source token to each target token, 1/4
    m2 = replacement_mapper("chest x-ray showing effusion", "chest x-ray showing cardiomegaly", tok)
    np.testing.assert_array_equal(m2[6:8, 6:10], np.full((2, 4), 0.25, dtype=np.float32))
    assert m2[8, 10] == 1 and m2[74, 76] == 1 and m2[:, 10:].sum() == 67


def test_replacement_needs_same_word_count(tok):
    with pytest.raises(PromptError, match="same number of words.*5.*4"):
        replacement_mapper("chest x-ray showing pleural effusion", "chest x-ray showing cardiomegaly", tok)


# ---- words, equalizer, schedules, blend ------------------------------------------------------
def test_default_edit_words():
    assert default_edit_words("chest x-ray of a patient with support devices",
                              "Chest X-ray of a patient without support devices") == ("without",)
    assert default_edit_words("Chest X-ray showing Support Devices",
                              "Chest X-ray showing Pleural Effusion, Support Devices") == ("Pleural", "Effusion,")
    assert default_edit_words("chest x-ray", "chest x-ray") == ()


def test_equalizer_multi_token_word(tok):
    # 0 bos 1 chest 2 x 3 - 4 ray 5 showing 6 ple 7 ural 8 ef 9 fusion 10 eos
    eq = equalizer(tok, "chest x-ray showing pleural effusion", ["x-ray", "effusion"], 2.0)
    expected = np.ones(77, dtype=np.float32)
    expected[[2, 3, 4, 8, 9]] = 2.0
    assert eq.dtype == np.float32
    np.testing.assert_array_equal(eq, expected)
    np.testing.assert_array_equal(equalizer(tok, "chest x-ray", "lung", 2.0), np.ones(77))


def test_cross_alpha_and_self_schedules():
    a = cross_alpha_schedule(50, 0.8, 3)
    assert a.shape == (50, 3, 77) and a.dtype == np.float32
    assert (a[:40] == 1).all() and (a[40:] == 0).all()
    s = self_replace_schedule(50, [0.4, 0.8, 0.0, 1.0])
    assert s.shape == (50, 4) and s.dtype == np.float32
    assert s[:, 0].tolist() == [1.0] * 20 + [0.0] * 30
    assert s[:, 1].tolist() == [1.0] * 40 + [0.0] * 10
    assert s[:, 2].sum() == 0 and s[:, 3].sum() == 50
    assert cross_alpha_schedule(10, 0.25, 1)[:, 0, 0].tolist() == [1, 1] + [0] * 8  # int(2.5) = 2


def test_blend_token_weights(tok):
    w = blend_token_weights(tok, "chest x-ray showing pleural effusion", "effusion")
    expected = np.zeros(77, dtype=np.float32)
    expected[[8, 9]] = 1
    np.testing.assert_array_equal(w, expected)
    with pytest.raises(PromptError, match="'devices' is not in the prompt"):
        blend_token_weights(tok, "chest x-ray", "devices")


# ---- plans ---------------------------------------------------------------------------------
SOURCE = "Chest X-ray showing Support Devices"
TARGETS = ["Chest X-ray showing Pleural Effusion, Support Devices", "Chest X-ray showing Cardiomegaly, Support Devices"]


def test_plan_shapes_order_and_names(tok):
    config = ControlConfig(self_replace=(0.4, 0.5, 0.6), blend_words=("Devices", "Devices"))
    plan = build_control_plan(tok, SOURCE, TARGETS, config, steps=50)
    assert [(i.edit_index, i.self_replace, i.name) for i in plan.items] == [
        (0, 0.4, "edit-1-s0.40"), (0, 0.5, "edit-1-s0.50"), (0, 0.6, "edit-1-s0.60"),
        (1, 0.4, "edit-2-s0.40"), (1, 0.5, "edit-2-s0.50"), (1, 0.6, "edit-2-s0.60")]
    assert plan.items[3].target == TARGETS[1]
    assert plan.token_mapper.shape == (6, 77, 77) and plan.refine_alpha.shape == (6, 77)
    assert plan.equalizer.shape == (6, 77) and plan.cross_alpha.shape == (50, 6, 77)
    assert plan.self_replace.shape == (50, 6) and plan.blend_words.shape == (7, 77)
    assert plan.edit_words == (("Pleural", "Effusion,"), ("Cardiomegaly,",))
    # target 1: 0 bos 1 chest 2 x 3 - 4 ray 5 showing 6 ple 7 ural 8 ef 9 fusion 10 , 11 support 12 devices 13 eos
    # source:   0 bos 1 chest 2 x 3 - 4 ray 5 showing 6 support 7 devices 8 eos
    assert plan.refine_alpha[0].tolist() == [1.0] * 6 + [0.0] * 5 + [1.0] * 66
    expected_m = np.zeros((77, 77), dtype=np.float32)
    for i, j in [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 11), (7, 12), (8, 13)] + [(j, j) for j in range(14, 77)]:
        expected_m[i, j] = 1
    np.testing.assert_array_equal(plan.token_mapper[0], expected_m)
    np.testing.assert_array_equal(plan.token_mapper[2], expected_m)
    expected_eq = np.ones(77, dtype=np.float32)
    expected_eq[[6, 7, 8, 9, 10]] = 2.0
    np.testing.assert_array_equal(plan.equalizer[1], expected_eq)
    # target 2: 6..9 cardi ome gal y, 10 ",": edit word "Cardiomegaly," → 6..10
    assert np.nonzero(plan.equalizer[4] == 2.0)[0].tolist() == [6, 7, 8, 9, 10]
    assert plan.self_replace[:, 0].sum() == 20 and plan.self_replace[:, 5].sum() == 30
    assert (plan.cross_alpha[:40] == 1).all() and (plan.cross_alpha[40:] == 0).all()
    assert np.nonzero(plan.blend_words[0])[0].tolist() == [7]
    assert np.nonzero(plan.blend_words[1])[0].tolist() == [12]

    sub = plan.subset([1, 4])
    assert isinstance(sub, ControlPlan) and [i.name for i in sub.items] == ["edit-1-s0.50", "edit-2-s0.50"]
    assert sub.token_mapper.shape == (2, 77, 77) and sub.cross_alpha.shape == (50, 2, 77)
    np.testing.assert_array_equal(sub.self_replace, plan.self_replace[:, [1, 4]])
    np.testing.assert_array_equal(sub.blend_words, plan.blend_words[[0, 2, 5]])
    assert sub.edit_words == plan.edit_words


def test_plan_legacy_and_options(tok):
    plan = build_control_plan(tok, SOURCE, TARGETS[:1], ControlConfig(legacy=True, blend_words=("Devices", "Devices")), 50)
    assert len(plan.items) == 5
    assert not plan.cross_alpha.any() and not plan.self_replace.any() and plan.blend_words is None
    plan = build_control_plan(tok, SOURCE, TARGETS[:1], ControlConfig(edit_weight=None, self_replace=(0.5,)), 10)
    assert (plan.equalizer == 1).all() and plan.blend_words is None and plan.cross_alpha.shape == (10, 1, 77)
    plan = build_control_plan(tok, SOURCE, TARGETS, ControlConfig(edit_words=("effusion",), self_replace=(0.5,)), 10)
    assert plan.edit_words == (("effusion",), ())
    assert np.nonzero(plan.equalizer[0] != 1)[0].tolist() == [8, 9] and (plan.equalizer[1] == 1).all()
    same = build_control_plan(tok, SOURCE, [SOURCE], ControlConfig(self_replace=(0.5,)), 10)
    assert same.edit_words == ((),) and (same.equalizer == 1).all()
    np.testing.assert_array_equal(same.token_mapper[0], np.eye(77))


def test_plan_replace_mode(tok):
    config = ControlConfig(mode="replace", self_replace=(0.4,))
    plan = build_control_plan(tok, "chest x-ray showing fracture with tubes",
                              ["chest x-ray showing pneumothorax with tubes"], config, 50)
    assert (plan.refine_alpha == 1).all()
    assert plan.token_mapper[0, 6, 6:10].tolist() == [0.25] * 4
    with pytest.raises(PromptError, match="same number of words"):
        build_control_plan(tok, SOURCE, TARGETS, config, 50)


def test_plan_errors(tok):
    config = ControlConfig()
    with pytest.raises(PromptError, match="no edit prompts"):
        build_control_plan(tok, SOURCE, [], config, 50)
    with pytest.raises(PromptError, match="the prompt is empty"):
        build_control_plan(tok, SOURCE, ["  "], config, 50)
    with pytest.raises(PromptError, match="limit of 77"):
        build_control_plan(tok, SOURCE, [SOURCE + " and" * 80], config, 50)
    with pytest.raises(PromptError, match="limit of 77"):
        build_control_plan(tok, "chest" + " x" * 80, TARGETS, config, 50)
    with pytest.raises(PromptError, match="appear in none"):
        build_control_plan(tok, SOURCE, TARGETS, ControlConfig(edit_words=("efusion",)), 50)
    with pytest.raises(PromptError, match="LocalBlend word 'lung'"):
        build_control_plan(tok, SOURCE, TARGETS, ControlConfig(blend_words=("Devices", "lung")), 50)


def test_an_empty_blend_word_adds_nothing_to_the_mask(tok):
    """A removal's edit has no word for what goes: ("Devices", "") blends with the source's mask
    alone (the edit row is all zero, so blend_mask's union is the source's mask)."""
    import array_api_compat.numpy as xnp

    from prism_rt.blend import blend_mask

    plan = build_control_plan(tok, SOURCE, ["Chest X-ray showing No Finding"], ControlConfig(self_replace=(0.5,),
                              blend_words=("Devices", "")), 10)
    assert np.nonzero(plan.blend_words[0])[0].tolist() == [7] and not plan.blend_words[1].any()
    maps = np.zeros((2, 77, 4, 4), np.float32)
    maps[0, 7, 0, 0] = 1.0  # the source's "devices" attends to one corner
    maps[1, :, 3, 3] = 1.0  # the edit attends elsewhere, to every token
    mask = np.asarray(blend_mask(xnp, maps, plan.blend_words, (4, 4), 0.3))
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1.0  # the corner, 3×3 max-pooled
    np.testing.assert_array_equal(mask[0, 0], expected)
    np.testing.assert_array_equal(mask[1, 0], expected)
    with pytest.raises(SettingsError, match="one of them possibly empty"):
        ControlConfig(blend_words=("", " "))


@pytest.mark.parametrize("bad", [-1, 5, 1.0, True, "1"])
def test_blend_dilation_is_a_whole_number_of_cells(bad):
    assert ControlConfig(blend_dilation=0).blend_dilation == 0
    with pytest.raises(SettingsError, match="blend_dilation"):
        ControlConfig(blend_dilation=bad)
