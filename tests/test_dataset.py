"""The student data path: aligned CI/float labels from a store, DataLoader workers over S3, KD training."""
import json

import numpy as np
import pytest
import torch

from ci_store import create, open_store, plan_shards
from distill.data.alignment import IGNORE, AlignmentError
from distill.data.audio import read_audio
from distill.data.dataset import KDDataset, collate, student_frames
from distill.data.loader import make_loader
from distill.data.feature_cache import FeatureCache
from distill.data.sampler import ShardBucketSampler, make_train_sampler
from distill.data.fbank import compute_fbank
from distill.data.manifest import load_manifest
from distill.data.tokenizer import CharTokenizer
from distill.student.trainer import TrainConfig, train_student

NCB, DIM = 4, 8
TINY = dict(d_model=32, num_layers=2, num_heads=2, conv_kernel=7, subsampling_channels=8, pred_dim=32,
            joiner_dim=32, dropout=0.0)


def _teacher_like_labels(utts):
    """Labels a student can learn: per 50 Hz frame, codes/floats derived from the audio's fbank energy.

    Teacher frame counts are 2 x student frames - 1 (a one-frame mismatch, as real teachers have)."""
    codes, floats = {}, {}
    for u in utts:
        fb = compute_fbank(read_audio(u, 16000))
        n = 2 * student_frames(fb.shape[0], 4) - 1
        e = np.zeros(n, np.float32)
        m = min(n, fb.shape[0] // 2)
        e[:m] = fb[: 2 * m].reshape(m, 2, -1).mean(axis=(1, 2))
        z = (e - e.mean()) / (e.std() + 1e-6)
        codes[u.id] = np.stack([np.digitize(z, np.linspace(-2, 2, 15) + 0.1 * c) for c in range(NCB)], 1
                               ).astype(np.uint8)
        floats[u.id] = np.stack([z * (c + 1) for c in range(DIM)], 1).astype(np.float32)
    return codes, floats


def _write(url, kind, labels, opts=None, shard_frames=1024):
    plan = plan_shards([(u, a.shape[0]) for u, a in sorted(labels.items())], shard_frames)
    kw = dict(num_codebooks=NCB, codebook_size=16) if kind == "codes" else dict(dim=DIM, dtype="float16")
    st = create(url, plan, kind=kind, frame_rate=50.0, storage_options=opts, **kw)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: labels[u] for u in sh.utt_ids})
    return url


@pytest.fixture(scope="module")
def stores(tiny_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    utts = load_manifest(tiny_corpus["train"])
    codes, floats = _teacher_like_labels(utts)
    return {"codes": _write(str(d / "ci"), "codes", codes), "float": _write(str(d / "f16"), "float", floats),
            "codes_data": codes, "utts": utts}


def test_items_carry_aligned_labels(stores):
    utts = stores["utts"]
    tok = CharTokenizer.build([u.text for u in utts])
    ds = KDDataset(utts, tok, labels=stores["codes"])
    assert ds.k == 2 and ds.label_width == NCB and ds.kind == "codes"
    ex = ds[0]
    raw = stores["codes_data"][ex.id]
    T = student_frames(ex.feats.shape[0], 4)
    assert ex.labels.shape == (T, 2 * NCB) and ex.feats.shape[1] == 80
    np.testing.assert_array_equal(ex.labels.reshape(-1, NCB)[: raw.shape[0]], raw)
    assert (ex.labels.reshape(-1, NCB)[raw.shape[0]:] == IGNORE).all()
    assert ex.label_mask.sum() == raw.shape[0]
    assert ex.text == {u.id: u.text for u in utts}[ex.id]
    # the corpus texts are normalised already (upper case, single spaces): the tokens spell them exactly
    assert tok.unk_id not in ex.tokens and tok.blank_id not in ex.tokens
    assert tok.decode(ex.tokens) == ex.text


def test_float_labels_are_standardised(stores):
    utts = stores["utts"]
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=stores["float"])
    assert ds.kind == "float" and ds.label_width == DIM
    vals = np.concatenate([ds[i].labels.reshape(-1, 2, DIM)[ds[i].label_mask] for i in range(len(ds))])
    np.testing.assert_allclose(vals.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(vals.std(0), 1.0, atol=1e-2)


def test_collate_pads_labels_with_ignore(stores):
    utts = stores["utts"]
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=stores["codes"])
    batch = collate([ds[i] for i in range(3)])
    B, T, W = batch["labels"].shape
    assert B == 3 and W == 2 * NCB
    for b in range(3):
        n = int(batch["label_mask"][b].any(-1).sum())
        assert (batch["labels"][b, n + 1:] == IGNORE).all()
    assert batch["feats"].shape[0] == 3 and batch["tokens"].dtype == torch.int64


