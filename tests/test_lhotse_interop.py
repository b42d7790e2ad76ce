"""lhotse/icefall interop with real lhotse and real multi_quantization: the ci_store backend, attach,
import-lhotse (CIs and quantizer), export-lhotse, bad input, S3 and DataLoader workers."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from lhotse import CutSet, MonoCut, NumpyHdf5Writer, Recording
from lhotse.array import seconds_to_frames
from lhotse.dataset.collation import collate_custom_field

import distill.interop.lhotse_backend as backend
from ci_store import create, open_store, plan_shards
from cli.main import main
from distill.codec import MultiCodebookQuantizer, QuantizerError
from distill.codec.reference import (
    ReferenceQuantizer,
    decoder_from_state,
    decoder_from_store,
    load_quantizer_file,
    store_quantizer,
)
from distill.interop import InteropError
from distill.interop.cutsets import read_cuts
from distill.interop.lhotse_backend import attach_store, set_storage_options
from distill.interop.migrate import export_lhotse, import_lhotse

FIELD = "codebook_indexes"
NCB = 8
SR = 16000


def _wav(path, seconds):
    sf.write(str(path), np.zeros(int(seconds * SR), np.float32), SR)
    return Recording.from_file(str(path))


def _hubert_frames(duration):
    """A 50 Hz teacher gives one frame fewer than duration x 50 (conv receptive field), like HuBERT."""
    return seconds_to_frames(duration, 0.02) - 1


@pytest.fixture
def icefall_cuts(tmp_path):
    """Cuts (two whole recordings, three inside a longer one, start > 0) with CIs written as icefall does:
    lhotse's NumpyHdf5Writer, custom field codebook_indexes, a TemporalArray with frame_shift 0.02."""
    a, b, long = _wav(tmp_path / "a.wav", 2.0), _wav(tmp_path / "b.wav", 1.3), _wav(tmp_path / "long.wav", 9.0)
    cuts = [MonoCut("a", 0.0, 2.0, 0, recording=a), MonoCut("b", 0.0, 1.3, 0, recording=b),
            MonoCut("long-1", 1.0, 2.0, 0, recording=long), MonoCut("long-2", 3.5, 2.46, 0, recording=long),
            MonoCut("long-3", 6.02, 2.9, 0, recording=long)]
    rng = np.random.default_rng(0)
    arrays = {}
    with NumpyHdf5Writer(tmp_path / "ci.h5") as w:
        for c in cuts:
            arrays[c.id] = rng.integers(0, 256, (_hubert_frames(c.duration), NCB)).astype(np.uint8)
            c.codebook_indexes = w.store_array(key=c.id, value=arrays[c.id], frame_shift=0.02, temporal_dim=0,
                                               start=c.start)
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path, arrays


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


def _ok(*args):
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    return r


def _fails(*args, status=10):
    """The command refuses with one `Error:` line and the documented exit status (10: interop, 3: store,
    7: quantizer; see `ci-store --help`)."""
    r = _cli(*args)
    assert r.exit_code == status and "Error:" in r.output and "Traceback" not in r.output, (r.exit_code, r.output)
    return r.output


# ------------------------------------------------------------------------------------------------ round trips
def test_import_attach_collate_roundtrip(icefall_cuts, tmp_path):
    path, arrays = icefall_cuts
    original = CutSet.from_file(path)
    want, want_lens = collate_custom_field(original, FIELD, pad_value=-100)
    store = tmp_path / "store"
    _ok("import-lhotse", path, "--field", FIELD, "--out", store, "--shard-frames", 256)
    st = open_store(str(store))
    assert st.frame_rate == 50.0 and st.num_shards > 1 and set(st.ids) == set(arrays)
    for cid, a in arrays.items():
        assert np.array_equal(st[cid], a)
    out = tmp_path / "attached.jsonl.gz"
    _ok("attach", path, store, "--field", FIELD, "--out", out)
    attached = CutSet.from_file(out)
    assert {c.codebook_indexes.array.storage_type for c in attached} == {"ci_store"}
    got, got_lens = collate_custom_field(attached, FIELD, pad_value=-100)    # icefall's unchanged call
    assert torch.equal(got, want) and torch.equal(got_lens, want_lens)
    assert int(got[1, -1, 0]) == -100                                       # a short cut is padded with -100
    for c in attached:
        assert np.array_equal(c.load_custom(FIELD), arrays[c.id])
    # sub-cuts starting inside a cut read a frame range through left/right_offset_frames, like the HDF5 original
    for c_new, c_old in zip(attached, original):
        sub_new, sub_old = c_new.truncate(offset=0.5, duration=0.7), c_old.truncate(offset=0.5, duration=0.7)
        a = sub_new.load_custom(FIELD)
        assert a.shape == (35, NCB) and np.array_equal(a, sub_old.load_custom(FIELD))
        assert np.array_equal(a, arrays[c_new.id][25:60])


