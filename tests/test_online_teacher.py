"""On-the-fly teacher labels equal the labels extraction stores: same teacher, same quantizer, same alignment."""
import numpy as np
import pytest
import torch

from distill.codec.quantizer import MultiCodebookQuantizer
from distill.data.audio import read_audio
from distill.data.dataset import KDDataset, collate
from distill.data.manifest import load_manifest
from distill.data.tokenizer import CharTokenizer
from distill.extract.job import ExtractionConfig, run_extraction
from distill.student.online_teacher import OnlineTeacher
from distill.teachers import load_teacher
from tests.test_extract import tiny_teacher_and_quantizer


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("online")
    teacher, quantizer = tiny_teacher_and_quantizer(d, tiny_corpus["train"])
    cfg = ExtractionConfig(teacher=teacher, layer=2, quantizer=quantizer, out=str(d / "ci"),
                           float_labels=str(d / "f32"), float_dtype="float32")
    run_extraction(tiny_corpus["train"], cfg, workers=1, progress=False)
    return {"teacher": teacher, "quantizer": quantizer, "ci": str(d / "ci"), "f32": str(d / "f32"),
            "utts": load_manifest(tiny_corpus["train"])}


def _stored_batch(utts, labels):
    ds = KDDataset(utts, CharTokenizer.build([u.text or "" for u in utts]), labels=labels)
    return ds, collate([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("kind", ["codes", "float"])
def test_online_labels_equal_stored_labels(extracted, kind):
    utts = extracted["utts"][:6]
    ds, stored = _stored_batch(utts, extracted["ci" if kind == "codes" else "f32"])
    teacher = load_teacher(extracted["teacher"], layer=2)
    q = MultiCodebookQuantizer.load(extracted["quantizer"]) if kind == "codes" else None
    online = OnlineTeacher(teacher, q)
    assert (online.kind, online.k, online.label_width) == (ds.kind, ds.k, ds.label_width)
    by_id = {u.id: u for u in extracted["utts"]}

    def wave(uid):
        return read_audio(by_id[uid], teacher.sample_rate)

    if kind == "float":
        # the store's statistics are over all its utterances; so are these
        online.fit_stats([u.id for u in extracted["utts"]], wave)
        np.testing.assert_array_equal(online.label_mean, ds.label_mean)
        np.testing.assert_array_equal(online.label_std, ds.label_std)
    labels, mask = online.batch_labels([wave(i) for i in stored["ids"]],
                                       [int(n) for n in stored["feat_lens"]], stored["ids"])
    assert labels.dtype == stored["labels"].dtype
    assert torch.equal(mask, stored["label_mask"])
    assert torch.equal(labels, stored["labels"])  # bit for bit: the same training follows
    assert online.seconds > 0


def test_float_labels_need_stats(extracted):
    online = OnlineTeacher(load_teacher(extracted["teacher"], layer=2))
    u = extracted["utts"][0]
    with pytest.raises(RuntimeError, match="fit_stats"):
        online.utterance_labels(read_audio(u, 16000))


def test_quantizer_of_another_dimension_is_refused(extracted):
    teacher = load_teacher(extracted["teacher"], layer=2)
    q = MultiCodebookQuantizer.train(np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32),
                                     num_codebooks=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="16-dim"):
        OnlineTeacher(teacher, q)
