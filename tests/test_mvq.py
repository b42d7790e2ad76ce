"""MVQ codec (issue 2): shapes/dtypes, error falls with codebooks, batch invariance, seeded determinism,
save -> load identity without pickle, and clear errors on bad input. Small dims keep this to seconds."""
import json

import numpy as np
import pytest
import torch

from distill.codec.quantizer import (MultiCodebookQuantizer, codebook_usage_entropy, relative_reconstruction_error)

DIM = 48
FAST = dict(max_train_frames=4096, kmeans_iters=4, lsq_iters=2, progress=False)


def _frames(n, dim=DIM, seed=0):
    """Anisotropic clustered frames with an offset (like teacher embeddings, not zero-mean white noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, dim)) * 3.0
    scales = np.exp(-np.arange(dim) / 12.0)
    x = centers[rng.integers(0, 8, n)] + rng.normal(size=(n, dim)) * scales + 5.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = _frames(5000, seed=1)
    return x[:4000], x[4000:]


@pytest.fixture(scope="module")
def q4(data):
    return MultiCodebookQuantizer.train(data[0], num_codebooks=4, codebook_size=64, seed=0, **FAST)


def test_round_trip_shapes_and_dtypes(q4, data):
    _, test = data
    codes = q4.encode(test)
    assert codes.shape == (len(test), 4) and codes.dtype == np.uint8
    assert codes.max() < 64
    x_hat = q4.decode(codes)
    assert x_hat.shape == test.shape and x_hat.dtype == np.float32
    err = relative_reconstruction_error(test, x_hat)
    assert 0.0 < err < 0.5, err
    # torch input gives the same codes as numpy input
    assert np.array_equal(q4.encode(torch.from_numpy(test)), codes)
    # zero frames in, zero frames out
    assert q4.encode(np.zeros((0, DIM), np.float32)).shape == (0, 4)


def test_large_codebooks_use_uint16(data):
    q = MultiCodebookQuantizer.train(data[0][:1500], num_codebooks=1, codebook_size=512, seed=0, **FAST)
    codes = q.encode(data[1][:300])
    assert codes.dtype == np.uint16 and codes.max() < 512
    assert q.decode(codes).shape == (300, DIM)


def test_error_falls_as_codebooks_are_added(data):
    train, test = data
    errs = []
    for m in (1, 2, 4, 8):
        q = MultiCodebookQuantizer.train(train, num_codebooks=m, codebook_size=32, seed=0, **FAST)
        errs.append(relative_reconstruction_error(test, q.decode(q.encode(test))))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.6 * errs[0], errs


def test_batch_invariance(q4, data):
    """An utterance's codes must not depend on what else is in the batch, where it sits, or the batch size."""
    _, test = data
    utt = test[100:137]
    alone = q4.encode(utt)
    rng = np.random.default_rng(5)
    for start in (0, 3, 250, 255, 256, 700):
        other = rng.normal(size=(start, DIM)).astype(np.float32) * 50  # wildly different neighbours
        tail = rng.normal(size=(rng.integers(0, 400), DIM)).astype(np.float32)
        batch = np.concatenate([other, utt, tail])
        for bs in (1, 256, 300, 8192):
            codes = q4.encode(batch, batch_size=bs)
            assert np.array_equal(codes[start:start + len(utt)], alone), (start, bs)
    # decode is per frame too
    assert np.array_equal(q4.decode(alone), q4.decode(q4.encode(test))[100:137])


def test_determinism_under_seed(data):
    train, test = data
    a = MultiCodebookQuantizer.train(train, num_codebooks=3, codebook_size=32, seed=7, **FAST)
    b = MultiCodebookQuantizer.train(train.copy(), num_codebooks=3, codebook_size=32, seed=7, **FAST)
    c = MultiCodebookQuantizer.train(train, num_codebooks=3, codebook_size=32, seed=8, **FAST)
    for k, v in a.to_arrays().items():
        assert np.array_equal(v, b.to_arrays()[k]), k
    assert a.quantizer_id == b.quantizer_id
    assert a.quantizer_id != c.quantizer_id
    assert np.array_equal(a.encode(test), b.encode(test))
    # an iterator of batches of the same frames trains the same way as the array when it all fits
    d = MultiCodebookQuantizer.train(iter(np.array_split(train, 7)), num_codebooks=3, codebook_size=32, seed=7, **FAST)
    assert d.quantizer_id == a.quantizer_id