def test_export_lhotse_reads_back_equal(icefall_cuts, tmp_path):
    path, arrays = icefall_cuts
    store = tmp_path / "store"
    _ok("import-lhotse", path, "--out", store)
    for kind, sp in (("numpy_hdf5", tmp_path / "exp" / "ci.h5"), ("numpy_files", tmp_path / "npy")):
        out = tmp_path / f"exported-{kind}.jsonl.gz"
        _ok("export-lhotse", store, path, "--storage-path", sp, "--storage-type", kind, "--out", out)
        cuts = CutSet.from_file(out)
        assert {c.codebook_indexes.array.storage_type for c in cuts} == {kind}
        for c in cuts:
            assert np.array_equal(c.load_custom(FIELD), arrays[c.id])
        # and back in: the exported storage imports to the same codes
        if kind == "numpy_files":
            again = tmp_path / "again"
            _ok("import-lhotse", out, "--out", again)
            assert all(np.array_equal(open_store(str(again))[k], a) for k, a in arrays.items())
    # never overwrite an existing lhotse storage
    err = _fails("export-lhotse", store, path, "--storage-path", tmp_path / "exp" / "ci.h5", "--out", tmp_path / "x")
    assert "already exists" in err
    with pytest.raises(InteropError, match="must be a local path"):
        export_lhotse(str(store), read_cuts(path), "s3://bucket/ci.h5")


def _trained_reference_quantizer(bytes_per_frame=4, dim=16):
    """multi_quantization's own trainer, a few steps of each phase (num_codebooks = bytes_per_frame)."""
    from multi_quantization import QuantizerTrainer
    torch.manual_seed(0)
    tr = QuantizerTrainer(dim=dim, bytes_per_frame=bytes_per_frame, device=torch.device("cpu"),
                          phase_one_iters=3, phase_two_iters=3)
    while not tr.done():
        tr.step(torch.randn(100, dim))
    return tr.get_quantizer()


def test_multi_quantization_quantizer_decodes_from_store(tmp_path):
    """A real QuantizerTrainer quantizer: its codes imported with its state dict decode from the store alone."""
    q = _trained_reference_quantizer()
    qfile = tmp_path / "quantizer.pt"
    torch.save(q.state_dict(), qfile)
    rec = _wav(tmp_path / "r.wav", 3.0)
    cuts, codes = [], {}
    with NumpyHdf5Writer(tmp_path / "ci.h5") as w:
        for i, dur in enumerate((1.0, 1.5)):
            c = MonoCut(f"c{i}", 0.2 + i, dur, 0, recording=rec)
            x = torch.randn(_hubert_frames(dur), 16)
            codes[c.id] = q.encode(x)                      # [T, 4] uint8, as icefall's vq_utils
            c.codebook_indexes = w.store_array(c.id, codes[c.id].numpy(), frame_shift=0.02, temporal_dim=0,
                                               start=c.start)
            cuts.append(c)
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    _ok("import-lhotse", tmp_path / "cuts.jsonl.gz", "--out", tmp_path / "s", "--quantizer", qfile)
    st = open_store(str(tmp_path / "s"))
    assert st.quantizer_id == f"multi-quantization-{q.get_id()}"
    dec = decoder_from_store(st)
    assert isinstance(dec, ReferenceQuantizer)
    for cid, c in codes.items():
        assert np.array_equal(st[cid], c.numpy())
        assert torch.equal(torch.from_numpy(dec.decode(st[cid])), q.decode(c))
    # the kept state dict loads back into the package
    from multi_quantization import Quantizer
    q2 = Quantizer(dim=16, codebook_size=256, num_codebooks=4)
    q2.load_state_dict(dec.state_dict())
    assert q2.get_id() == q.get_id() and torch.equal(q2.decode(codes["c0"]), q.decode(codes["c0"]))


