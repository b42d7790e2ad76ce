"""Manifests: plain JSONL and lhotse cuts/recordings/supervisions (parsed by lhotse) and Shar, round trips, errors."""
import gzip
import json
import os

import numpy as np
import pytest
import soundfile as sf

from distill.data.audio import AudioError, probe_missing, probe_utterance
from distill.data.manifest import ManifestError, Utterance, compute_num_samples, load_manifest, resampled_length
from distill.data.writing import write_jsonl_manifest, write_lhotse_cuts


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return str(path)


def _wav(path, n, sr=16000, channels=1):
    data = np.random.default_rng(0).uniform(-0.5, 0.5, (n, channels)).astype(np.float32)
    sf.write(str(path), data, sr, subtype="FLOAT")
    return str(path)


def _recording(rid, source, sr=16000, n=32000, channels=(0,)):
    return {"id": rid, "sources": [{"type": "file", "channels": list(channels), "source": source}],
            "sampling_rate": sr, "num_samples": n, "duration": n / sr}


def test_lhotse_sample_rounding_is_half_up():
    # lhotse rounds half up (Python's round() would give 0 and 2 here)
    assert compute_num_samples(0.5 / 16000, 16000) == 1
    assert compute_num_samples(2.5 / 16000, 16000) == 3
    assert compute_num_samples(1.23, 16000) == 19680
    assert compute_num_samples(0.1, 22050) == 2205  # 2205.0000000000005 before 8-digit rounding


def test_resampled_length_is_ceil():
    assert resampled_length(22050, 22050, 16000) == 16000
    assert resampled_length(22051, 22050, 16000) == 16001  # 16000.73 -> ceil
    assert resampled_length(4801, 48000, 16000) == 1601
    assert resampled_length(777, 16000, 16000) == 777
    u = Utterance(id="a", audio="x.wav", sample_rate=22050, num_samples=22051)
    assert u.num_samples_at(16000) == 16001 and u.num_samples_at(22050) == 22051
    assert Utterance(id="b", audio="x.wav", sample_rate=8000, duration=0.5).num_samples_at(16000) == 8000
    with pytest.raises(ManifestError, match="'c'.*probe"):
        Utterance(id="c", audio="x.wav").num_samples_at(16000)


@pytest.mark.parametrize("gz", [False, True])
def test_plain_jsonl(tmp_path, gz):
    rows = [{"id": "u1", "audio": "/a/1.wav", "text": "hello", "duration": 1.5, "sample_rate": 16000},
            {"id": "u2", "audio": "s3://b/2.flac", "num_samples": 8000, "sample_rate": 8000, "speaker": "spk"},
            {"id": "u3", "audio": "rel/3.wav", "offset": 0.25, "channel": 1, "type": "read"}]  # extra keys ok
    path = _write_jsonl(tmp_path / ("m.jsonl.gz" if gz else "m.jsonl"), rows, gz=gz)
    u1, u2, u3 = load_manifest(path)
    assert u1 == Utterance(id="u1", audio="/a/1.wav", sample_rate=16000, num_samples=24000, duration=1.5,
                           text="hello")
    assert (u2.num_samples, u2.duration, u2.speaker, u2.text) == (8000, 1.0, "spk", None)
    assert (u3.offset, u3.channel, u3.sample_rate, u3.num_samples) == (0.25, 1, None, None)
    # audio_root applies to relative paths only
    r = load_manifest(path, audio_root="/corpus")
    assert [u.audio for u in r] == ["/a/1.wav", "s3://b/2.flac", os.path.join("/corpus", "rel/3.wav")]


def test_duplicate_ids_are_listed(tmp_path):
    rows = [{"id": i, "audio": f"/x/{n}.wav"} for n, i in enumerate(["a", "b", "a", "c", "b", "a"])]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError, match=r"duplicate utterance ids: 'a', 'b'$"):
        load_manifest(path)


