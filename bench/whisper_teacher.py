"""The Whisper teacher on a synthetic corpus: (1) the two short-input modes compared (cosine similarity of each
layer's frames in "real-frames" mode to the 30 s padded run, and encoder seconds per utterance), (2) the bundled
tiny.en's own greedy transcription WER, decoded by ctranslate2's `generate` (the reference runtime) from
transformers' WhisperFeatureExtractor features.

    python bench/whisper_teacher.py --manifest CORPUS/cuts_test.jsonl.gz [--teacher whisper-tiny.en] [--json F]
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

from _common import machine_state, write_json


def short_input(manifest: str, teacher: str, limit: int | None, threads: int) -> dict:
    import numpy as np
    import torch

    from distill.data.audio import read_audio
    from distill.data.manifest import load_manifest
    from distill.teachers import load_teacher

    torch.set_num_threads(threads)
    utts = load_manifest(manifest)[:limit]
    top = load_teacher(teacher, layer=0).num_layers
    modes = {m: load_teacher(teacher, layer=top, short_input=m) for m in ("pad30", "real-frames")}
    layers = list(range(modes["pad30"].num_layers + 1))
    captured: dict = {}
    for m, t in modes.items():  # every layer from one forward pass: hooks on the blocks' inputs and ln_post
        top = len(t.model.blocks)
        for i, blk in enumerate(t.model.blocks):
            blk.register_forward_pre_hook(lambda mod, args, m=m, i=i: captured.__setitem__((m, i), args[0]))
        t.model.ln_post.register_forward_hook(lambda mod, args, out, m=m, k=top: captured.__setitem__((m, k), out))
    cos = {l: [] for l in layers}
    edge = []  # last layer, the utterance's last two frames: where the two modes' contexts differ most
    secs = {m: [] for m in modes}
    durations = []
    for u in utts:
        w = torch.from_numpy(read_audio(u, 16000))[None]
        n = torch.tensor([w.shape[1]])
        durations.append(w.shape[1] / 16000)
        nf = modes["pad30"].num_frames(w.shape[1])
        for m, t in modes.items():
            t0 = time.perf_counter()
            t.embed(w, n)
            secs[m].append(time.perf_counter() - t0)
        for l in layers:
            a, b = captured[("real-frames", l)][0, :nf], captured[("pad30", l)][0, :nf]
            c = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
            cos[l].extend(c)
            if l == layers[-1]:
                edge.extend(c[-2:])
    res = {"utterances": len(utts), "seconds_audio": {"mean": statistics.mean(durations), "min": min(durations),
                                                      "max": max(durations)},
           "encoder_seconds_per_utt_median": {m: statistics.median(v) for m, v in secs.items()},
           "cosine_real_frames_vs_pad30": {str(l): {"mean": float(np.mean(v)), "p05": float(np.percentile(v, 5)),
                                                    "min": float(np.min(v))} for l, v in cos.items()},
           "cosine_last_layer_last_two_frames": {"mean": float(np.mean(edge)), "min": float(np.min(edge))},
           "frames": len(cos[layers[-1]])}
    return res


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^A-Z' ]+", " ", text.upper().replace("-", " ")).split())


def wer(manifest: str, model_dir: str, limit: int | None, threads: int,
        modes=("pad30", "real-frames")) -> dict:
    import ctranslate2
    import jiwer
    import numpy as np
    import tokenizers
    import transformers

    from distill.data.audio import read_audio
    from distill.data.manifest import load_manifest

    utts = load_manifest(manifest)[:limit]
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    tok = tokenizers.Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=threads)
    prompt = ["<|startoftranscript|>", "<|notimestamps|>"]  # English-only model: no language/task tokens
    refs = [_norm(u.text or "") for u in utts]
    res = {"utterances": len(utts), "words": sum(len(r.split()) for r in refs)}
    for mode in modes:
        hyps = []
        t0 = time.perf_counter()
        for u in utts:  # one at a time: real-frames features differ in length
            wave = read_audio(u, 16000)
            feats = fe(wave, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
            if mode == "real-frames":  # the utterance's own mel frames only (2 per encoder frame)
                feats = feats[:, :, :2 * ((len(wave) // 160 + 1) // 2)]
            out = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), [prompt],
                                 beam_size=1, max_length=224)
            hyps.append(_norm(tok.decode(out[0].sequences_ids[0])))
        res[mode] = {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps),
                     "seconds": time.perf_counter() - t0,
                     "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--teacher", default="whisper-tiny.en")
    ap.add_argument("--limit", type=int, default=None, help="first N utterances only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the short-input timing")
    ap.add_argument("--skip", default="", help="comma list: short-input, wer")
    ap.add_argument("--wer-modes", default="pad30,real-frames", help="features for the WER runs: pad30 "
                    "(Whisper's 30 s window) and/or real-frames (the utterance's own mel frames only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from distill.teachers.whisper import resolve_alias

    res = {"machine_before": machine_state(), "args": vars(args)}
    if "short-input" not in args.skip:
        res["short_input"] = short_input(args.manifest, args.teacher, args.limit, args.threads)
        print("short input:", res["short_input"], flush=True)
    if "wer" not in args.skip:
        res["wer"] = wer(args.manifest, resolve_alias(args.teacher) or args.teacher, args.limit, 2,
                       modes=[m for m in args.wer_modes.split(",") if m])
        print("wer:", res["wer"], flush=True)
    res["machine_after"] = machine_state()
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
