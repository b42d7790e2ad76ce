"""The CLI's error surface: every command turns the project's errors into one `Error:` line that names the file,
utterance or option, with the documented exit status (cli/errors.py), and no traceback unless --debug or
CI_STORE_DEBUG asks for one; a bug (any other exception) still escapes with its traceback."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from ci_store import create, plan_shards
from cli.errors import EXIT_STATUSES, exit_status_for
from cli.main import main

STORE, MANIFEST, AUDIO, TEACHER, QUANTIZER, EXTRACTION, CONFIG = 3, 4, 5, 6, 7, 8, 9
USAGE = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Three 1 s noise utterances, a random-weight native teacher (dim 32, 2 layers), a quantizer for it, frames,
    and one file for each kind of bad input."""
    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.teachers import NativeTeacherConfig, NativeTeacherModel, save_native_teacher

    d = tmp_path_factory.mktemp("cli-errors")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        wav = d / f"u{i}.wav"
        sf.write(wav, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": str(wav), "text": "HELLO WORLD", "sample_rate": 16000,
                     "num_samples": 16000})
    corrupt = d / "corrupt.flac"
    corrupt.write_bytes(b"\x00 not audio " * 300)
    bad = {"id": "bad1", "audio": str(corrupt), "text": "HELLO WORLD"}
    torch.manual_seed(0)
    teacher = str(d / "teacher.safetensors")
    save_native_teacher(NativeTeacherModel(NativeTeacherConfig(d_model=32, num_heads=2, ffn_dim=64, num_layers=2)),
                        teacher)
    quantizer = str(d / "q.safetensors")
    MultiCodebookQuantizer.train(rng.standard_normal((600, 32)).astype(np.float32), num_codebooks=4, seed=0,
                                 progress=False).save(quantizer)
    frames = str(d / "frames.npy")
    np.save(frames, rng.standard_normal((300, 32)).astype(np.float32))
    pickled = str(d / "pickled.npy")
    np.save(pickled, np.array([{"frames": 1}], dtype=object), allow_pickle=True)
    notes = d / "notes.txt"
    notes.write_text("not frames, not a store\n")
    other = create(str(d / "other-store"), plan_shards([("x0", 10)], 64), num_codebooks=4, frame_rate=50.0)
    other.write_shard(0, {"x0": np.zeros((10, 4), np.uint8)})
    return SimpleNamespace(
        dir=d, manifest=_jsonl(d / "m.jsonl", rows), dup=_jsonl(d / "dup.jsonl", rows + [rows[1]]),
        missing=str(d / "no-such-manifest.jsonl"), corrupt=str(corrupt),
        bad_audio=_jsonl(d / "bad.jsonl", [bad]),  # no lengths: commands probe the file header
        bad_audio_sized=_jsonl(d / "bad-sized.jsonl", [{**bad, "sample_rate": 16000, "num_samples": 16000}]),
        no_text=_jsonl(d / "notext.jsonl", [{k: v for k, v in r.items() if k != "text"} for r in rows]),
        teacher=teacher, quantizer=quantizer, frames=frames, pickled=pickled, notes=str(notes),
        other_store=other.url)


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_error(r, status: int, *names: str) -> str:
    """Exit `status`, exactly one `Error:` line containing every name, and no traceback or escaped exception."""
    assert r.exit_code == status, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # nothing escaped to print a traceback
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.output
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ the table
def test_every_mapped_class_exists_and_statuses_are_distinct():
    statuses = [s for s, *_ in EXIT_STATUSES]
    assert len(set(statuses)) == len(statuses) and min(statuses) > USAGE
    for status, _, names, _ in EXIT_STATUSES:
        for name in names:
            mod, qual = name.split(":")
            cls = getattr(importlib.import_module(mod), qual)
            assert issubclass(cls, Exception) and exit_status_for(cls.__new__(cls)) == status
    r = run("--help")
    assert r.exit_code == 0
    assert all(f"  {s}  " in r.output for s in statuses) and "CI_STORE_DEBUG" in r.output