def test_mismatched_labels_refused_naming_the_utterance(stores, tmp_path):
    utts = stores["utts"]
    wrong = {u: np.zeros((a.shape[0] // 2, NCB), np.uint8) for u, a in stores["codes_data"].items()}
    url = _write(str(tmp_path / "wrong"), "codes", wrong)
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=url)
    with pytest.raises(AlignmentError, match=utts[0].id):
        ds[0]


def test_manifest_utterance_missing_from_store_is_named(stores, tmp_path):
    utts = stores["utts"]
    some = dict(list(stores["codes_data"].items())[:-1])
    url = _write(str(tmp_path / "partial"), "codes", some)
    missing = sorted(set(u.id for u in utts) - set(some))[0]
    with pytest.raises(KeyError, match=missing):
        KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=url)


def test_sampler_groups_by_shard_and_caps_seconds():
    rng = np.random.default_rng(0)
    dur = rng.uniform(1, 10, 200)
    shards = np.repeat(np.arange(4), 50)
    s = ShardBucketSampler(dur, shards, max_seconds=40, seed=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(set(shards[b])) == 1
        assert dur[b].max() * len(b) <= 40 or len(b) == 1
    s.set_epoch(1)
    assert [tuple(b) for b in s] != [tuple(b) for b in batches]  # reshuffled per epoch, same batches
    assert sorted(map(tuple, s)) == sorted(map(tuple, batches))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_workers_over_s3(stores, s3_bucket, context):
    url, opts = s3_bucket
    s3_url = _write(f"{url}/ci", "codes", stores["codes_data"], opts)
    utts = stores["utts"]
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=s3_url, storage_options=opts)
    _ = ds.store[utts[0].id]  # the parent reads first: workers must not reuse its event loop
    sampler = ShardBucketSampler(ds.durations(), ds.shard_of(), max_seconds=15, shuffle=True)
    loader = make_loader(ds, sampler, num_workers=2, multiprocessing_context=context)
    seen = {}
    for batch in loader:
        for b, uid in enumerate(batch["ids"]):
            seen[uid] = batch["labels"][b]
    assert set(seen) == {u.id for u in utts}
    local = open_store(stores["codes"])
    for uid, lab in seen.items():
        raw = local[uid]
        np.testing.assert_array_equal(lab.reshape(-1, NCB)[: raw.shape[0]].numpy(), raw)


@pytest.mark.parametrize("kd,store", [("mvq", "codes"), ("l1", "float"), ("l2", "float")])
def test_kd_training_learns_the_labels(stores, tiny_corpus, tmp_path, kd, store):
    run = tmp_path / kd
    cfg = TrainConfig(kd=kd, kd_scale=1.0, epochs=18, max_seconds=20, lr=5e-3, warmup_steps=2, log_every=1,
                      checkpoint_every=0, threads=1)
    train_student(tiny_corpus["train"], str(run), labels=stores[store], cfg=cfg, student=TINY, progress=False)
    recs = [json.loads(l) for l in open(run / "log.jsonl") if "loss_kd" in l]
    kd_losses = [r["loss_kd"] for r in recs]
    assert len(kd_losses) >= 8
    first, last = np.mean(kd_losses[:3]), np.mean(kd_losses[-3:])
    assert last < 0.8 * first, kd_losses
    saved = json.load(open(run / "config.json"))
    assert saved["student"]["kd_type"] == kd and saved["student"]["kd_stack"] == 2


def test_kd_type_must_match_store_kind(stores, tiny_corpus, tmp_path):
    cfg = TrainConfig(kd="l2", epochs=1, threads=1)
    with pytest.raises(ValueError, match="float-label store"):
        train_student(tiny_corpus["train"], str(tmp_path / "r"), labels=stores["codes"], cfg=cfg, student=TINY,
                      progress=False)


def test_trainer_with_dataloader_workers_trains_the_same_model(stores, tiny_corpus, tmp_path):
    """The trainer's own loader with 2 spawned workers (each opening the store itself) feeds exactly the batches
    the in-process loader does: same log, bit-identical weights."""
    from safetensors.torch import load_file

    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        cfg = TrainConfig(kd="mvq", epochs=2, max_seconds=20, lr=3e-3, warmup_steps=2, log_every=1,
                          checkpoint_every=0, threads=1, num_workers=workers)
        train_student(tiny_corpus["train"], str(run), labels=stores["codes"], cfg=cfg, student=TINY,
                      progress=False)
        log = [json.loads(l) for l in open(run / "log.jsonl")]
        weights = {k: v for k, v in load_file(str(run / "last.safetensors")).items() if k.startswith("model.")}
        runs[workers] = ([(r["step"], r["loss"], r["loss_kd"]) for r in log if "loss" in r], weights)
    assert len(runs[0][0]) >= 4
    assert runs[2][0] == runs[0][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[2][1][k]), k


@pytest.mark.parametrize("store", ["codes", "float"])
def test_batched_reads_give_the_same_examples(stores, store):
    """__getitems__ (one get_many per batch, what the DataLoader calls) gives exactly __getitem__'s examples."""
    utts = stores["utts"]
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=stores[store])
    idx = [3, 0, len(ds) - 1, 1]
    for one, many in zip([ds[i] for i in idx], ds.__getitems__(idx)):
        assert one.id == many.id and one.tokens == many.tokens and one.text == many.text
        np.testing.assert_array_equal(one.feats, many.feats)
        np.testing.assert_array_equal(one.labels, many.labels)
        np.testing.assert_array_equal(one.label_mask, many.label_mask)
    no_kd = KDDataset(utts, CharTokenizer.build([u.text for u in utts]))
    assert [e.labels for e in no_kd.__getitems__([0, 1])] == [None, None]


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_loader_serves_each_epochs_mixed_batches(stores, tmp_path, workers):
    """One loader (persistent spawned workers) over a store of many small shards: each epoch delivers exactly the
    sampler's batches for that epoch, with the store's labels; a mid-epoch resume delivers the rest."""
    url = _write(str(tmp_path / "small-shards"), "codes", stores["codes_data"], shard_frames=400)
    utts = stores["utts"]
    ds = KDDataset(utts, CharTokenizer.build([u.text for u in utts]), labels=url)
    assert len(np.unique(ds.shard_of())) >= 3
    sampler = make_train_sampler(ds, max_seconds=8, seed=0, shards_per_window=2)
    loader = make_loader(ds, sampler, num_workers=workers)
    local = open_store(url)
    first_iterator = None
    for epoch, skip in [(0, 0), (1, 0), (2, 2)]:
        sampler.set_epoch(epoch, skip=skip)
        it = iter(loader)
        if workers and first_iterator is None:
            first_iterator = it
        assert it is first_iterator or not workers  # the same worker processes every epoch
        got = [batch["ids"] for batch in it]
        want = [[ds.utts[i].id for i in b] for b in sampler.epoch_batches(epoch)][skip:]
        assert got == want
    for uid in ds.utts[0].id, ds.utts[-1].id:
        batch = next(b for b in make_loader(ds, ShardBucketSampler(ds.durations(), max_seconds=8, shuffle=False))
                     if uid in b["ids"])
        raw = local[uid]
        row = batch["ids"].index(uid)
        np.testing.assert_array_equal(batch["labels"][row].reshape(-1, NCB)[: raw.shape[0]].numpy(), raw)
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_feature_cache_keeps_its_byte_limit_least_recently_used_first():
    a = {k: np.full((10, 8), i, np.float32) for i, k in enumerate("abcde")}  # 320 bytes each
    cache = FeatureCache(1000)
    for k in "abc":
        cache[k] = a[k]
    assert cache.nbytes == 960 and len(cache) == 3 and cache.evictions == 0
    assert cache.get("a") is a["a"]  # a is now the most recently used
    cache["d"] = a["d"]
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcde" if k in cache}
    assert cache.nbytes <= 1000 and cache.evictions == 1
    cache["big"] = np.zeros(1001, np.uint8)  # larger than the whole limit: not kept, nothing evicted for it
    assert "big" not in cache and cache.evictions == 1
    assert cache.get("b") is None and (cache.hits, cache.misses) == (1, 1)
    assert FeatureCache.from_mb(0) is None and FeatureCache.from_mb(2).max_bytes == 2 << 20
    with pytest.raises(ValueError, match=">= 0"):
        FeatureCache.from_mb(-1)


