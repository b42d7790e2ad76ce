"""`ci-store sample-frames`, `train-quantizer` and `extract`: populate a CI store from an audio corpus."""
from __future__ import annotations

import sys

import click

from cli.main import main
from cli.options import device_option, json_object, usable_device


def _power_of_two(ctx, param, value):
    if value & (value - 1):
        raise click.BadParameter(f"{value} is not a power of two (e.g. 256)")
    return value


# one worker per visible GPU for plain `cuda`: the hint --device errors give on these commands
_device = device_option("one worker per visible GPU")


def _usable_here(device: str) -> None:
    usable_device(device, "one worker per visible GPU")


def _min_max(ctx, param, value):
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"{value!r} is not MIN:MAX (e.g. 0:20)")
    lo, hi = int(parts[0]), int(parts[1])
    if lo > hi or hi < 1:
        raise click.BadParameter(f"{value!r}: need MIN <= MAX and MAX >= 1")
    return lo, hi


DEVICE_HELP = "cpu, cuda or cuda:N: where the teacher (and the quantizer) run."
TEACHER_DTYPE_HELP = ("Dtype the teacher's weights are cast to (frames reach the codec as float32); float16 is slow on "
                      "CPU, bfloat16 runs on CPU and GPU.")


@main.command("sample-frames")
@click.argument("manifest")
@click.option("--teacher", required=True, help="Teacher checkpoint (path or fsspec URL): HF HuBERT/wav2vec2 folder, ci-store .safetensors, Whisper CTranslate2/faster-whisper folder, openai .pt or HF folder, or the alias whisper-tiny.en.")
@click.option("--layer", type=int, required=True, help="Hidden layer whose output is distilled.")
@click.option("--teacher-kind", type=click.Choice(["native", "hf", "whisper-ct2", "whisper-openai", "whisper-hf"]),
              default=None, help="Teacher format, when detection from the files is ambiguous.")
@click.option("--short-input", type=click.Choice(["real-frames", "pad30"]), default=None,
              help="Whisper teachers: run inputs under 30 s on their own frames (default) or padded to 30 s.")