def test_subclasses_map_with_their_base():
    from distill.codec.quantizer import QuantizerFileNotFoundError
    from distill.data.dataset import LabelsMissingError
    from distill.synth.corpus import EspeakMissingError

    assert exit_status_for(QuantizerFileNotFoundError("q")) == QUANTIZER
    assert exit_status_for(LabelsMissingError("u")) == STORE
    assert exit_status_for(EspeakMissingError("e")) == CONFIG
    assert exit_status_for(ValueError("a bug")) is None and exit_status_for(KeyError("k")) is None


# ------------------------------------------------------------------------------------------- sample-frames
def test_sample_frames_errors(kit, tmp_path):
    out = tmp_path / "f.npy"
    base = ["--teacher", kit.teacher, "--layer", 2, "--out", out, "--num-utterances", 3]
    assert_error(run("sample-frames", kit.missing, *base), MANIFEST, kit.missing, "not found")
    assert_error(run("sample-frames", kit.dup, *base), MANIFEST, kit.dup, "duplicate", "'u1'")
    assert_error(run("sample-frames", kit.manifest, *base[:2], "--layer", 5, *base[4:]), TEACHER,
                 kit.teacher, "layer 5 out of range", "0..2")
    assert_error(run("sample-frames", kit.manifest, "--teacher", kit.quantizer, *base[2:]), TEACHER,
                 kit.quantizer, "is a quantizer file", "--quantizer")
    gone = str(tmp_path / "gone.safetensors")
    assert_error(run("sample-frames", kit.manifest, "--teacher", gone, *base[2:]), TEACHER, gone, "not found")
    line = assert_error(run("sample-frames", kit.bad_audio, *base), EXTRACTION, kit.corrupt, "'bad1'",
                        "unreadable or corrupt audio")
    assert "object at 0x" not in line and "Opener" not in line  # the path, never a file object's repr
    r = run("sample-frames", kit.manifest, *base, "--storage-options", "{anon: true}")
    assert_error(r, USAGE, "--storage-options", "not valid JSON")
    assert not out.exists()


# ----------------------------------------------------------------------------------------- train-quantizer
def test_train_quantizer_errors(kit, tmp_path):
    out = tmp_path / "q.safetensors"
    line = assert_error(run("train-quantizer", kit.pickled, "--out", out), QUANTIZER, kit.pickled, "pickled",
                        "sample-frames")
    assert "allow_pickle" not in line and "unsafely" not in line  # numpy's advice must not reach the user
    assert_error(run("train-quantizer", kit.notes, "--out", out), QUANTIZER, kit.notes, "not a .npy file")
    assert_error(run("train-quantizer", kit.quantizer, "--out", out), QUANTIZER, kit.quantizer, "not a .npy")
    gone = str(tmp_path / "gone.npy")
    assert_error(run("train-quantizer", gone, "--out", out), QUANTIZER, gone, "not found")
    assert_error(run("train-quantizer", kit.frames, "--out", out, "--codebook-size", 100), USAGE,
                 "--codebook-size", "power of two")
    assert_error(run("train-quantizer", kit.frames, "--out", out, "--held-out", 1), USAGE, "--held-out")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- extract
