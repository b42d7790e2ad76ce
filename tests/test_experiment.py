"""The `make demo` / paper-table pipeline end to end at a tiny size: every `ci-store` step runs, resumes, reports."""
import json
import os
import shutil

import pytest

from ci_store import open_store
from distill.data.manifest import load_manifest
from distill.data.tokenizer import normalize_text
from distill.experiment import (Sizes, difference_table, extraction_table, extrapolation_table, result_table,
                                run_pipeline, speed_table, storage_table, student_runs)
from distill.student.trainer import evaluate_model, load_student
from scoring import edit_distance


TINY = Sizes(hours=0.02, student_hours=0.01, dev_hours=0.005, test_hours=0.005, teacher_d_model=64, teacher_layers=2,
             teacher_epochs=1, teacher_layer=2, num_codebooks=2, sample_utterances=10, student_epochs=1,
             student_max_seconds=20.0, student_warmup_steps=2,
             student={"d_model": 32, "num_layers": 1, "num_heads": 2}, kd_runs=("none", "mvq", "l2", "mvq1"), workers=1,
             rnnt_loss="pruned")  # train-student's default, named here so the test keeps meaning it


def _run(tmp_path_factory, name: str, sizes: Sizes):
    """(workdir, summary, printed lines) of a whole pipeline run in a fresh directory."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the project needs it: `make sysdeps` (apt-get install espeak-ng)")
    work = str(tmp_path_factory.mktemp(name))
    lines: list[str] = []
    summary = run_pipeline(work, sizes, log=lines.append)
    return work, summary, lines


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _run(tmp_path_factory, "exp", TINY)


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


# The bundled pre-trained teacher (no teacher training), the store students trained two at a time, and an
# on-the-fly run stopped after a few steps beside its timing twin.
WHISPER = Sizes(**{**TINY.__dict__, "teacher": "whisper-tiny.en", "teacher_layer": 2,
                   "kd_runs": ("none", "mvq", "online-mvq"), "online_max_steps": 1, "parallel_runs": 2})


@pytest.fixture(scope="module")
def whisper_pipeline(tmp_path_factory):
    return _run(tmp_path_factory, "exp_whisper", WHISPER)


def test_pretrained_teacher_pipeline_runs_every_step(whisper_pipeline):
    from distill.teachers import load_teacher

    work, summary, lines = whisper_pipeline
    assert not any(line.startswith("$ ci-store train-teacher") for line in lines)
    assert not os.path.exists(os.path.join(work, "teacher"))
    for cmd in ("make-corpus", "sample-frames", "train-quantizer", "extract", "verify", "compare", "train-student"):
        assert any(line.startswith(f"$ ci-store {cmd} ") for line in lines), cmd
    assert any(line.startswith("$ ci-store sample-frames ") and "--teacher whisper-tiny.en --layer 2" in line
               for line in lines)
    online = [line for line in lines if "--online-teacher" in line]
    assert len(online) == 1
    for part in ("--kd mvq ", "--online-teacher whisper-tiny.en --layer 2 --quantizer ", "--max-steps 1"):
        assert part in online[0], part
    assert "--labels" not in online[0]
    # its timing twin: the same KD from the CI store, the same steps, right before it
    trains = [line for line in lines if line.startswith("$ ci-store train-student ")]
    twin = next(line for line in trains if "students/timed-mvq " in line)
    assert trains.index(twin) == trains.index(online[0]) - 1
    assert f"--labels {summary['stores']['ci']} " in twin + " " and "--max-steps 1" in twin
    assert "--online-teacher" not in twin
    # two students at a time share the two threads: every run (twin and on-the-fly run too) gets one
    assert all("--threads 1 " in line for line in trains) and len(trains) == 4
    # the teacher entry describes the pre-trained teacher, as the CI store records it
    t = summary["teacher"]
    ref = load_teacher("whisper-tiny.en", layer=2)
    assert t["pretrained"] and t["name"] == ref.name and t["checkpoint_sha256"] == ref.checkpoint_sha256
    assert (t["layer"], t["num_layers"], t["dim"]) == (2, 4, 384)
    assert t["parameters"] == sum(p.numel() for p in ref.module.parameters())
    assert open_store(summary["stores"]["ci"]).teacher["checkpoint_sha256"] == ref.checkpoint_sha256
    by = {x["label"]: x for x in summary["storage"]}
    assert by[f"CI {WHISPER.num_codebooks}xuint8"]["dim"] == 384
    for run in ("none", "mvq"):
        r = summary["results"][run]
        assert r["test"]["words"] > 0 and not r.get("stopped_early")
        assert r["speed"]["steps_per_second"] > 0 and "teacher_seconds" not in r["speed"]


def test_online_run_reports_its_speed(whisper_pipeline):
    work, summary, _ = whisper_pipeline
    r = summary["results"]["online-mvq"]
    assert r["stopped_early"] and r["steps"] == 1 and "test" not in r
    log = [json.loads(line) for line in open(os.path.join(work, "students", "online-mvq", "log.jsonl"))]
    assert r["speed"]["steps"] == log[-1]["step"] == 1
    assert r["speed"]["steps_per_second"] == pytest.approx(1 / log[-1]["time"])
    assert 0 < r["speed"]["teacher_seconds"] == log[-1]["teacher_seconds"] < log[-1]["time"]
    # projected from the no-KD run's schedule (same seed, no store: the same batches)
    full = summary["results"]["none"]["steps"]
    assert r["full_schedule_steps"] == full > 1 and r["full_schedule_from"] == "none"
    assert r["projected_full_seconds"] == pytest.approx(full / r["speed"]["steps_per_second"])
    twin = summary["results"]["timed-mvq"]
    assert twin["stopped_early"] and twin["steps"] == 1 and twin["full_schedule_from"] == "none"
    assert twin["projected_full_seconds"] == pytest.approx(full / twin["speed"]["steps_per_second"])
    table = speed_table(summary)
    row = next(line for line in table.splitlines() if line.startswith("| online-mvq |"))
    ratio = r["speed"]["steps_per_second"] / twin["speed"]["steps_per_second"]
    assert f"{ratio:.2f}x (vs timed-mvq)" in row and "projected" in row
    assert "timing twin of online-mvq" in next(line for line in table.splitlines() if line.startswith("| timed-mvq |"))
    # the teacher's time per epoch on the fly, from the timed step, against extracting once
    per_epoch = r["speed"]["teacher_seconds"] / r["speed"]["steps"] * full / WHISPER.student_epochs
    row = next(line for line in extraction_table(summary).splitlines() if line.startswith("| online-mvq"))
    assert f"| {per_epoch:.0f} per epoch" in row
    assert f"| {summary['timings']['extract']:.0f} |" in extraction_table(summary)
    row = next(line for line in result_table(summary).splitlines() if line.startswith("| online-mvq |"))
    assert "teacher on the fly" in row and "stopped after 1 steps" in row


def test_pretrained_teacher_pipeline_resumes(whisper_pipeline):
    work, summary, _ = whisper_pipeline
    lines: list[str] = []
    again = run_pipeline(work, WHISPER, log=lines.append)
    assert [line for line in lines if line.startswith(("$ ci-store train-student", "$ ci-store make-corpus",
                                                       "$ ci-store sample-frames", "$ ci-store train-quantizer"))] == []
    assert again["timings"] == summary["timings"]
    assert again["results"] == summary["results"]


def test_teacher_layer_out_of_range_is_refused_before_any_step(tmp_path):
    with pytest.raises(ValueError, match="teacher_layer 9.*0..4"):
        run_pipeline(str(tmp_path / "w"), Sizes(**{**WHISPER.__dict__, "teacher_layer": 9}), log=lambda _: None)
    assert not os.path.exists(tmp_path / "w")
    with pytest.raises(ValueError, match="multi_seed_runs"):
        run_pipeline(str(tmp_path / "w"), Sizes(multi_seed_runs=("l1",)), log=lambda _: None)


def _entry(wer, cer=0.5, secs=10.0, **kw):
    return {"train_seconds": secs, "dev": {"wer": wer, "cer": cer}, "test": {"wer": wer, "cer": cer}, **kw}


def test_result_table_aggregates_seeds():
    seeds = {"0": _entry(0.30), "1": _entry(0.40), "2": _entry(0.50)}
    summary = {"results": {"none": {**seeds["0"], "seeds": seeds}, "mvq": _entry(0.20),
                           "online-l2": {"train_seconds": 3.0, "steps": 5, "stopped_early": True}}}
    table = result_table(summary).splitlines()
    none = next(line for line in table if line.startswith("| none (3 seeds) |"))
    assert "| 40.00 ± 10.00 |" in none  # mean and sample std of 30, 40, 50 %
    assert "| 10 ± 0 |" in none
    mvq = next(line for line in table if line.startswith("| mvq |"))
    assert "| 20.00 |" in mvq and "| +50.0% |" in mvq  # relative to the seeds' mean, 40 %
    online = next(line for line in table if line.startswith("| online-l2 |"))
    assert "teacher on the fly" in online and "n/a" in online and "stopped after 5 steps" in online


def test_multi_seed_runs_keep_the_single_seed_directory_for_the_base_seed():
    sizes = Sizes(kd_runs=("none", "l2", "online-mvq"), seeds=(0, 1, 2), multi_seed_runs=("none", "l2"))
    assert student_runs(sizes) == [("none", 0, "none"), ("none", 1, "none-seed1"), ("none", 2, "none-seed2"),
                                   ("l2", 0, "l2"), ("l2", 1, "l2-seed1"), ("l2", 2, "l2-seed2"),
                                   ("online-mvq", 0, "online-mvq")]
    assert student_runs(TINY) == [(kd, 0, kd) for kd in TINY.kd_runs]  # one seed: the layout as before
    timed = Sizes(kd_runs=("mvq", "online-mvq"), online_max_steps=5)  # an on-the-fly run stopped early gets a twin
    assert student_runs(timed) == [("mvq", 0, "mvq"), ("timed-mvq", 0, "timed-mvq"), ("online-mvq", 0, "online-mvq")]
    with pytest.raises(ValueError, match="parallel_runs 0"):
        run_pipeline("unused", Sizes(parallel_runs=0), log=lambda _: None)


def test_difference_table_gives_the_standard_error_of_each_difference():
    seeds = {"0": _entry(0.30), "1": _entry(0.40), "2": _entry(0.50)}  # mean 40 %, sd 10 points
    l2 = {"0": _entry(0.20), "1": _entry(0.25), "2": _entry(0.30)}  # mean 25 %, sd 5 points
    summary = {"results": {"none": {**seeds["0"], "seeds": seeds}, "l2": {**l2["0"], "seeds": l2},
                           "mvq": {**l2["0"], "seeds": l2}, "l1": _entry(0.10),
                           "online-l2": {"train_seconds": 3.0, "steps": 5, "stopped_early": True}}}
    rows = {line.split(" | ")[0][2:]: line for line in difference_table(summary).splitlines()[2:]}
    assert set(rows) == {"l2 - none", "mvq - none", "l1 - none", "mvq - l1", "mvq - l2"}
    se = (10 ** 2 / 3 + 5 ** 2 / 3) ** 0.5
    assert f"| -15.00 ± {se:.2f} ({15 / se:.1f} SE) |" in rows["l2 - none"] and "3 vs 3" in rows["l2 - none"]
    assert "| +0.00 ± " in rows["mvq - l2"]
    # a single-seed run borrows the largest multi-seed spread (10 points), and says so
    se1 = (10 ** 2 / 1 + 10 ** 2 / 3) ** 0.5
    assert f"| -30.00 ± {se1:.2f}" in rows["l1 - none"] and "borrowed" in rows["l1 - none"]


def test_extrapolation_table_scales_label_bytes_per_frame():
    summary = {"teacher": {"frame_rate": 50}, "storage": [
        {"label": "CI 4xuint8", "frames": 1000, "bytes": 4500 + 2000, "label_bytes_per_frame": 4.5, "dim": 384},
        {"label": "float16", "frames": 1000, "bytes": 770_000, "label_bytes_per_frame": 770.0, "dim": 384}]}
    rows = extrapolation_table(summary).splitlines()
    assert "173 M frames" in rows[0] and "1,800 M frames" in rows[0]
    ci = next(r for r in rows if r.startswith("| CI 4xuint8 |"))
    assert f"| {(4.5 * 960 * 3600 * 50 + 2000) / 1e9:.2f} GB |" in ci  # the quantizer (2,000 B) added once
    raw = next(r for r in rows if r.startswith("| float32, raw"))
    assert f"| {4 * 384 * 10_000 * 3600 * 50 / 1e12:.2f} TB |" in raw
