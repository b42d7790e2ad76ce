"""Extraction on GPUs (issue 16): frames/s with 1 vs N GPU workers, GPU utilisation, and how much the stored codes
change between CPU and CUDA and between teacher dtypes. Sized to finish in under 10 minutes on a machine with GPUs;
`--device cpu --quick` runs the same code paths on CPU as a plumbing check (not a GPU measurement).

    python bench/gpu_check.py                                   # CUDA, every visible GPU (not yet run: no GPU)
    python bench/gpu_check.py --device cpu --quick              # plumbing check on CPU (3.5 min on 2 busy cores)
    python bench/gpu_check.py --device cpu --teachers whisper --minutes 3 --codebooks 16   # docs/cluster.md's table

Teachers (--teachers):
  hubert-large  a Hugging Face HuBERT with HuBERT-Large's sizes (24 layers, width 1024, ffn 4096, 16 heads, the 7-conv
                front end; 316 M parameters) and random weights (torch.manual_seed(0)), saved to --workdir, layer 18.
                With --quick: the same architecture at width 64 and 2 layers.
  whisper       the bundled whisper-tiny.en (teacher-demo extra), layer 4 (the encoder output).
Per teacher: frames sampled on --device, an MVQ codec trained on them (--codebooks x 256, a short schedule: the
codes' agreement between runs, not the codec's quality, is the point), then `run_extraction` runs, the job's own
code path end to end, each into its own store:
  ref     CPU, float32, float32 labels alongside (the exact frames), on --ref-utterances utterances
  1w      --device, float32, one worker          (CUDA: one GPU)
  Nw      --device, float32, N workers           (CUDA: every visible GPU; CPU: 2 processes); must be
          byte-identical to 1w (the job's promise: worker count never changes a stored byte)
  <dtype> --device, each of --dtypes, N workers
Printed per run: end-to-end frames/s (planning, cluster start, model loading and shutdown included) and teacher
frames/s (frames / summed teacher-forward seconds, per worker), GPU utilisation while it ran (mean and max over
nvidia-smi samples every 0.5 s, per GPU; n/a without nvidia-smi), and against `ref` on the utterances they share:
the share of code entries (frame x codebook) that differ, the share of frames with any differing code, and the
relative reconstruction error sum||decode(codes) - x||^2 / sum||x - mean(x)||^2 of each run's codes against the
float32 CPU frames x (ref's own error is the codec's floor).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cached_corpus, load_line, machine_state, table, write_json  # noqa: E402

import numpy as np  # noqa: E402

HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                    feat_extract_norm="layer", do_stable_layer_norm=True)
HUBERT_QUICK = dict(HUBERT_LARGE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    conv_dim=(32,) * 7)


class GpuPoll(threading.Thread):
    """nvidia-smi utilisation and memory samples every `interval` s until stopped; empty without nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop_event = interval, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self):
        while self.available and not self.stop_event.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                for line in out.stdout.strip().splitlines():
                    i, util, mem = (x.strip() for x in line.split(","))
                    self.samples.append((int(i), float(util), float(mem)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self.stop_event.wait(self.interval)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        out = {}
        for gpu in sorted({s[0] for s in self.samples}):
            u = [s[1] for s in self.samples if s[0] == gpu]
            m = [s[2] for s in self.samples if s[0] == gpu]
            out[str(gpu)] = {"util_mean": float(np.mean(u)), "util_max": float(np.max(u)), "mem_max_mib": max(m)}
        return out

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.join(timeout=15)


def build_hubert(workdir: str, quick: bool) -> str:
    """A random-weight HF HuBERT directory with HuBERT-Large's sizes (or the quick ones), cached in workdir."""
    import torch
    import transformers

    path = os.path.join(workdir, "hubert-quick" if quick else "hubert-large-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = transformers.HubertModel(transformers.HubertConfig(**(HUBERT_QUICK if quick else HUBERT_LARGE)))
        model.save_pretrained(path, safe_serialization=True)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_value": 0.0,
                       "sampling_rate": 16000, "do_normalize": True, "return_attention_mask": True}, f)
    return path


def build_quantizer(workdir: str, name: str, manifest: str, teacher: str, layer: int, args) -> str:
    import torch

    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.extract import sample_frames

    path = os.path.join(workdir, f"mvq-{name}-L{layer}-N{args.codebooks}-{args.device.split(':')[0]}.safetensors")
    if not os.path.exists(path):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        frames = sample_frames(manifest, teacher, layer, num_utterances=200, max_frames=args.train_frames, seed=0,
                               progress=False, device=args.device)
        q = MultiCodebookQuantizer.train(frames, num_codebooks=args.codebooks, seed=0, progress=False,
                                         kmeans_iters=4, lsq_iters=1, train_beam_size=2, device=args.device)
        q.save(path)
    return path


def subset_manifest(manifest: str, n: int, path: str) -> str:
    from distill.data.manifest import load_manifest

    with open(path, "w") as f:
        for u in load_manifest(manifest)[:n]:
            f.write(json.dumps({"id": u.id, "audio": u.audio, "sample_rate": u.sample_rate,
                                "num_samples": u.num_samples}) + "\n")
    return path


def extract(manifest: str, out: str, teacher: str, layer: int, quantizer: str, *, device: str, dtype: str,
            workers: int | None, threads: int, shard_frames: int, float_labels: str | None = None) -> dict:
    from distill.extract import ExtractionConfig, run_extraction

    shutil.rmtree(out, ignore_errors=True)
    if float_labels:
        shutil.rmtree(float_labels, ignore_errors=True)
    cfg = ExtractionConfig(teacher=teacher, layer=layer, quantizer=quantizer, out=out, device=device,
                           teacher_dtype=dtype, threads_per_worker=threads,
                           float_labels=[float_labels] if float_labels else None, float_dtype="float32")
    with GpuPoll() as poll:
        rep = run_extraction(manifest, cfg, workers=workers, shard_frames=shard_frames, progress=False,
                             log=lambda *a: None)
    if not rep.ok:
        raise RuntimeError(f"{out}: {len(rep.failures)} failed utterances: {list(rep.failures.items())[:3]}")
    return {"frames": rep.frames, "seconds": rep.seconds, "e2e_fps": rep.frames / rep.seconds,
            "teacher_fps_per_worker": rep.frames / rep.seconds_teacher if rep.seconds_teacher else None,
            "workers": rep.workers, "gpu": poll.summary(), "provenance": rep.provenance}


def compare(ref_codes: str, ref_frames: str, other: str, quantizer: str) -> dict:
    """Codes of `other` against `ref_codes` on their shared utterances, and both codes' reconstruction error
    against the exact float32 frames."""
    from ci_store import open_store
    from distill.codec.quantizer import MultiCodebookQuantizer, relative_reconstruction_error

    q = MultiCodebookQuantizer.load(quantizer)
    a, b, x = open_store(ref_codes), open_store(other), open_store(ref_frames)
    ids = sorted(set(a.ids) & set(b.ids))
    ca = np.concatenate([a[u] for u in ids])
    cb = np.concatenate([b[u] for u in ids])
    frames = np.concatenate([x[u] for u in ids]).astype(np.float32)
    diff = ca != cb
    return {"utterances": len(ids), "frames": int(ca.shape[0]), "entries_differing": float(diff.mean()),
            "frames_differing": float(diff.any(axis=1).mean()),
            "recon_error_ref": relative_reconstruction_error(frames, q.decode(ca)),
            "recon_error": relative_reconstruction_error(frames, q.decode(cb))}


def same_tree(a: str, b: str) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(os.path.join(a, d), os.path.join(b, d))
                                               for d in cmp.common_dirs)