def test_decoder_from_state_picks_our_quantizer_too(tmp_path):
    rng = np.random.default_rng(1)
    ours = MultiCodebookQuantizer(12, 4, 16, mean=rng.standard_normal(12).astype(np.float32),
                                  codebooks=rng.standard_normal((4, 16, 12)).astype(np.float32))
    ours.save(tmp_path / "q.safetensors")
    loaded = load_quantizer_file(tmp_path / "q.safetensors")      # told apart from a torch.save file
    st = create(str(tmp_path / "s"), plan_shards([("u", 30)], 64), num_codebooks=4, codebook_size=16,
                frame_rate=50.0, quantizer=store_quantizer(loaded))
    dec = decoder_from_store(st)
    codes = rng.integers(0, 16, (30, 4)).astype(np.uint8)
    assert isinstance(dec, MultiCodebookQuantizer) and np.array_equal(dec.decode(codes), ours.decode(codes))
    with pytest.raises(QuantizerError, match="unknown quantizer format 'other'"):
        decoder_from_state(({"format": "other"}, {}))
    with pytest.raises(QuantizerError, match="holds no quantizer"):
        decoder_from_state(None)


# -------------------------------------------------------------------------------------------------- bad input
def test_field_missing_on_some_cuts(icefall_cuts, tmp_path):
    path, _ = icefall_cuts
    cuts = CutSet.from_file(path).to_eager()
    bad = [c if c.id != "b" else MonoCut(c.id, c.start, c.duration, 0, recording=c.recording) for c in cuts]
    CutSet.from_cuts(bad).to_file(tmp_path / "bad.jsonl.gz")
    err = _fails("import-lhotse", tmp_path / "bad.jsonl.gz", "--out", tmp_path / "s")
    assert "field 'codebook_indexes' is missing (1 of 5 cuts): 'b'" in err
    assert not (tmp_path / "s").exists()


def test_manifest_shape_disagrees_with_data(icefall_cuts, tmp_path):
    path, _ = icefall_cuts
    cuts = CutSet.from_file(path).to_eager()
    c = cuts["long-2"]
    c.codebook_indexes.array.shape = [c.codebook_indexes.array.shape[0], NCB - 1]   # wrong width in the manifest
    CutSet.from_cuts(cuts).to_file(tmp_path / "bad.jsonl.gz")
    err = _fails("import-lhotse", tmp_path / "bad.jsonl.gz", "--out", tmp_path / "s")
    assert "different widths" in err and "long-2" in err
    # manifest shape that the stored data does not match: named with field and file
    for cut in cuts:
        cut.codebook_indexes.array.shape[1] = NCB
    cuts["b"].codebook_indexes.array.shape[0] += 5
    cuts["b"].duration += 0.1
    CutSet.from_cuts(cuts).to_file(tmp_path / "bad2.jsonl.gz")
    err = _fails("import-lhotse", tmp_path / "bad2.jsonl.gz", "--out", tmp_path / "s2", "--shard-frames", 256)
    assert "cut 'b' field 'codebook_indexes' (numpy_hdf5" in err and "ci.h5" in err and "manifest says" in err


def test_attach_refuses_disagreeing_lengths_and_uncovered_cuts(icefall_cuts, tmp_path):
    path, _ = icefall_cuts
    store = tmp_path / "store"
    _ok("import-lhotse", path, "--out", store)
    cuts = CutSet.from_file(path).to_eager()
    cuts["a"].duration = 3.0                                   # 150 frames, the store holds 99
    CutSet.from_cuts(cuts).to_file(tmp_path / "longer.jsonl.gz")
    err = _fails("attach", tmp_path / "longer.jsonl.gz", store, "--out", tmp_path / "o.jsonl.gz")
    assert "'a' (99 frames in the store, 3 s = 150 frames at 50 Hz)" in err
    extra = MonoCut("not-there", 0.0, 1.0, 0, recording=cuts["b"].recording)
    CutSet.from_cuts(list(cuts.subset(cut_ids=["b"])) + [extra]).to_file(tmp_path / "extra.jsonl.gz")
    err = _fails("attach", tmp_path / "extra.jsonl.gz", store, "--out", tmp_path / "o.jsonl.gz")
    assert "does not hold labels for 1 of 2 cuts: 'not-there'" in err
    assert not (tmp_path / "o.jsonl.gz").exists()
    # the store itself is untouched by the refusals, and importing over it is refused
    err = _fails("import-lhotse", path, "--out", store)
    assert "already holds a ci-store" in err
    assert open_store(str(store)).completed_shards() == {0}