@click.option("--out", "out_path", required=True, help="Where to write the sampled frames (.npy).")
@click.option("--num-utterances", default=1000, show_default=True, help="Utterances drawn at random across the corpus.")
@click.option("--max-frames", default=200_000, show_default=True, help="Cap on frames kept (random subset).")
@click.option("--seed", default=0, show_default=True)
@click.option("--storage-options", default=None, help="JSON dict passed to fsspec for manifest/audio/teacher URLs.")
@click.option("--device", default="cpu", show_default=True, callback=_device, help=DEVICE_HELP)
@click.option("--teacher-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help=TEACHER_DTYPE_HELP + " Sample with the dtype you will extract with.")
def sample_frames_cmd(manifest, teacher, layer, teacher_kind, short_input, out_path, num_utterances, max_frames, seed,
                      storage_options, device, teacher_dtype):
    """Embed a seeded random sample of MANIFEST's utterances: the quantizer's training data."""
    import numpy as np

    from distill.extract import sample_frames

    _usable_here(device)
    frames = sample_frames(manifest, teacher, layer, num_utterances=num_utterances, max_frames=max_frames,
                           seed=seed, storage_options=json_object(storage_options, "--storage-options") or None,
                           teacher_kind=teacher_kind, short_input=short_input, device=device,
                           teacher_dtype=teacher_dtype)
    np.save(out_path, frames)
    click.echo(f"wrote {frames.shape[0]} frames x {frames.shape[1]} dims to {out_path}")


@main.command("train-quantizer")
@click.argument("frames")
@click.option("--num-codebooks", type=click.IntRange(min=1), default=16, show_default=True,
              help="Bytes per frame at codebook size 256.")
@click.option("--codebook-size", type=click.IntRange(2, 65536), default=256, show_default=True,
              callback=_power_of_two, help="A power of two (256: one byte per codebook).")
@click.option("--out", "out_path", required=True, help="Quantizer file to write (.safetensors).")
@click.option("--seed", default=0, show_default=True)
@click.option("--held-out", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.05, show_default=True,
              help="Fraction of frames kept out to report the error.")
@click.option("--device", default="cpu", show_default=True, callback=_device, help="cpu, cuda or cuda:N.")
def train_quantizer_cmd(frames, num_codebooks, codebook_size, out_path, seed, held_out, device):
    """Train the MVQ codec on FRAMES (.npy from sample-frames) and save it."""
    import numpy as np

    from distill.codec.malloc_tuning import raise_glibc_thresholds
    from distill.codec.quantizer import (MultiCodebookQuantizer, codebook_usage_entropy, load_frames,
                                         relative_reconstruction_error)

    _usable_here(device)
    raise_glibc_thresholds()  # the search's large temporaries: measured 2.2x faster training at 1024-dim, same result
    x = load_frames(frames)  # QuantizerError naming the file for anything but a numeric [frames, dim] .npy
    rng = np.random.default_rng(seed)
    perm = rng.permutation(x.shape[0])
    n_test = int(round(x.shape[0] * held_out)) if held_out > 0 else 0
    test, train = np.asarray(x[np.sort(perm[:n_test])]), np.asarray(x[np.sort(perm[n_test:])])
    q = MultiCodebookQuantizer.train(train, num_codebooks=num_codebooks, codebook_size=codebook_size,
                                     seed=seed, device=device)
    q.save(out_path)
    click.echo(f"quantizer {q.quantizer_id}: dim {q.dim}, {q.num_codebooks} codebooks x {q.codebook_size} -> {out_path}")
    if n_test:
        codes = q.encode(test)
        err = relative_reconstruction_error(test, q.decode(codes))
        ent = codebook_usage_entropy(codes, q.codebook_size)
        click.echo(f"held-out relative reconstruction error: {err:.4f} on {n_test} frames")
        click.echo(f"codebook usage entropy (bits, max {np.log2(q.codebook_size):.0f}): "
                   f"min {ent.min():.2f} mean {ent.mean():.2f}")


@main.command("extract")
@click.argument("manifest")
@click.option("--teacher", required=True, help="Teacher checkpoint (path or fsspec URL), as for sample-frames.")
@click.option("--layer", type=int, required=True)
@click.option("--teacher-kind", type=click.Choice(["native", "hf", "whisper-ct2", "whisper-openai", "whisper-hf"]),
              default=None, help="Teacher format, when detection from the files is ambiguous.")
@click.option("--short-input", type=click.Choice(["real-frames", "pad30"]), default=None,
              help="Whisper teachers: run inputs under 30 s on their own frames (default) or padded to 30 s.")
@click.option("--quantizer", required=True, help="Quantizer file from train-quantizer.")
@click.option("--out", required=True, help="CI store URL (path, file://, s3://, gs://, memory://).")
@click.option("--float-labels", multiple=True,
              help="Also write the float embeddings to this store URL (l1/l2 baselines); repeatable.")
@click.option("--dtype", "float_dtype", type=click.Choice(["float16", "float32"]), multiple=True,
              help="dtype of each --float-labels store, in order (default float16).")
@click.option("--device", default="cpu", show_default=True, callback=_device,
              help="cpu, cuda (embedded cluster: one worker per visible GPU, each pinned to its GPU; --scheduler / "
                   "--cluster: each worker uses the GPU its environment gives it) or cuda:N (one worker on GPU N).")
@click.option("--teacher-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help=TEACHER_DTYPE_HELP + " Recorded in the store; a resume must use the same.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Embedded cluster worker processes (default: 2 on CPU, one per visible GPU with --device cuda).")
@click.option("--threads-per-worker", default=1, show_default=True, help="torch threads in each worker.")
@click.option("--scheduler", default=None, help="tcp://host:port of a running Dask scheduler (instead of LocalCluster).")
@click.option("--cluster", type=click.Choice(["slurm", "pbs", "sge", "lsf"]), default=None,
              help="Start the workers as batch jobs through dask-jobqueue (its jobqueue.yaml, then --cluster-options); "
                   "size with --jobs or --adaptive.")
@click.option("--cluster-options", default=None,
              help='JSON dict for the dask-jobqueue cluster class, e.g. \'{"cores": 8, "memory": "32GB", "queue": '
                   '"gpu", "walltime": "04:00:00", "job_extra_directives": ["--gres=gpu:1"]}\'.')
@click.option("--jobs", default=None, type=click.IntRange(min=1), help="--cluster: submit this many jobs.")
@click.option("--adaptive", default=None, callback=_min_max,
              help="--cluster: scale between MIN and MAX jobs with the work left (e.g. 0:20).")
@click.option("--shard-frames", default=None, type=int, help="Frames per CI shard (default 1,048,576).")
@click.option("--batch-frames", default=20000, show_default=True, help="Frames per quantizer encode call.")
@click.option("--storage-options", default=None, help="JSON dict for fsspec (endpoint, credentials, caching).")
@click.option("--manifest-storage-options", default=None,
              help="JSON dict for fsspec to read the manifest and probe audio headers in this process (default: "
                   "--storage-options).")
@click.option("--retries", default=2, show_default=True, help="Dask retries per shard task.")
@click.option("--retry-failed", is_flag=True,
              help="Also recompute the failed utterances of complete shards (e.g. audio missing or unreachable in "
                   "an earlier run) and rewrite those shards; utterances that have labels keep their bytes.")
@click.option("--dask-profile", is_flag=True,
              help="Keep Dask's statistical profiler and fast monitoring ticks in the embedded cluster (the "
                   "dashboard's Profile page); off by default for throughput.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON object on stdout (messages go to stderr).")
def extract_cmd(manifest, teacher, layer, teacher_kind, short_input, quantizer, out, float_labels, float_dtype, device,
                teacher_dtype, workers, threads_per_worker, scheduler, cluster, cluster_options, jobs, adaptive,
                shard_frames, batch_frames, storage_options, manifest_storage_options, retries, retry_failed,
                dask_profile,
                no_progress, as_json):
    """Run teacher + quantizer over MANIFEST and write the CI store (resumable: completed shards are skipped)."""
    import json

    from distill.extract import DEFAULT_SHARD_FRAMES, ExtractionConfig, run_extraction

    if float_dtype and len(float_dtype) not in (1, len(float_labels)):
        raise click.BadParameter(f"give one --dtype, or one per --float-labels ({len(float_labels)})")
    if scheduler and cluster:
        raise click.UsageError("give --scheduler (a running scheduler) or --cluster (start one), not both")
    if cluster and (jobs is None) == (adaptive is None):
        raise click.UsageError(f"--cluster {cluster}: give either --jobs N or --adaptive MIN:MAX")
    if not cluster and (jobs is not None or adaptive is not None):
        raise click.UsageError("--jobs and --adaptive size the batch jobs of --cluster")
    if not scheduler and not cluster:
        _usable_here(device)  # remote workers check their own GPUs
    dtypes = list(float_dtype or ["float16"]) * (len(float_labels) if len(float_dtype) <= 1 else 1)
    so = json_object(storage_options, "--storage-options")
    mso = json_object(manifest_storage_options, "--manifest-storage-options") if manifest_storage_options else None
    copts = json_object(cluster_options, "--cluster-options")
    cfg = ExtractionConfig(teacher=teacher, layer=layer, quantizer=quantizer, out=out,
                           float_labels=list(float_labels), float_dtype=dtypes[: len(float_labels)], storage_options=so,
                           batch_frames=batch_frames, threads_per_worker=threads_per_worker,
                           teacher_kind=teacher_kind, short_input=short_input, device=device,
                           teacher_dtype=teacher_dtype, retry_failed=retry_failed)
    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    report = run_extraction(manifest, cfg, workers=workers, scheduler=scheduler, cluster=cluster,
                            cluster_options=copts, jobs=jobs, adaptive=adaptive,
                            shard_frames=shard_frames or DEFAULT_SHARD_FRAMES, progress=not no_progress,
                            retries=retries, dask_profile=dask_profile, manifest_storage_options=mso, log=log)
    click.echo(json.dumps(report.to_dict(), sort_keys=True) if as_json else report.summary())
    if not report.ok:
        click.echo(f"error: {report.num_failed} utterance(s) failed; the rest of the store is complete "
                   f"(--retry-failed redoes them)", err=True)
        sys.exit(2)