def check_teacher(name: str, teacher: str, layer: int, manifest: str, workdir: str, args) -> dict:
    from distill.extract.cluster import parse_device, visible_gpus

    cuda = parse_device(args.device)[0] == "cuda"
    n_gpus = len(visible_gpus()) if cuda else 0
    quantizer = build_quantizer(workdir, name, manifest, teacher, layer, args)
    cores = os.cpu_count() or 1
    stores = os.path.join(workdir, "stores", name)
    os.makedirs(stores, exist_ok=True)
    ref_manifest = subset_manifest(manifest, args.ref_utterances, os.path.join(stores, "ref.jsonl"))
    from distill.data.manifest import load_manifest

    longest = max(u.num_samples_at(16000) for u in load_manifest(manifest)) // 320 + 2  # both teachers: 50 Hz
    args.shard_frames = max(args.shard_frames, longest)  # a CI shard holds whole utterances
    runs: dict[str, dict] = {}
    # the CPU reference: float32 codes and float32 frames; workers share the host's cores
    ref_workers = 1 if args.quick else max(1, min(4, cores // 4))
    runs["ref"] = extract(ref_manifest, os.path.join(stores, "ref"), teacher, layer, quantizer, device="cpu",
                          dtype="float32", workers=ref_workers, threads=max(1, cores // ref_workers),
                          shard_frames=args.shard_frames, float_labels=os.path.join(stores, "ref-frames"))
    print(f"  ref done ({runs['ref']['seconds']:.0f} s)", flush=True)
    threads = 1 if cuda else max(1, cores // 2 // 2)
    n = n_gpus if cuda else 2
    runs["1w"] = extract(manifest, os.path.join(stores, "1w"), teacher, layer, quantizer, device=args.device,
                         dtype="float32", workers=1, threads=threads, shard_frames=args.shard_frames)
    print(f"  1w done ({runs['1w']['seconds']:.0f} s)", flush=True)
    if n > 1:
        runs["Nw"] = extract(manifest, os.path.join(stores, "Nw"), teacher, layer, quantizer, device=args.device,
                             dtype="float32", workers=n, threads=threads, shard_frames=args.shard_frames)
        runs["Nw"]["identical_to_1w"] = same_tree(os.path.join(stores, "1w"), os.path.join(stores, "Nw"))
        print(f"  {n}w done ({runs['Nw']['seconds']:.0f} s)", flush=True)
    for dtype in args.dtypes:
        runs[dtype] = extract(manifest, os.path.join(stores, dtype), teacher, layer, quantizer, device=args.device,
                              dtype=dtype, workers=n, threads=threads, shard_frames=args.shard_frames)
        print(f"  {dtype} done ({runs[dtype]['seconds']:.0f} s)", flush=True)
    for key, r in runs.items():
        r["vs_ref"] = compare(os.path.join(stores, "ref"), os.path.join(stores, "ref-frames"),
                              os.path.join(stores, key), quantizer)
    return {"teacher": teacher, "layer": layer, "quantizer": quantizer, "runs": runs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (every visible GPU) or cpu (plumbing check)")
    ap.add_argument("--quick", action="store_true", help="small corpus, small HuBERT, 4 codebooks")
    ap.add_argument("--teachers", default="hubert-large,whisper")
    ap.add_argument("--dtypes", default=None,
                    help="teacher dtypes compared with float32 (default: bfloat16,float16 on CUDA, bfloat16 on CPU)")
    ap.add_argument("--minutes", type=float, default=None, help="corpus minutes (default 10; --quick 0.5)")
    ap.add_argument("--ref-utterances", type=int, default=None,
                    help="utterances in the CPU reference run (default 60; --quick all)")
    ap.add_argument("--codebooks", type=int, default=None, help="default 16; --quick 4")
    ap.add_argument("--train-frames", type=int, default=20000)
    ap.add_argument("--shard-frames", type=int, default=None,
                    help="frames per CI shard: several tasks per worker (default 2048; --quick 512)")
    ap.add_argument("--workdir", default="/tmp/ci-store-gpu-check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from distill.extract import check_device

    check_device(args.device)
    cuda = args.device.startswith("cuda")
    args.dtypes = [d for d in (args.dtypes or ("bfloat16,float16" if cuda else "bfloat16")).split(",") if d]
    args.minutes = args.minutes if args.minutes is not None else (0.5 if args.quick else 10.0)
    args.ref_utterances = args.ref_utterances or (10 ** 6 if args.quick else 60)
    args.codebooks = args.codebooks or (4 if args.quick else 16)
    args.shard_frames = args.shard_frames or (512 if args.quick else 2048)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    print(f"machine: {json.dumps(machine_state())}\n{load_line()}", flush=True)
    manifest, synth_s = cached_corpus(os.path.join(args.workdir, f"corpus-{args.minutes:g}"), args.minutes, seed=7)
    print(f"corpus: {args.minutes:g} min ({synth_s:.0f} s to make)", flush=True)
    result = {"args": vars(args), "machine": machine_state(), "teachers": {}}
    for name in [t for t in args.teachers.split(",") if t]:
        if name == "hubert-large":
            teacher, layer = build_hubert(args.workdir, args.quick), 2 if args.quick else 18
        elif name == "whisper":
            teacher, layer = "whisper-tiny.en", 4
        else:
            raise SystemExit(f"unknown teacher {name!r} (hubert-large, whisper)")
        print(f"{name}: {teacher} layer {layer}", flush=True)
        result["teachers"][name] = check_teacher(name, teacher, layer, manifest, args.workdir, args)
    rows = []
    for name, t in result["teachers"].items():
        for key, r in t["runs"].items():
            v, gpu = r["vs_ref"], r["gpu"]
            util = "n/a" if not gpu else " ".join(f"{g}:{s['util_mean']:.0f}/{s['util_max']:.0f}%"
                                                  for g, s in gpu.items())
            rows.append([name, key, r["provenance"]["device"], r["provenance"]["dtype"], r["workers"],
                         r["e2e_fps"], r["teacher_fps_per_worker"] or float("nan"), util,
                         f"{100 * v['entries_differing']:.2f}%", f"{100 * v['frames_differing']:.1f}%",
                         f"{v['recon_error']:.4f}", f"{v['recon_error_ref']:.4f}",
                         {True: "yes", False: "NO"}.get(r.get("identical_to_1w"), "-")])
    print()
    print(table(["teacher", "run", "device", "dtype", "workers", "e2e frames/s", "teacher frames/s/worker",
                 "GPU util mean/max", "codes differing", "frames differing", "recon err", "ref recon err",
                 "same as 1w"], rows))
    print(f"\n(differences and errors on the utterances each run shares with ref; {load_line()}; "
          f"{time.perf_counter() - t0:.0f} s in all)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
