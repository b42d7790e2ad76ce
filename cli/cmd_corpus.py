"""`ci-store make-corpus`: synthesise the offline multi-speaker English corpus (espeak-ng) with lhotse manifests."""
from __future__ import annotations

import click

from cli.main import main


@main.command("make-corpus")
@click.argument("out_dir")
@click.option("--hours", type=click.FloatRange(0.0, min_open=True), default=10.0, show_default=True,
              help="Hours of train audio.")
@click.option("--dev-hours", type=float, default=None, help="Hours of dev audio [default: 10% of --hours].")
@click.option("--test-hours", type=float, default=None, help="Hours of test audio [default: 10% of --hours].")
@click.option("--student-hours", type=float, default=None,
              help="Also write cuts_train_small.jsonl.gz: a seeded subset of train this long (the student's labelled set).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Parallel synthesis threads (espeak-ng processes).")
@click.option("--sample-rate", type=int, default=16000, show_default=True)
@click.option("--snr-db", type=(float, float), default=(10.0, 30.0), show_default=True,
              help="Additive noise SNR range, drawn per utterance.")
@click.option("--format", "audio_format", type=click.Choice(["flac", "wav"]), default="flac", show_default=True)
@click.option("--no-trim", is_flag=True, help="Keep espeak-ng's leading/trailing silence as is.")
@click.option("--relative-paths", is_flag=True, help="Audio paths in the manifests relative to OUT_DIR (default: absolute).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in OUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def make_corpus_cmd(out_dir, hours, dev_hours, test_hours, student_hours, seed, workers, sample_rate, snr_db,
                    audio_format, no_trim, relative_paths, overwrite, quiet):
    """Synthesise train/dev/test speech (disjoint sentences) into OUT_DIR with cuts_<split>.jsonl.gz manifests."""
    import json
    import os

    from distill.synth.corpus import make_corpus

    paths = make_corpus(out_dir, hours=hours, dev_hours=dev_hours, test_hours=test_hours,
                        student_hours=student_hours, seed=seed, workers=workers, sample_rate=sample_rate,
                        snr_db=snr_db, progress=not quiet, trim=not no_trim, audio_format=audio_format,
                        relative_paths=relative_paths, overwrite=overwrite)
    with open(os.path.join(out_dir, "corpus.json")) as f:
        splits = json.load(f)["splits"]
    for split, path in paths.items():
        s = splits[split]
        click.echo(f"{split}: {s['utterances']} utterances, {s['hours']:.4f} h, {s['distinct_sentences']} sentences, "
                   f"{s['speakers']} speakers -> {path}")
