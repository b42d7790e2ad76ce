"""Does a padded teacher batch change an utterance's frames, bit for bit? And what does batching buy?

    python bench/batch_bitwise.py [--teachers native,whisper-tiny.en] [--utterances 48] [--batch-seconds 30]

For each teacher, the first --utterances utterances of a synthetic corpus (cached, `ci-store make-corpus`) are
embedded (1) alone, one forward each (what extraction does by default), and (2) by the shard task's own batching
(distill.extract.shard_task.batches_of: sorted by length, padded batches of at most --batch-seconds of audio) through
distill.extract.shard_task.embed_batch. Printed per teacher: utterances whose frames differ in any bit, the largest
absolute and relative difference, the share of MVQ codes that change (a 16 x 256 quantizer trained on the alone
frames), and teacher seconds alone / batched (the speed-up). "native" is a randomly initialised native teacher
(d_model 256, 4 heads, ffn 1024, 6 layers); "whisper-tiny.en" the bundled Whisper encoder (layer 4).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cached_corpus, load_line, machine_state, table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="native,whisper-tiny.en")
    ap.add_argument("--utterances", type=int, default=48)
    ap.add_argument("--batch-seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/ci-store-bench-batch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.data.audio import read_audio
    from distill.data.manifest import load_manifest
    from distill.extract.shard_task import batches_of, embed_batch
    from distill.teachers import NativeTeacher, NativeTeacherConfig, NativeTeacherModel, load_teacher

    torch.set_num_threads(args.threads)
    manifest, _ = cached_corpus(os.path.join(args.workdir, "corpus"), 8.0, 0)
    utts = load_manifest(manifest)[:args.utterances]
    waves = {u.id: read_audio(u, 16000) for u in utts}
    samples = {u: len(w) for u, w in waves.items()}
    print(f"{len(utts)} utterances, {sum(samples.values()) / 16000:.0f} s of audio; {load_line()}")
    rows, results = [], []
    for name in args.teachers.split(","):
        if name == "native":
            torch.manual_seed(0)
            teacher = NativeTeacher(NativeTeacherModel(NativeTeacherConfig(d_model=256, num_heads=4, ffn_dim=1024,
                                                                           num_layers=6)), layer=6)
        else:
            teacher = load_teacher(name, layer=4)
        ids = list(waves)
        t = time.perf_counter()
        alone = {u: embed_batch(teacher, [waves[u]])[0] for u in ids}
        t_alone = time.perf_counter() - t
        batches = batches_of(ids, samples, 16000, args.batch_seconds)
        t = time.perf_counter()
        batched = {}
        for b in batches:
            for u, f in zip(b, embed_batch(teacher, [waves[u] for u in b])):
                batched[u] = f
        t_batched = time.perf_counter() - t
        differ = sum(not torch.equal(alone[u], batched[u]) for u in ids)
        absdiff = max(float((alone[u] - batched[u]).abs().max()) for u in ids)
        rel = max(float((alone[u] - batched[u]).abs().max() / alone[u].abs().max()) for u in ids)
        frames = torch.cat([alone[u] for u in ids]).numpy()
        q = MultiCodebookQuantizer.train(frames, num_codebooks=16, seed=0, progress=False, kmeans_iters=4,
                                         lsq_iters=1, train_beam_size=2)
        ca = q.encode(frames)
        cb = q.encode(torch.cat([batched[u] for u in ids]).numpy())
        changed = float((ca != cb).mean())
        r = {"teacher": name, "utterances": len(ids), "batches": len(batches), "differ_bitwise": differ,
             "max_abs_diff": absdiff, "max_rel_diff": rel, "codes_changed": changed, "alone_s": t_alone,
             "batched_s": t_batched, "speedup": t_alone / t_batched}
        results.append(r)
        rows.append([name, f"{differ}/{len(ids)}", f"{absdiff:.2e}", f"{rel:.2e}", f"{100 * changed:.3f}%",
                     len(batches), t_alone, t_batched, t_alone / t_batched])
        print(f"  {name}: done", flush=True)
    print()
    print(table(["teacher", "differ bitwise", "max abs diff", "max rel diff", "codes changed", "batches",
                 "alone s", "batched s", "speed-up"], rows))
    print(f"({args.threads} torch thread(s), batches of <= {args.batch_seconds:g} s padded audio; {load_line()})")
    write_json(args.json, {"machine": machine_state(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