def test_pickled_object_in_quantizer_file_is_refused(icefall_cuts, tmp_path):
    path, _ = icefall_cuts
    from multi_quantization import Quantizer
    sd = Quantizer(dim=16, codebook_size=256, num_codebooks=NCB).state_dict()
    sd["extra"] = InteropError("not a tensor")              # any pickled object weights_only does not allow
    torch.save(sd, tmp_path / "evil.pt")
    err = _fails("import-lhotse", path, "--out", tmp_path / "s", "--quantizer", tmp_path / "evil.pt", status=7)
    assert "evil.pt: refused to load" in err and "weights_only" in err
    with pytest.raises(QuantizerError, match=r"other.pt: not a multi_quantization Quantizer state dict: "
                                             r"lacks to_logits.weight.*\(has w\)"):
        torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
        ReferenceQuantizer.load(tmp_path / "other.pt")
    # the quantizer must match the codes
    torch.save(Quantizer(dim=16, codebook_size=256, num_codebooks=4).state_dict(), tmp_path / "q.pt")
    err = _fails("import-lhotse", path, "--out", tmp_path / "s", "--quantizer", tmp_path / "q.pt")
    assert "quantizer has 4 codebooks, field 'codebook_indexes' has 8" in err
    assert not (tmp_path / "s").exists()


def test_attach_reports_failed_cuts(tmp_path):
    rec = _wav(tmp_path / "r.wav", 2.0)
    cuts = [MonoCut(f"u{i}", 0.0, 1.0 + 0.2 * i, 0, recording=rec) for i in range(3)]
    plan = plan_shards([(c.id, _hubert_frames(c.duration)) for c in cuts], 1024)
    st = create(str(tmp_path / "s"), plan, num_codebooks=NCB, frame_rate=50.0)
    a0 = np.ones((_hubert_frames(1.0), NCB), np.uint8)
    a2 = np.full((_hubert_frames(1.4), NCB), 7, np.uint8)
    st.write_shard(0, {"u0": a0, "u2": a2}, failures={"u1": "teacher crashed"})
    attached, failed = attach_store(cuts, str(tmp_path / "s"))
    assert failed == {"u1": "teacher crashed"} and [c.id for c in attached] == ["u0", "u2"]
    got, lens = collate_custom_field(attached, FIELD, pad_value=-100)
    assert lens.tolist() == [49, 69] and int(got[0, 60, 0]) == -100 and int(got[1, 60, 0]) == 7
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    r = _ok("attach", tmp_path / "cuts.jsonl.gz", tmp_path / "s", "--out", tmp_path / "o.jsonl.gz")
    assert "1 cuts have no labels" in r.output and "u1: teacher crashed" in r.output
    exported, failed = export_lhotse(str(tmp_path / "s"), cuts, str(tmp_path / "exp.h5"))
    assert failed == {"u1": "teacher crashed"} and [c.id for c in exported] == ["u0", "u2"]
    assert np.array_equal(exported[0].load_custom(FIELD), a0) and np.array_equal(exported[1].load_custom(FIELD), a2)


# ---------------------------------------------------------------------------------------- S3 and workers
class _Batches(torch.utils.data.Dataset):
    """Each item: one batch collated in the worker, with the worker's pid and the pids its store cache holds."""

    def __init__(self, cuts):
        self.cuts = cuts

    def __len__(self):
        return 4

    def __getitem__(self, i):
        cuts = CutSet.from_cuts(self.cuts[i % 2::2])
        codes, lens = collate_custom_field(cuts, FIELD, pad_value=-100)
        return os.getpid(), codes, lens, sorted({k[0] for k in backend._open})