def test_cached_features_equal_fresh_ones_within_the_limit(stores):
    import pickle

    utts = stores["utts"]
    tok = CharTokenizer.build([u.text for u in utts])
    fresh = KDDataset(utts, tok)
    sizes = [fresh[i].feats.nbytes for i in range(len(fresh))]
    limit = sum(sorted(sizes)[-3:])  # room for about three utterances: the two passes below must evict
    cache = FeatureCache(limit)
    cached = KDDataset(utts, tok, feature_cache=cache)
    for _ in range(2):
        for i in range(len(cached)):
            np.testing.assert_array_equal(cached[i].feats, fresh[i].feats)
            assert cache.nbytes <= limit
    assert cache.evictions > 0 and len(cache) >= 1
    np.testing.assert_array_equal(cached[len(cached) - 1].feats, fresh[len(fresh) - 1].feats)
    assert cache.hits >= 1  # the last utterance was still cached
    # a dataset sent to a spawned worker carries the limit, not the parent's arrays
    sent = pickle.loads(pickle.dumps(cached))
    assert sent.feature_cache.max_bytes == limit and len(sent.feature_cache) == 0


def test_old_run_directory_with_cache_features_resumes(tiny_corpus, tmp_path):
    """Run directories saved before feature_cache_mb hold "cache_features"; the cache never changes results, so
    they resume (and the cache size may change between resumes)."""
    run = tmp_path / "old"
    cfg = TrainConfig(epochs=1, max_seconds=20, warmup_steps=1, checkpoint_every=0, threads=1)
    train_student(tiny_corpus["train"], str(run), cfg=cfg, student=TINY, progress=False, stop_after_steps=1)
    saved = json.load(open(run / "config.json"))
    del saved["train"]["feature_cache_mb"]
    saved["train"]["cache_features"] = True
    json.dump(saved, open(run / "config.json", "w"))
    cfg.feature_cache_mb = 64
    out = train_student(tiny_corpus["train"], str(run), cfg=cfg, student=TINY, progress=False)
    assert out["step"] > 1 and "stopped_early" not in out