def test_missing_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "/a.wav"}, {"id": "b", "audio": None}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: utterance 'b' is missing required field 'audio'"):
        load_manifest(path)
    path = _write_jsonl(tmp_path / "n.jsonl", [{"id": "a", "audio": "/a.wav"}, {"audio": "/b.wav"}])
    with pytest.raises(ManifestError, match=r"n\.jsonl:2: .*'id'"):
        load_manifest(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "audio": "/a.wav"}\n{"id": "b", \n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: invalid JSON"):
        load_manifest(str(bad))
    path = _write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "audio": "/a.wav", "sample_rate": "16k"}])
    with pytest.raises(ManifestError, match=r"s\.jsonl:1: field 'sample_rate' must be an integer"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(str(tmp_path / "nope.jsonl"))


def test_lhotse_cuts(tmp_path):
    rec = _recording("rec1", "/data/rec1.flac", sr=16000, n=160000)
    stereo = {"id": "rec2", "sources": [{"type": "file", "channels": [0], "source": "/data/left.wav"},
                                        {"type": "file", "channels": [1], "source": "/data/right.wav"}],
              "sampling_rate": 8000, "num_samples": 80000, "duration": 10.0}
    cuts = [
        {"id": "c1", "start": 1.2345, "duration": 2.00003, "channel": 0, "recording": rec, "type": "MonoCut",
         "supervisions": [
             {"id": "s2", "recording_id": "rec1", "start": 1.0, "duration": 1.0, "channel": 0, "text": "world",
              "speaker": "A"},
             {"id": "s1", "recording_id": "rec1", "start": 0.0, "duration": 1.0, "channel": 0, "text": "hello",
              "speaker": "A"}]},
        {"id": "c2", "start": 0.0, "duration": 10.0, "channel": 1, "recording": stereo, "type": "MonoCut",
         "supervisions": []},
    ]
    path = _write_jsonl(tmp_path / "cuts.jsonl.gz", cuts, gz=True)
    c1, c2 = load_manifest(path)
    assert c1 == Utterance(id="c1", audio="/data/rec1.flac", sample_rate=16000,
                           num_samples=compute_num_samples(2.00003, 16000), offset=1.2345, duration=2.00003,
                           text="hello world", channel=0, speaker="A")
    assert c1.num_samples == 32000  # 32000.48 rounds down
    # channel 1 lives in the second source file, where it is that file's channel 0
    assert (c2.audio, c2.channel, c2.num_samples, c2.text) == ("/data/right.wav", 0, 80000, None)


def test_lhotse_cut_errors(tmp_path):
    rec = _recording("r", "/r.wav")
    cases = [
        ({"id": "x", "start": 0, "duration": 1, "channel": 0, "type": "MonoCut", "features": {
            "type": "kaldi-fbank", "num_frames": 100, "num_features": 80, "frame_shift": 0.01, "sampling_rate": 16000,
            "start": 0, "duration": 1, "storage_type": "lilcom_files", "storage_path": "/f", "storage_key": "x"}},
         "no recording"),
        ({"id": "x", "start": 0, "duration": 1, "channel": 3, "recording": rec, "type": "MonoCut"}, "channel 3"),
        ({"id": "x", "start": 0, "duration": 1, "type": "PaddingCut", "feat_value": 0, "num_frames": 100,
          "num_features": 80, "frame_shift": 0.01, "sampling_rate": 16000, "num_samples": 16000}, "PaddingCut"),
        ({"id": "x", "start": 0, "channel": 0, "recording": rec, "type": "MonoCut"}, "'duration'"),
        ({"id": "x", "start": 0, "duration": 1, "type": "TurboCut"}, "not a valid lhotse item"),
    ]
    for n, (cut, msg) in enumerate(cases):
        path = _write_jsonl(tmp_path / f"c{n}.jsonl", [cut])
        with pytest.raises(ManifestError, match=msg) as e:
            load_manifest(path)
        assert f"c{n}.jsonl:1" in str(e.value)
    # a Resample transform is fine: the file is read at its original rate and resampled by read_audio
    rs = {**rec, "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0,
          "transforms": [{"name": "Resample", "kwargs": {"source_sampling_rate": 44100,
                                                          "target_sampling_rate": 16000}}]}
    path = _write_jsonl(tmp_path / "rs.jsonl", [{"id": "x", "start": 0, "duration": 1.0, "channel": 0,
                                                 "recording": rs, "type": "MonoCut"}])
    (u,) = load_manifest(path)
    assert (u.sample_rate, u.num_samples, u.num_samples_at(16000)) == (44100, 44100, 16000)


def test_recordings_and_supervisions(tmp_path):
    recs = _write_jsonl(tmp_path / "recs.jsonl", [_recording("r1", "/r1.wav", n=48000),
                                                  _recording("r2", "/r2.wav", n=16000)])
    sups = _write_jsonl(tmp_path / "sups.jsonl.gz", [
        {"id": "r1-b", "recording_id": "r1", "start": 1.5, "duration": 1.5, "channel": 0, "text": "b"},
        {"id": "r1-a", "recording_id": "r1", "start": 0.0, "duration": 1.5, "channel": 0, "text": "a"},
    ], gz=True)
    # recording-level utterances, text joined in time order
    r1, r2 = load_manifest(recs, supervisions=sups)
    assert (r1.id, r1.num_samples, r1.text, r2.text) == ("r1", 48000, "a b", None)
    assert load_manifest(recs)[0].text is None
    # supervision-level utterances: segments of their recordings
    b, a = load_manifest(sups, recordings=recs)
    assert (a.id, a.offset, a.num_samples, a.audio, a.text) == ("r1-a", 0.0, 24000, "/r1.wav", "a")
    assert (b.offset, b.duration, b.num_samples) == (1.5, 1.5, 24000)
    with pytest.raises(ManifestError, match="pass its RecordingSet as recordings="):
        load_manifest(sups)
    orphan = _write_jsonl(tmp_path / "o.jsonl", [{"id": "s", "recording_id": "zz", "start": 0, "duration": 1}])
    with pytest.raises(ManifestError, match="unknown recording 'zz'"):
        load_manifest(orphan, recordings=recs)


def test_write_lhotse_cuts_round_trip(tmp_path):
    a = _wav(tmp_path / "a.wav", 16000)
    b = _wav(tmp_path / "b.wav", 44100, sr=22050, channels=2)
    utts = [Utterance(id="ua", audio=a, text="one two", speaker="s1"),
            Utterance(id="ub1", audio=b, offset=0.5, duration=0.5, channel=1, text="three"),
            Utterance(id="ub2", audio=b, offset=1.0, duration=1.0, channel=None)]
    out = str(tmp_path / "cuts.jsonl.gz")
    write_lhotse_cuts(utts, out)
    with gzip.open(out, "rt") as f:
        lines = [json.loads(x) for x in f]
    ca, cb1, cb2 = lines
    # the fields lhotse's MonoCut/Recording/SupervisionSegment need
    assert ca["type"] == "MonoCut" and cb2["type"] == "MultiCut" and cb2["channel"] == [0, 1]
    for c in lines:
        assert {"id", "start", "duration", "channel", "supervisions", "recording", "type"} <= set(c)
        assert {"id", "sources", "sampling_rate", "num_samples", "duration"} <= set(c["recording"])
        assert c["supervisions"][0]["recording_id"] == c["recording"]["id"]
    assert ca["recording"] == {"id": "ua", "sources": [{"type": "file", "channels": [0], "source": a}],
                               "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0, "channel_ids": [0]}
    assert cb1["recording"]["id"] == cb2["recording"]["id"] == "b"  # shared file, shared recording
    assert cb1["recording"]["num_samples"] == 44100 and cb1["recording"]["sources"][0]["channels"] == [0, 1]
    back = load_manifest(out)
    assert back[0] == Utterance(id="ua", audio=a, sample_rate=16000, num_samples=16000, duration=1.0,
                                text="one two", speaker="s1")
    assert (back[1].offset, back[1].num_samples, back[1].channel, back[1].text) == (0.5, 11025, 1, "three")
    assert (back[2].channel, back[2].num_samples) == (None, 22050)
    with pytest.raises(ManifestError, match="duplicate utterance ids: 'ua'"):
        write_lhotse_cuts([utts[0], utts[0]], str(tmp_path / "dup.jsonl"))
    assert not os.path.exists(tmp_path / "dup.jsonl")


def test_write_jsonl_round_trip(tmp_path):
    utts = [Utterance(id="a", audio="/a.wav", sample_rate=16000, num_samples=100, duration=100 / 16000, text="x"),
            Utterance(id="b", audio="/b.flac", offset=1.5, channel=None, speaker="s")]
    out = str(tmp_path / "m.jsonl")
    write_jsonl_manifest(utts, out)
    assert load_manifest(out) == utts


def test_probe_missing(tmp_path):
    a = _wav(tmp_path / "a.wav", 12345, sr=22050)
    b = _wav(tmp_path / "b.wav", 16000)
    utts = [Utterance(id="a", audio=a), Utterance(id="b", audio=b, offset=0.25),
            Utterance(id="c", audio=b, sample_rate=16000, num_samples=10, duration=10 / 16000)]
    pa, pb, pc = probe_missing(utts, max_workers=2)
    assert (pa.sample_rate, pa.num_samples, pa.duration) == (22050, 12345, 12345 / 22050)
    assert (pb.sample_rate, pb.num_samples) == (16000, 12000)  # the rest of the file after the offset
    assert pc is utts[2]  # nothing to probe
    with pytest.raises(AudioError, match="not found"):
        probe_utterance(Utterance(id="z", audio=str(tmp_path / "missing.wav")))
    with pytest.raises(AudioError, match="sample rate"):
        probe_utterance(Utterance(id="y", audio=a, sample_rate=16000))


def test_manifest_on_s3(tmp_path, s3_bucket):
    url, so = s3_bucket
    a = _wav(tmp_path / "a.wav", 8000)
    utts = [Utterance(id="a", audio=a, text="hi")]
    write_lhotse_cuts(utts, f"{url}/cuts.jsonl.gz", storage_options=so)
    write_jsonl_manifest(utts, f"{url}/plain.jsonl", storage_options=so)
    (c,) = load_manifest(f"{url}/cuts.jsonl.gz", storage_options=so)
    assert (c.id, c.num_samples, c.text) == ("a", 8000, "hi")
    assert load_manifest(f"{url}/plain.jsonl", storage_options=so) == utts


def _lhotse_corpus(tmp_path):
    """Three utterances as lhotse writes them: cuts of two real files, one starting inside its recording."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    rng = np.random.default_rng(3)
    for name, n in (("a", 24000), ("b", 40000)):
        sf.write(str(tmp_path / f"{name}.wav"), (0.3 * rng.standard_normal(n)).astype(np.float32), 16000,
                 subtype="PCM_16")
    ra, rb = (Recording.from_file(str(tmp_path / f"{x}.wav"), recording_id=x) for x in "ab")
    sup = lambda cid, d, t: [SupervisionSegment(id=cid, recording_id="r", start=0, duration=d, text=t)]  # noqa
    return CutSet.from_cuts([
        MonoCut(id="u1", start=0.0, duration=1.5, channel=0, recording=ra, supervisions=sup("u1", 1.5, "one")),
        MonoCut(id="u2", start=0.3, duration=1.2, channel=0, recording=rb, supervisions=sup("u2", 1.2, "two")),
        MonoCut(id="u3", start=1.6, duration=0.9, channel=0, recording=rb, supervisions=sup("u3", 0.9, "three")),
    ])


def test_lhotse_shar_reads_the_same_audio_as_jsonl(tmp_path):
    """A CutSet exported as Lhotse Shar (audio inside tar shards) gives the same utterances and samples."""
    from distill.data.audio import read_audio

    cuts = _lhotse_corpus(tmp_path)
    cuts.to_file(str(tmp_path / "cuts.jsonl.gz"))
    (tmp_path / "shar").mkdir()
    cuts.to_shar(str(tmp_path / "shar"), fields={"recording": "flac"}, shard_size=2)
    plain, shar = load_manifest(str(tmp_path / "cuts.jsonl.gz")), load_manifest(str(tmp_path / "shar"))
    assert [u.id for u in shar] == [u.id for u in plain] == ["u1", "u2", "u3"]
    assert [u.audio.split("::")[0] for u in shar] == ["tar://u1.flac", "tar://u2.flac", "tar://u3.flac"]
    for p, s in zip(plain, shar):
        assert (p.num_samples_at(16000), p.text) == (s.num_samples_at(16000), s.text)
        np.testing.assert_array_equal(read_audio(p, 16000), read_audio(s, 16000))
    assert plain[1].offset == 0.3 and shar[1].offset == 0.0  # Shar stores each cut's own audio


def test_speed_perturbed_and_mixed_cuts_are_read_as_lhotse_renders_them(tmp_path):
    """What the teacher would hear: lhotse's own rendering of perturbed and mixed cuts, resampled by us."""
    from lhotse import CutSet

    from distill.data.audio import read_audio, resample

    cuts = _lhotse_corpus(tmp_path)
    fast = cuts[1].perturb_speed(1.1)
    mixed = cuts[0].mix(cuts[2], offset_other_by=0.2)
    CutSet.from_cuts([fast, mixed]).to_file(str(tmp_path / "aug.jsonl.gz"))
    uf, um = load_manifest(str(tmp_path / "aug.jsonl.gz"))
    assert uf.id == fast.id and uf.num_samples == fast.num_samples and uf.lhotse_cut is not None
    assert um.num_samples == mixed.num_samples and um.text == "one three"
    for u, c in ((uf, fast), (um, mixed)):
        got = read_audio(u, 8000)
        assert len(got) == u.num_samples_at(8000)
        np.testing.assert_allclose(got, resample(c.load_audio()[0], 16000, 8000), atol=1e-6)
    # plain cuts (one file, no transform) still go through our own fsspec reader
    cuts.to_file(str(tmp_path / "plain.jsonl.gz"))
    assert all(u.lhotse_cut is None for u in load_manifest(str(tmp_path / "plain.jsonl.gz")))
