"""`ci-store train-student` and `ci-store evaluate`: the consumer side of a label store."""
from __future__ import annotations

import json

import click

from cli.main import main
from cli.options import device_option, json_object, usable_device

DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])
DEVICE_HELP = "cpu, cuda or cuda:N (under torchrun / --world-size: cuda, each rank on cuda:LOCAL_RANK)."
DTYPE_HELP = ("Autocast dtype of the forward pass (weights and optimizer stay float32); float16 adds loss "
              "scaling. bfloat16 runs on CPU and recent GPUs.")


@main.command("train-student")
@click.option("--train", "train_manifest", required=True, help="Training cuts/JSONL manifest (with texts).")
@click.option("--labels", default=None, help="Label store URL: a CI store (--kd mvq) or float-label store (l1/l2).")
@click.option("--online-teacher", default=None,
              help="On-the-fly KD instead of --labels: this teacher (checkpoint path/URL or alias such as "
                   "whisper-tiny.en) labels every batch on --device while training (the baseline a label store is "
                   "measured against). Needs --layer; --kd mvq also --quantizer.")
@click.option("--layer", type=int, default=None, help="--online-teacher: the teacher layer the labels come from.")
@click.option("--quantizer", default=None, help="--online-teacher with --kd mvq: quantizer file (train-quantizer).")
@click.option("--teacher-kind", type=click.Choice(["native", "hf", "whisper-ct2", "whisper-openai", "whisper-hf"]),
              default=None, help="--online-teacher: its format, when detection from the files is ambiguous.")
@click.option("--teacher-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="--online-teacher: dtype of the teacher's weights (frames come back float32).")
@click.option("--kd", type=click.Choice(["mvq", "l1", "l2", "none"]), default="mvq", show_default=True)
@click.option("--kd-scale", default=None, type=float,
              help="Weight of the KD loss (default: 0.1 for mvq, as icefall; 1.0 for l1/l2).")
@click.option("--dev", "dev_manifest", default=None, help="Dev manifest: WER after every epoch.")
@click.option("--out", "out_dir", required=True, help="Run directory (re-run the same command to resume).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--max-seconds", default=60.0, show_default=True, help="Audio seconds per batch.")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--warmup-steps", default=200, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--num-workers", default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--threads", default=2, show_default=True, help="torch threads for training.")
@click.option("--feature-cache-mb", default=0, show_default=True, type=click.IntRange(min=0),
              help="Keep recently used fbank features in memory, up to this many MiB per loader process (each "
                   "DataLoader worker holds its own); 0: recompute every epoch.")
@click.option("--student", "student_json", default=None,
              help='Student architecture overrides as JSON, e.g. \'{"d_model": 144, "num_layers": 6}\'.')
@click.option("--rnnt-loss", type=click.Choice(["full", "pruned"]), default=None,
              help="Transducer loss (student field rnnt_loss): full lattice, or pruned RNN-T (a simple joiner picks "
                   "--prune-range symbols per frame). Default: pruned for a new run, unless --student names one "
                   "(2.4x faster steps at the experiment's size, same dev NLL: docs/benchmarks.md).")
@click.option("--prune-range", type=click.IntRange(min=2), default=None,
              help="Symbols per frame kept by --rnnt-loss pruned (student field prune_range; default 5).")
@click.option("--tokenizer", default=None, help="Tokenizer JSON (default: characters of the training texts).")
@click.option("--bpe", default=None, type=int, help="Train a sentencepiece BPE tokenizer of this size instead.")
@click.option("--storage-options", default=None, help="JSON dict for fsspec (label store / audio URLs).")
@click.option("--device", default="cpu", show_default=True, callback=device_option(), help=DEVICE_HELP)
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True, help=DTYPE_HELP)
@click.option("--accum-grad", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer update (per process); the learning-rate schedule counts updates.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Spawn this many local data-parallel processes (gloo on CPU, nccl with one GPU each on CUDA). "
                   "Leave out under torchrun, which sets it.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop (with a checkpoint) once the run reaches this many updates, e.g. to time a few hundred "
                   "steps of a long schedule; re-running the command then does nothing, re-running without it "
                   "continues the schedule. Recorded in config.json's runtime sessions.")
