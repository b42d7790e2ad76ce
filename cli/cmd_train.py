"""`ci-store train-student` and `ci-store evaluate`: the consumer side of a label store."""
from __future__ import annotations

import json

import click

from cli.main import main
from cli.options import json_object


@main.command("train-student")
@click.option("--train", "train_manifest", required=True, help="Training cuts/JSONL manifest (with texts).")
@click.option("--labels", default=None, help="Label store URL: a CI store (--kd mvq) or float-label store (l1/l2).")
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
@click.option("--no-progress", is_flag=True)
def train_student_cmd(train_manifest, labels, kd, kd_scale, dev_manifest, out_dir, epochs, max_seconds, lr,
                      warmup_steps, seed, num_workers, threads, student_json, rnnt_loss, prune_range, tokenizer, bpe,
                      storage_options, no_progress):
    """Train a transducer student with MVQ-KD (CI labels), l1/l2 KD (float labels) or no KD."""
    from distill.data.manifest import load_manifest
    from distill.data.tokenizer import BPETokenizer, load_tokenizer
    from distill.student.trainer import TrainConfig, train_student

    if kd_scale is None:
        kd_scale = 0.1 if kd == "mvq" else 1.0
    cfg = TrainConfig(kd=kd, kd_scale=kd_scale, epochs=epochs, max_seconds=max_seconds, lr=lr,
                      warmup_steps=warmup_steps, seed=seed, num_workers=num_workers, threads=threads)
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
            tok = BPETokenizer.train(texts, bpe, os.path.join(out_dir, "bpe"))
        except ValueError as e:  # e.g. a vocabulary larger than the texts allow
            raise click.BadParameter(str(e), param_hint="--bpe") from None
    summary = train_student(train_manifest, out_dir, labels=labels, dev_manifest=dev_manifest, cfg=cfg,
                            student=student, tokenizer=tok, storage_options=so, progress=not no_progress,
                            log=click.echo)
    click.echo(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))


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
@click.option("--decoding", type=click.Choice(["greedy", "modified_beam_search"]), default="greedy",
              show_default=True, help="greedy: argmax per frame; modified_beam_search: --beam hypotheses, at most "
                                      "one symbol per frame (icefall's).")
@click.option("--beam", type=click.IntRange(min=1), default=4, show_default=True,
              help="Hypotheses kept per utterance by --decoding modified_beam_search.")
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(run_dir, manifest, max_seconds, decoding, beam, as_json):
    """Decode MANIFEST with the student in RUN_DIR and print its WER."""
    from distill.data.manifest import load_manifest
    from distill.student.trainer import evaluate_model, load_student

    model, tokenizer = load_student(run_dir)
    res = evaluate_model(model, tokenizer, load_manifest(manifest), max_seconds=max_seconds, decoding=decoding,
                         beam=beam)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"WER {100 * res['wer']:.2f}% ({res['errors']} errors / {res['words']} words; "
                   f"sub {res['substitutions']}, del {res['deletions']}, ins {res['insertions']}); "
                   f"CER {100 * res['cer']:.2f}% ({res['char_errors']} / {res['chars']} characters)")
