"""Teacher/student frame alignment: stacking k teacher frames per student frame, edge cases, refusals."""
import numpy as np
import pytest

from distill.data.alignment import IGNORE, AlignmentError, align_labels, default_tolerance, stack_factor


def test_stack_factor_integer_ratios():
    assert stack_factor(50.0, 25.0) == 2
    assert stack_factor(50.0, 12.5) == 4
    assert stack_factor(25.0, 25.0) == 1


@pytest.mark.parametrize("teacher,student", [(50.0, 33.0), (50.0, 100.0), (30.0, 25.0)])
def test_stack_factor_refuses_non_integer_or_slower_teacher(teacher, student):
    with pytest.raises(AlignmentError, match="integer multiple"):
        stack_factor(teacher, student)


def test_exact_match_stacks_consecutive_frames():
    codes = np.arange(12 * 3, dtype=np.uint8).reshape(12, 3)
    out, valid = align_labels(codes, 6, 2, utt_id="u1")
    assert out.shape == (6, 6) and out.dtype == np.int64
    # student frame j holds teacher frames 2j and 2j+1, codebooks contiguous per teacher frame
    np.testing.assert_array_equal(out[1], np.concatenate([codes[2], codes[3]]))
    assert valid.all()


def test_short_labels_are_padded_with_ignore_and_masked():
    codes = np.ones((11, 4), dtype=np.uint8)
    out, valid = align_labels(codes, 6, 2, utt_id="u1")
    assert (out[5, 4:] == IGNORE).all() and (out[5, :4] == 1).all()
    assert valid.sum() == 11 and not valid[5, 1]


def test_long_labels_are_truncated():
    codes = np.arange(15 * 2, dtype=np.uint8).reshape(15, 2)
    out, valid = align_labels(codes, 6, 2, utt_id="u1")
    np.testing.assert_array_equal(out.reshape(12, 2), codes[:12])
    assert valid.all()


def test_float_labels_pad_with_zero_and_mask():
    emb = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float16)
    out, valid = align_labels(emb, 4, 2, utt_id="u1")
    assert out.dtype == np.float32 and out.shape == (4, 10)
    np.testing.assert_allclose(out[3, 5:], 0.0)
    assert valid.sum() == 7


def test_tolerance_boundary():
    k = 2
    tol = default_tolerance(k)
    ok = np.zeros((20 + tol, 1), dtype=np.uint8)
    align_labels(ok, 10, k, utt_id="edge")  # exactly at the tolerance: accepted
    bad = np.zeros((20 + tol + 1, 1), dtype=np.uint8)
    with pytest.raises(AlignmentError, match="edge"):
        align_labels(bad, 10, k, utt_id="edge")
    with pytest.raises(AlignmentError, match="mismatch -"):
        align_labels(np.zeros((20 - tol - 1, 1), np.uint8), 10, k, utt_id="edge")


def test_rejects_non_2d_labels():
    with pytest.raises(AlignmentError, match="u9"):
        align_labels(np.zeros(10, np.uint8), 5, 2, utt_id="u9")