@click.option("--no-progress", is_flag=True)
def train_student_cmd(train_manifest, labels, online_teacher, layer, quantizer, teacher_kind, teacher_dtype, kd,
                      kd_scale, dev_manifest, out_dir, epochs, max_seconds, lr,
                      warmup_steps, seed, num_workers, threads, feature_cache_mb, student_json, rnnt_loss,
                      prune_range, tokenizer, bpe, storage_options, device, dtype, accum_grad, world_size,
                      max_steps, no_progress):
    """Train a transducer student with MVQ-KD (CI labels), l1/l2 KD (float labels) or no KD."""
    from distill.data.manifest import load_manifest
    from distill.data.tokenizer import BPETokenizer, load_tokenizer
    from distill.student.distributed import current_rank
    from distill.student.trainer import TrainConfig, train_student

    spec = _online_teacher_spec(kd, labels, online_teacher, layer, quantizer, teacher_kind, teacher_dtype)
    usable_device(device, dtype=dtype)
    if kd_scale is None:
        kd_scale = 0.1 if kd == "mvq" else 1.0
    cfg = TrainConfig(kd=kd, kd_scale=kd_scale, epochs=epochs, max_seconds=max_seconds, lr=lr,
                      warmup_steps=warmup_steps, seed=seed, num_workers=num_workers, threads=threads,
                      feature_cache_mb=feature_cache_mb, dtype=dtype, accum_grad=accum_grad)
    student = _with_loss_options(json_object(student_json, "--student"), rnnt_loss, prune_range)
    so = json_object(storage_options, "--storage-options") or None
    tok = None
    if tokenizer:
        try:
            tok = load_tokenizer(tokenizer)
        except ValueError as e:  # names the file: unreadable, not a tokenizer description
            raise click.BadParameter(str(e), param_hint="--tokenizer") from None
    elif bpe:
        import os

        texts = [u.text or "" for u in load_manifest(train_manifest)]
        os.makedirs(out_dir, exist_ok=True)
        try:
            # under torchrun every rank trains the same pieces; only rank 0 writes the model file
            prefix = os.path.join(out_dir, "bpe") if current_rank().is_main else None
            tok = BPETokenizer.train(texts, bpe, prefix)
        except ValueError as e:  # e.g. a vocabulary larger than the texts allow
            raise click.BadParameter(str(e), param_hint="--bpe") from None
    summary = train_student(train_manifest, out_dir, labels=labels, dev_manifest=dev_manifest, cfg=cfg,
                            student=student, tokenizer=tok, storage_options=so, progress=not no_progress,
                            device=device, world_size=world_size, online_teacher=spec, stop_after_steps=max_steps,
                            log=click.echo)
    if current_rank().is_main:  # under torchrun every rank returns; rank 0 speaks for the job
        click.echo(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))


def _online_teacher_spec(kd, labels, online_teacher, layer, quantizer, teacher_kind, teacher_dtype):
    """--online-teacher and its options as an OnlineTeacherSpec (None without it); contradictions refused, each
    naming its option."""
    from distill.student.online_teacher import OnlineTeacherSpec
    from distill.student.trainer import label_source_problem

    if online_teacher is None:
        given = [opt for opt, v in (("--layer", layer), ("--quantizer", quantizer), ("--teacher-kind", teacher_kind),
                                    ("--teacher-dtype", teacher_dtype != "float32" or None)) if v is not None]
        if given:
            raise click.BadParameter("only applies to on-the-fly KD: add --online-teacher (or leave it out)",
                                     param_hint=given[0])
        spec = None
    else:
        if layer is None:
            raise click.BadParameter("--online-teacher needs --layer (the teacher layer the labels come from)",
                                     param_hint="--layer")
        spec = OnlineTeacherSpec(teacher=online_teacher, layer=layer, quantizer=quantizer, kind=teacher_kind,
                                 dtype=teacher_dtype)
    # without --online-teacher, train_student itself refuses a --kd that has no --labels
    problem = label_source_problem(kd, labels, spec) if spec is not None else None
    if problem is not None:
        raise click.BadParameter(problem[1], param_hint=problem[0])
    return spec


def _with_loss_options(student: dict, rnnt_loss: str | None, prune_range: int | None) -> dict:
    """--rnnt-loss / --prune-range written into the student dict (so into config.json); contradictions refused.

    New runs default to the pruned loss; StudentConfig itself defaults to "full" so that the config.json of runs
    made before the option existed (no rnnt_loss field) still rebuilds the model they trained."""
    for opt, key, value in (("--rnnt-loss", "rnnt_loss", rnnt_loss), ("--prune-range", "prune_range", prune_range)):
        if value is not None and key in student and student[key] != value:
            raise click.BadParameter(f"{opt} {value} contradicts --student {key}={student[key]!r}", param_hint=opt)
    student = {**student, "rnnt_loss": rnnt_loss or student.get("rnnt_loss", "pruned")}
    if prune_range is not None:
        if student.get("rnnt_loss", "full") != "pruned":
            raise click.BadParameter("only applies to the pruned loss: add --rnnt-loss pruned",
                                     param_hint="--prune-range")
        student = {**student, "prune_range": prune_range}
    return student


@main.command("evaluate")
@click.argument("run_dir")
@click.argument("manifest")
@click.option("--max-seconds", default=120.0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=device_option(),
              help="cpu, cuda or cuda:N (whatever device the run was trained on).")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True, help=DTYPE_HELP)
@click.option("--storage-options", default=None, help="JSON dict for fsspec (audio URLs in the manifest, e.g. S3).")
@click.option("--decoding", type=click.Choice(["greedy", "modified_beam_search"]), default="greedy",
              show_default=True, help="greedy: argmax per frame; modified_beam_search: --beam hypotheses, at most "
                                      "one symbol per frame (icefall's).")
@click.option("--beam", type=click.IntRange(min=1), default=4, show_default=True,
              help="Hypotheses kept per utterance by --decoding modified_beam_search.")
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(run_dir, manifest, max_seconds, device, dtype, storage_options, decoding, beam, as_json):
    """Decode MANIFEST with the student in RUN_DIR and print its WER."""
    from distill.student.trainer import evaluate

    usable_device(device, dtype=dtype)
    so = json_object(storage_options, "--storage-options") or None
    res = evaluate(run_dir, manifest, max_seconds=max_seconds, device=device, dtype=dtype, storage_options=so,
                   decoding=decoding, beam=beam)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"WER {100 * res['wer']:.2f}% ({res['errors']} errors / {res['words']} words; "
                   f"sub {res['substitutions']}, del {res['deletions']}, ins {res['insertions']}); "
                   f"CER {100 * res['cer']:.2f}% ({res['char_errors']} / {res['chars']} characters)")