def test_extract_errors_before_any_work(kit, tmp_path):
    out = tmp_path / "store"

    def extract(manifest, teacher=kit.teacher, layer=2, quantizer=kit.quantizer, dest=out, *extra):
        return run("extract", manifest, "--teacher", teacher, "--layer", layer, "--quantizer", quantizer,
                   "--out", dest, "--workers", 1, "--no-progress", *extra)

    assert_error(extract(kit.missing), MANIFEST, kit.missing, "not found")
    assert_error(extract(kit.dup), MANIFEST, kit.dup, "duplicate", "'u1'")
    assert_error(extract(kit.manifest, layer=3), TEACHER, kit.teacher, "layer 3 out of range")
    assert_error(extract(kit.manifest, teacher=kit.quantizer), TEACHER, kit.quantizer, "is a quantizer file")
    assert_error(extract(kit.manifest, quantizer=kit.teacher), QUANTIZER, kit.teacher, "teacher checkpoint",
                 "--teacher")
    assert_error(extract(kit.manifest, quantizer=kit.notes), QUANTIZER, kit.notes, "not a ci-store MVQ quantizer")
    gone = str(tmp_path / "gone.safetensors")
    assert_error(extract(kit.manifest, quantizer=gone), QUANTIZER, gone, "not found")
    assert_error(extract(kit.manifest, dest=kit.notes), EXTRACTION, kit.notes, "output store")
    assert_error(extract(kit.manifest, kit.teacher, 2, kit.quantizer, out, "--storage-options", "[1]"), USAGE,
                 "--storage-options", "JSON object")
    assert not out.exists()


def test_device_and_dtype_option_errors(kit, tmp_path):
    """--device on sample-frames, train-quantizer and extract: a malformed value, or a device this machine cannot
    compute on, is a bad option value (status 2) named before any work."""
    out = tmp_path / "out"
    unusable = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    commands = {
        "sample-frames": ["sample-frames", kit.manifest, "--teacher", kit.teacher, "--layer", 2, "--out", out],
        "train-quantizer": ["train-quantizer", kit.frames, "--out", out],
        "extract": ["extract", kit.manifest, "--teacher", kit.teacher, "--layer", 2, "--quantizer", kit.quantizer,
                    "--out", out, "--no-progress"],
    }
    for name, args in commands.items():
        assert_error(run(*args, "--device", "gpu"), USAGE, "--device", "'gpu' is not a device", "cuda:N")
        assert_error(run(*args, "--device", unusable), USAGE, "--device",
                     "CUDA device(s) visible" if torch.cuda.is_available() else "no CUDA device is usable here")
    assert_error(run(*commands["extract"], "--teacher-dtype", "half"), USAGE, "--teacher-dtype", "half")
    assert_error(run(*commands["extract"], "--scheduler", "tcp://127.0.0.1:1", "--cluster", "slurm", "--jobs", 1),
                 USAGE, "--scheduler", "--cluster", "not both")
    assert_error(run(*commands["extract"], "--cluster", "slurm", "--jobs", 1, "--cluster-options", "[1]"), USAGE,
                 "--cluster-options", "JSON object")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- train-teacher
def test_train_teacher_errors(kit, tmp_path):
    out = tmp_path / "t.safetensors"
    small = ["--d-model", 32, "--heads", 2, "--layers", 1, "--max-steps", 1, "--quiet"]
    assert_error(run("train-teacher", "--train", kit.missing, "--out", out, *small), MANIFEST, kit.missing)
    assert_error(run("train-teacher", "--train", kit.dup, "--out", out, *small), MANIFEST, "duplicate", "'u1'")
    assert_error(run("train-teacher", "--train", kit.bad_audio, "--out", out, *small), AUDIO, kit.corrupt,
                 "'bad1'")
    assert_error(run("train-teacher", "--train", kit.no_text, "--out", out, *small), CONFIG,
                 "no transcript", "'u0'")
    assert_error(run("train-teacher", "--train", kit.manifest, "--out", out, "--d-model", 30, "--heads", 4),
                 USAGE, "--d-model 30 must be divisible by --heads 4")
    assert_error(run("train-teacher", "--train", kit.manifest, "--out", out, "--lr", 0), USAGE, "--lr")
    assert not out.exists()