def test_streamed_training_samples_beyond_the_first_batches(data):
    """With max_train_frames < data, the stream is reservoir-sampled: later batches must be represented."""
    train, test = data
    shifted = train.copy()
    shifted[2000:] += 40.0  # second half lives elsewhere
    q = MultiCodebookQuantizer.train(iter(np.array_split(shifted, 20)), num_codebooks=2, codebook_size=16,
                                     seed=0, progress=False, max_train_frames=1000, kmeans_iters=4, lsq_iters=1)
    far = test + 40.0
    assert relative_reconstruction_error(np.concatenate([test, far]),
                                         q.decode(q.encode(np.concatenate([test, far])))) < 0.2


def test_save_load_identical_codes_and_no_pickle(q4, data, tmp_path):
    _, test = data
    path = tmp_path / "q.safetensors"
    q4.save(str(path))
    q = MultiCodebookQuantizer.load(str(path))
    assert q.quantizer_id == q4.quantizer_id and q.config == q4.config
    assert np.array_equal(q.encode(test), q4.encode(test))
    assert np.array_equal(q.decode(q4.encode(test)), q4.decode(q4.encode(test)))
    # the file is safetensors: an 8-byte header length, then a JSON header holding our config
    blob = path.read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert "ci-store-mvq-config" in header["__metadata__"]
    # arrays + JSON round trip (the form stored inside a CI store)
    r = MultiCodebookQuantizer.from_arrays(json.loads(json.dumps(q4.config)), q4.to_arrays())
    assert r.quantizer_id == q4.quantizer_id
    # fsspec URL
    q4.save("memory://mvq-test/q.safetensors")
    assert MultiCodebookQuantizer.load("memory://mvq-test/q.safetensors").quantizer_id == q4.quantizer_id


def test_quantizer_id_changes_with_any_array(q4):
    arrays = q4.to_arrays()
    arrays["codebooks"][0, 0, 0] += 1e-3
    assert MultiCodebookQuantizer.from_arrays(q4.config, arrays).quantizer_id != q4.quantizer_id


def test_metrics(q4, data):
    _, test = data
    assert relative_reconstruction_error(test, np.broadcast_to(test.mean(0), test.shape)) == pytest.approx(1.0)
    assert relative_reconstruction_error(test, test) == 0.0
    ent = codebook_usage_entropy(q4.encode(test), 64)
    assert ent.shape == (4,) and np.all(ent > 3.0) and np.all(ent <= 6.0 + 1e-9)
    collapsed = np.zeros((100, 2), np.uint8)
    collapsed[:, 1] = np.arange(100) % 64
    e = codebook_usage_entropy(collapsed, 64)
    assert e[0] == 0.0 and e[1] > 5.5


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((5, DIM + 1), np.float32), "wrong dim"),
    (np.zeros((5,), np.float32), "expected shape"),
])
def test_encode_rejects_wrong_shape(q4, bad, msg):
    with pytest.raises(ValueError, match=msg):
        q4.encode(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_encode_and_train_reject_non_finite_naming_the_row(q4, data, value):
    x = data[1][:600].copy()
    x[517, 3] = value
    with pytest.raises(ValueError, match="row 517 contains NaN or inf"):
        q4.encode(x, batch_size=256)
    with pytest.raises(ValueError, match="NaN or inf"):
        MultiCodebookQuantizer.train(x, num_codebooks=1, codebook_size=16, **FAST)


def test_train_rejects_empty_and_bad_sizes(data):
    with pytest.raises(ValueError, match="empty"):
        MultiCodebookQuantizer.train(np.zeros((0, DIM), np.float32), num_codebooks=2, **FAST)
    with pytest.raises(ValueError, match="empty"):
        MultiCodebookQuantizer.train(iter([]), num_codebooks=2, **FAST)
    with pytest.raises(ValueError, match="power of two"):
        MultiCodebookQuantizer.train(data[0], num_codebooks=2, codebook_size=100, **FAST)
    with pytest.raises(ValueError, match="unknown training option"):
        MultiCodebookQuantizer.train(data[0], num_codebooks=2, beams=3, **FAST)


def test_decode_rejects_bad_codes(q4):
    with pytest.raises(ValueError, match="wrong width"):
        q4.decode(np.zeros((3, 5), np.uint8))
    with pytest.raises(ValueError, match="out of range at row 1, codebook 2"):
        q4.decode(np.array([[0, 0, 0, 0], [0, 0, 64, 0]], np.int64))
    with pytest.raises(ValueError, match="integer"):
        q4.decode(np.zeros((2, 4), np.float32))


def test_load_rejects_non_quantizer_files(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.bin: not a ci-store MVQ quantizer"):
        MultiCodebookQuantizer.load(str(junk))
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors: not a ci-store MVQ quantizer"):
        MultiCodebookQuantizer.load(str(other))
    with pytest.raises(FileNotFoundError):
        MultiCodebookQuantizer.load(str(tmp_path / "missing.safetensors"))
