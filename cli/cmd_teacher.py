"""`ci-store train-teacher`: train the native CTC teacher on the large split (issue 6: a bigger teacher that has
seen more data than the student)."""
from __future__ import annotations

import click

from cli.main import main
from cli.options import device_option, usable_device


# config field -> the option that sets it, so a refused value is named as the user typed it
_OPTIONS = {"d_model": "--d-model", "num_heads": "--heads", "num_layers": "--layers", "ffn_dim": "--ffn-dim",
            "epochs": "--epochs", "max_steps": "--max-steps", "max_seconds_per_batch": "--max-seconds-per-batch",
            "lr": "--lr", "grad_clip": "--grad-clip", "num_threads": "--threads", "num_workers": "--num-workers",
            "accum_grad": "--accum-grad", "dtype": "--dtype", "device": "--device"}


def _option_names(message: str) -> str:
    import re

    return re.sub(r"\b(" + "|".join(_OPTIONS) + r")\b", lambda m: _OPTIONS[m.group(1)], message)


@main.command("train-teacher")
@click.option("--train", "train_path", required=True, help="Training manifest (lhotse cuts / plain JSONL, with text).")
@click.option("--dev", "dev_path", default=None, help="Dev manifest, scored per epoch (greedy CTC CER/WER).")
@click.option("--out", required=True, help="Output checkpoint (.safetensors); the tokenizer, summary and log go beside it.")
@click.option("--d-model", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=6, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--ffn-dim", type=int, default=None, help="Feed-forward width [default: 4 x d-model].")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many updates.")
@click.option("--max-seconds-per-batch", type=float, default=40.0, show_default=True,
              help="Padded audio seconds per batch (duration-bucketed batches).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (Adam, warmup + cosine).")
@click.option("--warmup-steps", type=int, default=None, help="[default: 10% of all steps, at most 1000]")
@click.option("--grad-clip", type=float, default=5.0, show_default=True)
@click.option("--no-spec-augment", is_flag=True, help="Disable time/frequency masking.")
@click.option("--max-utterance-seconds", type=float, default=30.0, show_default=True,
              help="Skip longer training utterances.")
@click.option("--dev-max-utterances", type=int, default=None, help="Score only the first N dev utterances.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--num-workers", type=int, default=2, show_default=True,
              help="Audio reading threads (cache) or loader processes (--no-cache).")
@click.option("--no-cache", is_flag=True, help="Read audio from disk every epoch instead of keeping it in memory.")
@click.option("--log", "log_path", default="auto", show_default=True,
              help="JSONL log of losses ('auto': <out>.log.jsonl; 'none': no log).")
@click.option("--device", default="cpu", show_default=True, callback=device_option(), help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Autocast dtype of the forward (weights stay float32; float16 is loss-scaled).")
@click.option("--accum-grad", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer update; --max-steps, warmup and the schedule count updates.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_teacher_cmd(train_path, dev_path, out, d_model, layers, heads, ffn_dim, dropout, epochs, max_steps,
                      max_seconds_per_batch, lr, warmup_steps, grad_clip, no_spec_augment, max_utterance_seconds,
                      dev_max_utterances, seed, threads, num_workers, no_cache, device, dtype, accum_grad, log_path,
                      quiet):
    """Train a log-mel transformer with a character CTC head on TRAIN and save it for `extract --teacher`."""
    from distill.teachers.training import TeacherTrainConfig, train_teacher

    usable_device(device, dtype=dtype)
    try:  # option values that contradict each other: a usage error (exit 2) before any data is read
        cfg = TeacherTrainConfig(d_model=d_model, num_layers=layers, num_heads=heads, ffn_dim=ffn_dim,
                                 dropout=dropout, epochs=epochs, max_steps=max_steps,
                                 max_seconds_per_batch=max_seconds_per_batch, lr=lr, warmup_steps=warmup_steps,
                                 grad_clip=grad_clip, spec_augment=not no_spec_augment,
                                 max_utterance_seconds=max_utterance_seconds or None,
                                 dev_max_utterances=dev_max_utterances, seed=seed, num_threads=threads,
                                 num_workers=num_workers, cache_audio=not no_cache, device=device, dtype=dtype,
                                 accum_grad=accum_grad)
        cfg.model_config(2)  # validates d_model / heads / layers
    except ValueError as e:
        raise click.UsageError(_option_names(str(e).removeprefix("TeacherTrainConfig: "))) from None
    res = train_teacher(train_path, out, cfg, dev=dev_path, log_path=None if log_path == "none" else log_path,
                        progress=not quiet, echo=click.echo)
    last = res.history[-1] if res.history else {}
    click.echo(f"wrote {res.checkpoint} (sha256 {res.checkpoint_sha256[:12]}), {res.tokenizer_path}, "
               f"{res.summary_path}" + (f", {res.log_path}" if res.log_path else ""))
    if "dev_cer" in last:
        click.echo(f"final dev CER {100 * last['dev_cer']:.2f}% WER {100 * last['dev_wer']:.2f}%")
    click.echo(f"{res.steps} steps in {res.wall_seconds:.0f} s; distil from layer {res.suggested_layer} "
               f"of {cfg.num_layers} (--layer {res.suggested_layer})")