def test_train_student_feature_cache_option(tiny_corpus, tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path / "cli"
    args = ["train-student", "--train", tiny_corpus["train"], "--kd", "none", "--out", str(out), "--epochs", "1",
            "--max-seconds", "20", "--threads", "1", "--no-progress", "--student", json.dumps(TINY)]
    r = CliRunner().invoke(main, args + ["--feature-cache-mb", "8"])
    assert r.exit_code == 0, r.output
    assert json.load(open(out / "config.json"))["train"]["feature_cache_mb"] == 8
    r = CliRunner().invoke(main, args + ["--feature-cache-mb", "-1"])
    assert r.exit_code == 2 and "--feature-cache-mb" in r.output


def test_float_label_stats_cover_the_first_utterances_up_to_max_frames(tmp_path):
    """Stats come from batched reads (get_many per 64 ids) but cover exactly the utterances in id order up to the
    one that reaches max_frames."""
    from distill.data.dataset import float_label_stats

    rng = np.random.default_rng(0)
    labels = {f"u{i:03d}": (rng.standard_normal((int(rng.integers(5, 60)), DIM)) * np.arange(1, DIM + 1)
                            ).astype(np.float32) for i in range(150)}
    plan = plan_shards([(u, a.shape[0]) for u, a in sorted(labels.items())], 1024)
    st = create(str(tmp_path / "f32"), plan, kind="float", dim=DIM, dtype="float32", frame_rate=50.0)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: labels[u] for u in sh.utt_ids})
    ids = sorted(labels)
    for max_frames in (10, 2000, 10 ** 6):
        counts = np.cumsum([labels[u].shape[0] for u in ids])
        used = ids[: int(np.searchsorted(counts, max_frames)) + 1]
        x = np.concatenate([labels[u] for u in used]).astype(np.float64)
        mean, std = float_label_stats(open_store(str(tmp_path / "f32")), list(reversed(ids)), max_frames)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, x.std(0), rtol=1e-4)