# ---------------------------------------------------------------------------------- train-student, evaluate
def test_train_student_errors(kit, tmp_path):
    out = tmp_path / "run"
    fast = ["--out", out, "--epochs", 1, "--no-progress"]
    assert_error(run("train-student", "--train", kit.missing, "--kd", "none", *fast), MANIFEST, kit.missing)
    assert_error(run("train-student", "--train", kit.dup, "--kd", "none", *fast), MANIFEST, "'u1'")
    assert_error(run("train-student", "--train", kit.manifest, "--kd", "mvq", *fast), CONFIG, "--labels")
    assert_error(run("train-student", "--train", kit.manifest, "--labels", kit.notes, *fast), STORE, kit.notes,
                 "not a ci-store")
    assert_error(run("train-student", "--train", kit.manifest, "--labels", kit.other_store, *fast), STORE,
                 "'u0'", kit.other_store)
    assert_error(run("train-student", "--train", kit.manifest, "--kd", "none", "--student", '{"d_modle": 8}',
                     *fast), CONFIG, "--student", "d_modle")
    assert_error(run("train-student", "--train", kit.manifest, "--kd", "none", "--student", "{oops", *fast),
                 USAGE, "--student")
    assert_error(run("train-student", "--train", kit.manifest, "--kd", "none", "--tokenizer", kit.notes, *fast),
                 USAGE, "--tokenizer", kit.notes)
    assert_error(run("train-student", "--train", kit.bad_audio_sized, "--kd", "none", *fast), AUDIO, kit.corrupt,
                 "'bad1'")


def test_evaluate_errors(kit, tmp_path):
    assert_error(run("evaluate", tmp_path / "nothing", kit.manifest), CONFIG, tmp_path / "nothing",
                 "not a train-student run directory")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert_error(run("evaluate", half, kit.manifest), CONFIG, "last.safetensors")


# -------------------------------------------------------------------------------- inspect, verify, compare
def test_store_command_errors(kit, tmp_path):
    gone = str(tmp_path / "nothing-here")
    assert_error(run("inspect", gone), STORE, gone, "not a ci-store")
    assert_error(run("inspect", kit.notes), STORE, "not a ci-store")
    assert_error(run("compare", kit.other_store, gone), STORE, gone, "not a ci-store")
    for cmd in ("inspect", "verify", "compare"):
        assert_error(run(cmd, kit.other_store, "--storage-options", "{x"), USAGE, "--storage-options")
    r = run("verify", gone)  # verify reports problems (status 1), it does not raise
    assert r.exit_code == 1 and "not a ci-store" in r.output and "Traceback" not in r.output
    assert run("inspect", kit.other_store).exit_code == 0


# ---------------------------------------------------------------------------------------------- make-corpus
def test_make_corpus_errors(tmp_path):
    assert_error(run("make-corpus", tmp_path / "c", "--hours", 0), USAGE, "--hours")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert_error(run("make-corpus", busy, "--hours", 0.001), CONFIG, str(busy), "not empty")
    assert (busy / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------- debug and bugs
@pytest.mark.parametrize("how", ["--debug", "env"])
def test_debug_shows_the_traceback_with_the_same_status(tmp_path, how):
    gone = str(tmp_path / "nothing-here")
    args = ["--debug", "inspect", gone] if how == "--debug" else ["inspect", gone]
    r = run(*args, env={"CI_STORE_DEBUG": "1"} if how == "env" else None)
    assert r.exit_code == STORE, r.output
    assert "Traceback (most recent call last)" in r.output and "StoreError" in r.output
    assert r.output.rstrip().splitlines()[-1].startswith(f"Error: {gone}")
    r = run("inspect", gone, env={"CI_STORE_DEBUG": "0"})
    assert_error(r, STORE, gone)


def test_unexpected_exception_keeps_its_traceback(kit, monkeypatch):
    import ci_store

    def broken(*a, **k):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(ci_store, "open_store", broken)
    r = run("inspect", kit.other_store)
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1  # not turned into an `Error:` line
    assert "Error:" not in r.output


def test_real_process_prints_one_line_and_the_status(kit, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CI_STORE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "cli", "train-quantizer", kit.pickled, "--out",
                          str(tmp_path / "q.safetensors")], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == QUANTIZER, res.stderr
    assert "Traceback" not in res.stderr and "unsafely" not in res.stderr and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("Error: ")
    assert kit.pickled in res.stderr
