"""The espeak-ng corpus generator: real files, exact manifests, disjoint splits, byte-for-byte reproducibility."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from distill.data.manifest import load_manifest
from distill.synth import corpus as C
from distill.synth.text import extract_sentences, load_sentences, normalise, split_sentences

# ~12 utterances per corpus, a couple of seconds to make.
TINY = dict(hours=14 / 3600, dev_hours=8 / 3600, test_hours=8 / 3600, student_hours=5 / 3600, progress=False)
NORMALISED = re.compile(r"^[A-Z']+( [A-Z']+){3,19}$")


def _require_espeak():
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the project needs it: `make sysdeps` (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Seed 0 twice (2 workers / 1 worker, different dirs) and seed 1 once."""
    _require_espeak()
    root = tmp_path_factory.mktemp("corpus")
    a = C.make_corpus(str(root / "a"), seed=0, workers=2, **TINY)
    b = C.make_corpus(str(root / "b"), seed=0, workers=1, **TINY)
    c = C.make_corpus(str(root / "c"), seed=1, workers=2, **TINY)
    return a, b, c


def _cuts(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_espeak_is_installed():
    _require_espeak()


def test_manifests_match_the_audio_files(corpora):
    paths = corpora[0]
    assert set(paths) == {"train", "dev", "test", "train_small"}
    total = 0
    for split, path in paths.items():
        cuts = _cuts(path)
        assert cuts, split
        plain = [json.loads(line) for line in open(os.path.join(os.path.dirname(path), f"{split}.jsonl"))]
        assert [p["id"] for p in plain] == [c["id"] for c in cuts]
        for c, p in zip(cuts, plain):
            rec, (sup,) = c["recording"], c["supervisions"]
            assert c["type"] == "MonoCut" and c["start"] == 0.0 and c["channel"] == 0
            assert rec["sources"] == [{"type": "file", "channels": [0], "source": p["audio"]}]
            info = sf.info(p["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert rec["num_samples"] == info.frames == p["num_samples"]
            assert rec["sampling_rate"] == 16000 and rec["channel_ids"] == [0]
            assert c["duration"] == rec["duration"] == sup["duration"] == info.frames / 16000
            assert sup["recording_id"] == rec["id"] == c["id"] and sup["language"] == "English"
            assert sup["speaker"] == p["speaker"] and sup["speaker"] in [f"{b}+{v}" for b in C.BASE_VOICES
                                                                         for v in C.VARIANTS]
            assert sup["text"] == p["text"] and NORMALISED.match(sup["text"]), sup["text"]
            x, _ = sf.read(p["audio"], dtype="int16")
            assert 0.5 < x.size / 16000 < 15 and np.abs(x).max() > 3000  # speech-length, audible
        total += len(cuts) if split != "train_small" else 0
    assert 8 <= total <= 20


def test_split_sizes_follow_the_hours(corpora):
    hours = {s: sum(c["duration"] for c in _cuts(p)) / 3600 for s, p in corpora[0].items()}
    for split, key in (("train", "hours"), ("dev", "dev_hours"), ("test", "test_hours"),
                       ("train_small", "student_hours")):
        # filled utterance by utterance until the target is reached: at most one utterance (< 15 s) over
        assert TINY[key] <= hours[split] < TINY[key] + 15 / 3600, split


def test_splits_share_no_sentences_and_student_set_is_a_train_subset(corpora):
    texts = {s: {c["supervisions"][0]["text"] for c in _cuts(p)} for s, p in corpora[0].items()}
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    train = {c["id"]: c for c in _cuts(corpora[0]["train"])}
    small = _cuts(corpora[0]["train_small"])
    assert small and all(train[c["id"]] == c for c in small) and len(small) < len(train)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(corpora):
    a, b, _ = corpora
    root_a, root_b = os.path.dirname(a["train"]), os.path.dirname(b["train"])
    for split in a:
        ca, cb = _cuts(a[split]), _cuts(b[split])
        assert json.dumps(ca).replace(root_a, "ROOT") == json.dumps(cb).replace(root_b, "ROOT"), split
        for x, y in zip(ca, cb):
            assert _digest(x["recording"]["sources"][0]["source"]) == _digest(y["recording"]["sources"][0]["source"])


def test_different_seed_gives_a_different_corpus(corpora):
    a, _, c = corpora
    ta = [(x["supervisions"][0]["text"], x["supervisions"][0]["speaker"]) for x in _cuts(a["train"])]
    tc = [(x["supervisions"][0]["text"], x["supervisions"][0]["speaker"]) for x in _cuts(c["train"])]
    assert ta != tc
    da = {_digest(x["recording"]["sources"][0]["source"]) for x in _cuts(a["train"])}
    dc = {_digest(x["recording"]["sources"][0]["source"]) for x in _cuts(c["train"])}
    assert not da & dc


def test_manifest_reader_accepts_the_cuts(corpora):
    path = corpora[0]["dev"]
    utts = load_manifest(path)
    cuts = _cuts(path)
    assert [u.id for u in utts] == [c["id"] for c in cuts]
    assert [u.num_samples for u in utts] == [c["recording"]["num_samples"] for c in cuts]
    assert [u.text for u in utts] == [c["supervisions"][0]["text"] for c in cuts]


def test_noise_is_added_at_the_drawn_snr(tmp_path):
    _require_espeak()
    spec = C._make_spec(3, "train_000042", "train", "SHE HAD VERY LITTLE NOTICE FROM ANY BUT HIM",
                        ["en-us+m3"], (20.0, 20.0))
    clean = C._render(C._Spec(**{**spec.__dict__, "snr_db": 200.0}), 3, 16000, True).astype(np.float64)
    noisy = C._render(spec, 3, 16000, True).astype(np.float64)
    assert clean.shape == noisy.shape
    a = noisy @ clean / (clean @ clean)  # both are peak-normalised: fit the speech part's gain
    snr = 10 * np.log10(np.sum((a * clean) ** 2) / np.sum((noisy - a * clean) ** 2))
    assert abs(snr - 20.0) < 0.5, snr


def test_trim_keeps_the_drawn_padding():
    rate = 16000
    x = np.zeros(3 * rate)
    x[rate:rate + rate // 2] = np.sin(np.arange(rate // 2) * 0.3)
    y = C._trim(x, rate, (0.1, 0.2))
    assert abs(y.size - int(0.8 * rate)) <= rate // 100
    assert np.array_equal(C._trim(np.ones(50), rate, (0.1, 0.1)), np.ones(50))


@pytest.mark.parametrize("freq", [300.0, 1000.0, 5000.0])
def test_resampler_reproduces_a_sine(freq):
    t = np.arange(22050) / 22050
    y = C.resample(np.sin(2 * np.pi * freq * t), 22050, 16000)
    assert y.size == -(-22050 * 16000 // 22050)
    ref = np.sin(2 * np.pi * freq * np.arange(y.size) / 16000)
    assert np.abs(y - ref)[800:-800].max() < 2e-3
    # above the new Nyquist: removed, not aliased
    assert np.abs(C.resample(np.sin(2 * np.pi * 9500 * t), 22050, 16000))[800:-800].max() < 0.05


def test_normalisation():
    assert normalise("\"Mr. Darcy's ball--it was to-morrow, & very fine!\" said she.") == \
        "MISTER DARCY'S BALL IT WAS TO MORROW AND VERY FINE SAID SHE"
    assert normalise("said he, quite calmly and slowly.") is None  # not a sentence start
    assert normalise("On the 23rd he was going away.") is None  # digits are dropped, not guessed
    assert normalise("Yes, sir.") is None  # too short
    assert normalise("CHAPTER THE FIRST AND LAST ONE") is None  # heading
    assert normalise("It was Mrs F. who came in the end.") is None  # initials
    assert normalise("The caf\u00e9 was 'quite' na\u00efve indeed.") == "THE CAFE WAS QUITE NAIVE INDEED"
    assert split_sentences("Mr. Knightley came. Did he? Yes; and she went.") == \
        ["Mr Knightley came.", "Did he?", "Yes;", "and she went."]
    assert extract_sentences(["It was a fine day for it.", "", "It was a fine day for it!", "He came in, late."]) \
        == ["IT WAS A FINE DAY FOR IT", "HE CAME IN LATE"]


def test_bundled_sentences_are_enough_distinct_normalised_text():
    sents = load_sentences()
    assert len(sents) >= 20000 and len(set(sents)) == len(sents)
    assert all(NORMALISED.match(s) for s in sents)
    words = sum(len(s.split()) for s in sents)
    assert words / len(sents) > 8  # ~3.5 s per utterance: 20k sentences cover far more than 10 h


def test_refuses_to_write_into_foreign_or_existing_output(tmp_path):
    _require_espeak()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(C.CorpusError, match="not empty"):
        C.make_corpus(str(foreign), hours=2 / 3600, dev_hours=0, test_hours=0, progress=False)
    assert os.listdir(foreign) == ["keep.txt"] and (foreign / "keep.txt").read_text() == "precious"
    out = tmp_path / "c"
    first = C.make_corpus(str(out), hours=2 / 3600, dev_hours=0, test_hours=0, student_hours=1 / 3600,
                          progress=False)
    before = _digest(first["train"])
    with pytest.raises(C.CorpusError, match="overwrite"):
        C.make_corpus(str(out), hours=2 / 3600, dev_hours=0, test_hours=0, progress=False)
    assert _digest(first["train"]) == before
    again = C.make_corpus(str(out), hours=2 / 3600, dev_hours=0, test_hours=0, progress=False, overwrite=True,
                          audio_format="wav")
    assert set(again) == {"train"} and not (out / "cuts_train_small.jsonl.gz").exists()
    assert sorted(os.listdir(out / "audio" / "train")) == \
        sorted(os.path.basename(c["recording"]["sources"][0]["source"]) for c in _cuts(again["train"]))


def test_bad_arguments_and_missing_voices_are_named(tmp_path):
    _require_espeak()
    with pytest.raises(C.CorpusError, match="hours"):
        C.make_corpus(str(tmp_path / "x"), hours=0)
    with pytest.raises(C.CorpusError, match="student_hours"):
        C.make_corpus(str(tmp_path / "x"), hours=1, student_hours=2)
    with pytest.raises(C.CorpusError, match="nosuchvariant"):
        C.make_corpus(str(tmp_path / "x"), hours=1, voices=["en-us+nosuchvariant"])
    assert not (tmp_path / "x").exists()


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(C.EspeakMissingError, match="apt-get install espeak-ng"):
        C.make_corpus(str(tmp_path / "x"), hours=1 / 3600, progress=False)


def test_cli_make_corpus(tmp_path):
    _require_espeak()
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["make-corpus", str(out), "--hours", str(3 / 3600), "--dev-hours", str(2 / 3600),
                                  "--test-hours", "0", "--seed", "5", "--relative-paths", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "train:" in r.output and "dev:" in r.output and "test:" not in r.output
    cuts = _cuts(out / "cuts_train.jsonl.gz")
    src = cuts[0]["recording"]["sources"][0]["source"]
    assert not os.path.isabs(src) and sf.info(str(out / src)).frames == cuts[0]["recording"]["num_samples"]
    r = CliRunner().invoke(main, ["make-corpus", str(out), "--hours", "1"])
    assert r.exit_code != 0 and "overwrite" in r.output


def test_pink_noise_has_equal_power_per_octave_and_white_does_not():
    def octave_ratio(colour):
        w = C._noise(np.random.default_rng(0), 160000, colour)
        assert abs(np.mean(w ** 2) - 1) < 1e-9
        p = np.abs(np.fft.rfft(w)) ** 2
        f = np.fft.rfftfreq(w.size, 1 / 16000)
        return p[(f >= 4000) & (f < 8000)].sum() / p[(f >= 500) & (f < 1000)].sum()

    assert 0.7 < octave_ratio("pink") < 1.4
    assert 6 < octave_ratio("white") < 10


def test_small_text_pool_is_reused_without_crossing_splits(tmp_path):
    _require_espeak()
    words = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA".split()
    lines = ["# a comment"] + [" ".join(words[i:i + 4]) for i in range(8)] + [" ".join(words[0:4])]  # one dup
    src = tmp_path / "sents.txt"
    src.write_text("\n".join(lines) + "\n")
    paths = C.make_corpus(str(tmp_path / "c"), hours=20 / 3600, dev_hours=1 / 3600, test_hours=1 / 3600,
                          sentences_path=str(src), progress=False)
    texts = {s: [c["supervisions"][0]["text"] for c in _cuts(p)] for s, p in paths.items()}
    assert len(texts["dev"]) == len(texts["test"]) == 1
    assert not set(texts["train"]) & (set(texts["dev"]) | set(texts["test"]))
    assert set(texts["train"]) <= {" ".join(words[i:i + 4]) for i in range(8)}
    assert len(texts["train"]) > len(set(texts["train"])) == 6  # the 6 train sentences, each used again
    pool = [f"S{i}" for i in range(5)]
    first, second = [[C._sentence_for(pool, k, 0, "train") for k in range(r, r + 5)] for r in (0, 5)]
    assert first == pool and sorted(second) == pool  # every further pass is a full reshuffled pass


def test_unnormalised_sentence_file_is_refused_by_line(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_text("A FINE DAY FOR IT\nIt was lower case here.\n")
    with pytest.raises(C.CorpusError, match=r"bad.txt:2"):
        C.make_corpus(str(tmp_path / "c"), hours=1 / 3600, sentences_path=str(src), progress=False)
    assert not (tmp_path / "c").exists()