def test_backend_over_s3_with_dataloader_workers(icefall_cuts, s3_bucket, monkeypatch):
    path, arrays = icefall_cuts
    url, opts = s3_bucket
    import_lhotse(read_cuts(path), f"{url}/ci", storage_options=opts, shard_frames=256)
    attached, _ = attach_store(read_cuts(path), f"{url}/ci", storage_options=opts)
    attached = list(attached)
    backend.close_cached_stores()
    # a config call
    set_storage_options(opts, prefix=url)
    try:
        assert np.array_equal(attached[0].load_custom(FIELD), arrays[attached[0].id])
    finally:
        set_storage_options(None, prefix=url)
        backend.close_cached_stores()
    # the environment, read by DataLoader workers that open the store themselves
    import json
    monkeypatch.setenv(backend.ENV_STORAGE_OPTIONS, json.dumps(opts))
    want = [collate_custom_field(CutSet.from_cuts(attached[k::2]), FIELD, pad_value=-100) for k in (0, 1)]
    assert backend._open and {k[0] for k in backend._open} == {os.getpid()}   # the parent has one open
    for context, workers in (("fork", 2), ("spawn", 1)):     # spawn: what DDP ranks (mp.spawn) see
        dl = torch.utils.data.DataLoader(_Batches(attached), batch_size=None, num_workers=workers,
                                         multiprocessing_context=context)
        pids = set()
        for i, (pid, codes, lens, cache_pids) in enumerate(dl):
            pids.add(pid)
            assert pid != os.getpid() and cache_pids == [pid]     # opened in the worker, nothing inherited kept
            assert torch.equal(codes, want[i % 2][0]) and torch.equal(lens, want[i % 2][1])
        assert len(pids) == workers


def test_import_stops_on_unreadable_data_and_resumes(icefall_cuts, tmp_path):
    """A data problem in a later shard stops the import naming cut and file; the shards before it are kept and
    --resume finishes the store once the manifest is fixed."""
    path, arrays = icefall_cuts
    cuts = CutSet.from_file(path).to_eager()
    cuts["long-3"].codebook_indexes.array.storage_key = "no-such-key"
    CutSet.from_cuts(cuts).to_file(tmp_path / "broken.jsonl.gz")
    store = tmp_path / "s"
    err = _fails("import-lhotse", tmp_path / "broken.jsonl.gz", "--out", store, "--shard-frames", 256)
    assert "cut 'long-3' field 'codebook_indexes' (numpy_hdf5" in err and "cannot be read" in err
    st = open_store(str(store))
    assert st.num_shards == 3 and st.completed_shards() == {0, 1}
    err = _fails("import-lhotse", path, "--out", store, "--shard-frames", 256)
    assert "already holds a ci-store; refusing to overwrite it" in err and "--resume" in err
    r = _ok("import-lhotse", path, "--out", store, "--shard-frames", 256, "--resume")
    assert '"resumed_shards": 2' in r.output
    st = open_store(str(store))
    assert st.completed_shards() == {0, 1, 2} and all(np.array_equal(st[k], a) for k, a in arrays.items())


@pytest.mark.parametrize("writer,path", [("LilcomFilesWriter", "lil"), ("LilcomHdf5Writer", "lil.h5")])
def test_import_from_lossy_lilcom_storage(tmp_path, writer, path):
    """lilcom gives codes back as nearby floats; import rounds them to exactly the original indexes."""
    import lhotse

    cut = MonoCut("a", 0.0, 2.0, 0, recording=_wav(tmp_path / "a.wav", 2.0))
    codes = np.random.default_rng(1).integers(0, 256, (_hubert_frames(2.0), NCB)).astype(np.uint8)
    with getattr(lhotse, writer)(tmp_path / path) as w:
        cut.codebook_indexes = w.store_array(key="a", value=codes, frame_shift=0.02, temporal_dim=0)
    assert not np.array_equal(cut.load_custom(FIELD), codes)  # lossy: not the stored values themselves
    CutSet.from_cuts([cut]).to_file(tmp_path / "c.jsonl.gz")
    _ok("import-lhotse", tmp_path / "c.jsonl.gz", "--out", tmp_path / "s")
    assert np.array_equal(open_store(str(tmp_path / "s"))["a"], codes)
