"""The `make demo` / paper-table pipeline end to end at a tiny size: every `ci-store` step runs, resumes, reports."""
import json
import os
import shutil

import pytest

from ci_store import open_store
from distill.data.manifest import load_manifest
from distill.data.tokenizer import normalize_text
from distill.experiment import Sizes, result_table, run_pipeline, storage_table
from distill.student.trainer import evaluate_model, load_student
from scoring import edit_distance


TINY = Sizes(hours=0.02, student_hours=0.01, dev_hours=0.005, test_hours=0.005, teacher_d_model=64, teacher_layers=2,
             teacher_epochs=1, teacher_layer=2, num_codebooks=2, sample_utterances=10, student_epochs=1,
             student_max_seconds=20.0, student_warmup_steps=2,
             student={"d_model": 32, "num_layers": 1, "num_heads": 2}, kd_runs=("none", "mvq", "l2", "mvq1"), workers=1,
             rnnt_loss="pruned")  # train-student's default, named here so the test keeps meaning it


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the project needs it: `make sysdeps` (apt-get install espeak-ng)")
    work = str(tmp_path_factory.mktemp("exp"))
    lines: list[str] = []
    summary = run_pipeline(work, TINY, log=lines.append)
    return work, summary, lines


def test_every_step_ran_and_results_are_complete(pipeline):
    work, summary, lines = pipeline
    assert set(summary["results"]) == {"none", "mvq", "l2", "mvq1"}
    manifests = {split: load_manifest(os.path.join(work, "corpus", f"cuts_{split}.jsonl.gz"))
                 for split in ("dev", "test")}
    for kd, res in summary["results"].items():
        model, tok = load_student(os.path.join(work, "students", kd))
        for split, utts in manifests.items():
            r = res[split]
            # the scores the pipeline recorded are those of the student's hypotheses against the references
            refs = [normalize_text(u.text) for u in utts]
            assert r["words"] == sum(len(t.split()) for t in refs) > 0
            assert r["chars"] == sum(len(t) for t in refs)
            hyps = evaluate_model(model, tok, utts, return_hyps=True)["hyps"]
            assert r["errors"] == sum(edit_distance(t.split(), hyps[u.id].split()) for u, t in zip(utts, refs))
            assert r["char_errors"] == sum(edit_distance(t, hyps[u.id]) for u, t in zip(utts, refs))
            assert r["wer"] == pytest.approx(r["errors"] / r["words"])
            assert r["cer"] == pytest.approx(r["char_errors"] / r["chars"])
        assert res["train_seconds"] > 0
        with open(os.path.join(work, "students", kd, "config.json")) as f:
            assert json.load(f)["student"]["rnnt_loss"] == "pruned"
        assert os.path.exists(os.path.join(work, "students", kd, "final.json"))
    for step in ("corpus", "teacher", "sample_frames", "train_quantizer", "extract"):
        assert summary["timings"][step] > 0
    # every step is a `ci-store` command a user can type
    for cmd in ("make-corpus", "train-teacher", "sample-frames", "train-quantizer", "extract", "verify", "compare",
                "train-student"):
        assert any(line.startswith(f"$ ci-store {cmd} ") for line in lines), cmd
    with open(os.path.join(work, "summary.json")) as f:
        assert json.load(f)["results"].keys() == summary["results"].keys()


def test_storage_is_measured_on_the_stores(pipeline):
    _, summary, _ = pipeline
    by = {s["label"]: s for s in summary["storage"]}
    ci, f16, f32 = by[f"CI {TINY.num_codebooks}xuint8"], by["float16"], by["float32"]
    st = open_store(summary["stores"]["ci"])
    assert ci["frames"] == f16["frames"] == f32["frames"] == sum(st[u].shape[0] for u in st.ids) > 0
    assert ci["dim"] == TINY.teacher_d_model
    # 2 one-byte codes per 64-dim frame: at most 128x less than float32 (on a store this small the fixed shard
    # index costs several bytes per frame, so well below that)
    assert 8 < ci["label_ratio_vs_float32"] <= 128
    assert ci["label_bytes"] + ci["quantizer_bytes"] == ci["bytes"]
    assert f32["bytes"] > f16["bytes"] > 4 * ci["label_bytes"]
    # the extra 1-codebook run has its own quantizer and store (on a store this small the 16 KiB shard index
    # is most of either, so only the order is checked)
    one = by["CI 1xuint8"]
    assert one["frames"] == ci["frames"]
    assert one["label_bytes"] < ci["label_bytes"] and one["quantizer_bytes"] < ci["quantizer_bytes"]
    assert one["label_ratio_vs_float32"] > ci["label_ratio_vs_float32"]
    assert "| mvq | CI store |" in result_table(summary)
    assert "| mvq1 | CI store, 1 B/frame |" in result_table(summary)
    assert "CI 2xuint8" in storage_table(summary)


def test_rerun_resumes_without_redoing_work(pipeline):
    work, summary, _ = pipeline
    lines: list[str] = []
    again = run_pipeline(work, TINY, log=lines.append)
    ran = [line for line in lines if line.startswith("$ ci-store train-student") or
           line.startswith("$ ci-store train-teacher") or line.startswith("$ ci-store make-corpus")]
    assert ran == []
    assert again["timings"] == summary["timings"]
    assert {k: v["test"] for k, v in again["results"].items()} == {k: v["test"] for k, v in summary["results"].items()}
