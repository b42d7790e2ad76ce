"""Teacher frames for training the quantizer: a seeded sample of utterances drawn across the whole corpus."""
from __future__ import annotations

import numpy as np

from distill.data.audio import AudioError, read_audio
from distill.data.manifest import load_manifest
from distill.extract.cluster import check_device
from distill.extract.job import embed_utterance
from distill.extract.planning import ExtractionError, check_unique_ids
from distill.teachers import load_teacher

def sample_frames(manifest, teacher_path: str, layer: int, *, num_utterances: int = 1000,
                  max_frames: int = 200_000, seed: int = 0, storage_options: dict | None = None,
                  progress: bool = True, teacher_kind: str | None = None,
                  short_input: str | None = None, device: str = "cpu",
                  teacher_dtype: str = "float32") -> np.ndarray:
    """Embed a seeded random sample of utterances drawn across the whole corpus (not the first N), with the
    teacher on `device` in `teacher_dtype` (frames come back float32)."""
    from tqdm.auto import tqdm

    check_device(device)

    utts = load_manifest(manifest, storage_options=storage_options) if isinstance(manifest, str) else list(manifest)
    check_unique_ids(utts)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(utts))
    teacher = load_teacher(teacher_path, layer=layer, device=device, storage_options=storage_options,
                           kind=teacher_kind, short_input=short_input, dtype=teacher_dtype)
    chunks, total, skipped = [], 0, []
    bar = tqdm(total=min(num_utterances, len(utts)), desc="sample-frames", disable=not progress)
    for idx in order[:num_utterances]:
        u = utts[int(idx)]
        try:
            wave = read_audio(u, teacher.sample_rate, storage_options=storage_options,
                              min_samples=teacher.min_samples)
        except AudioError as e:
            skipped.append(str(e))  # names the utterance and its file
            bar.update(1)
            continue
        emb = embed_utterance(teacher, u, wave)
        if np.isfinite(emb).all() and emb.shape[0]:
            chunks.append(emb)
            total += emb.shape[0]
        bar.update(1)
        if total >= max_frames:
            break
    bar.close()
    if not chunks:
        name = manifest if isinstance(manifest, str) else "the manifest"
        shown = "; ".join(skipped[:3]) + (f"; ... ({len(skipped) - 3} more)" if len(skipped) > 3 else "")
        raise ExtractionError(f"no usable utterance among the {len(order[:num_utterances])} sampled from {name}"
                              + (f": {shown}" if shown else " (all teacher embeddings were empty or non-finite)"))
    frames = np.concatenate(chunks)
    if frames.shape[0] > max_frames:
        frames = frames[np.sort(rng.choice(frames.shape[0], max_frames, replace=False))]
    return frames
