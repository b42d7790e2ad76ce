"""Teachers for label extraction: one entry point, `load_teacher`, that recognises the checkpoint format.

- a directory (local or fsspec URL) with config.json: HuggingFace HuBERT / wav2vec2 (distill.teachers.hf)
- a .safetensors file with metadata format "ci-store-teacher": our native encoder (distill.teachers.native)
"""
from __future__ import annotations

import posixpath

import fsspec

from distill.teachers.base import Teacher, TeacherError, min_samples_for, sha256_of_files
from distill.teachers.native import (
    NATIVE_FORMAT,
    NativeTeacher,
    NativeTeacherConfig,
    NativeTeacherModel,
    NativeTeacherOutput,
    load_native_model,
    log_mel,
    num_mel_frames,
    read_safetensors_metadata,
    save_native_teacher,
)

__all__ = ["Teacher", "TeacherError", "load_teacher", "NativeTeacher", "NativeTeacherConfig", "NativeTeacherModel",
           "NativeTeacherOutput", "save_native_teacher", "load_native_model", "log_mel", "num_mel_frames",
           "sha256_of_files", "min_samples_for"]


def load_teacher(path_or_url: str, *, layer: int, device="cpu", storage_options: dict | None = None) -> Teacher:
    """Load a teacher in eval mode on `device`, returning hidden states at `layer` (0 = input of the first
    transformer layer, i = output of layer i). Raises ValueError naming the path for unknown formats."""
    fs, p = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    if not fs.exists(p):
        raise FileNotFoundError(f"teacher checkpoint not found: {path_or_url}")
    if fs.isdir(p):
        if not fs.exists(posixpath.join(p.rstrip("/"), "config.json")):
            raise ValueError(f"{path_or_url}: directory has no config.json (expected a HuggingFace model directory)")
        from distill.teachers.hf import load_hf_teacher  # transformers is imported only when needed

        teacher: Teacher = load_hf_teacher(path_or_url, layer=layer, storage_options=storage_options)
    elif p.endswith("config.json"):
        from distill.teachers.hf import load_hf_teacher

        parent = path_or_url.rstrip("/").rsplit("/", 1)[0]
        teacher = load_hf_teacher(parent, layer=layer, storage_options=storage_options)
    else:
        with fs.open(p, "rb") as f:
            data = f.read()
        try:
            meta = read_safetensors_metadata(data)
        except ValueError as e:
            raise ValueError(f"{path_or_url}: not a teacher checkpoint ({e}); give a {NATIVE_FORMAT} .safetensors "
                             f"file or a HuggingFace model directory") from None
        if meta.get("format") != NATIVE_FORMAT:
            raise ValueError(f"{path_or_url}: safetensors file without {NATIVE_FORMAT!r} metadata; for a "
                             f"HuggingFace model give its directory (config.json + weights)")
        teacher = NativeTeacher.from_bytes(data, layer=layer, source=path_or_url)
    return teacher.to(device).eval()
