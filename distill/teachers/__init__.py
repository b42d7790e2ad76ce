"""Teachers for label extraction: one entry point, `load_teacher`, that recognises the checkpoint format.

- a directory (local or fsspec URL) with config.json: HuggingFace HuBERT / wav2vec2 (distill.teachers.hf)
- a .safetensors file with metadata format "ci-store-teacher": our native encoder (distill.teachers.native)
- Whisper encoders (distill.teachers.whisper): a CTranslate2 / faster-whisper folder (model.bin), an
  openai-whisper .pt file, a Hugging Face folder whose config.json says model_type "whisper", or an alias of a
  bundled model (whisper-tiny.en, from the teacher-demo extra)
"""
from __future__ import annotations

import posixpath

import fsspec

from distill.codec.quantizer import METADATA_KEY as QUANTIZER_METADATA_KEY
from distill.teachers.base import (
    TEACHER_DTYPES,
    Teacher,
    TeacherError,
    TeacherFileNotFoundError,
    min_samples_for,
    sha256_of_files,
)
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
from distill.teachers.whisper import (
    SHORT_INPUT_MODES,
    WHISPER_ALIASES,
    WHISPER_KINDS,
    WhisperTeacher,
    detect_whisper_kind,
    load_whisper_teacher,
)

__all__ = ["Teacher", "TeacherError", "load_teacher", "NativeTeacher", "NativeTeacherConfig", "NativeTeacherModel",
           "NativeTeacherOutput", "save_native_teacher", "load_native_model", "log_mel", "num_mel_frames",
           "sha256_of_files", "min_samples_for", "WhisperTeacher", "load_whisper_teacher", "TEACHER_KINDS",
           "SHORT_INPUT_MODES", "TEACHER_DTYPES"]

TEACHER_KINDS = ("native", "hf") + WHISPER_KINDS


def load_teacher(path_or_url: str, *, layer: int, device="cpu", storage_options: dict | None = None,
                 kind: str | None = None, short_input: str | None = None, dtype: str = "float32") -> Teacher:
    """Load a teacher in eval mode on `device`, returning hidden states at `layer` (0 = input of the first
    transformer layer, i = output of layer i). The format is detected from the files unless `kind` (one of
    TEACHER_KINDS) says it; `short_input` picks a Whisper teacher's mode for inputs under 30 s (default
    real-frames); `dtype` (TEACHER_DTYPES) is what the weights are cast to (frames come back float32 whatever
    it is). Raises ValueError (TeacherError for Whisper) naming the path for unknown formats."""
    if kind is not None and kind not in TEACHER_KINDS:
        raise TeacherError(f"teacher kind {kind!r} unknown; choose one of {', '.join(TEACHER_KINDS)}")
    if dtype not in TEACHER_DTYPES:  # before the (possibly long) load
        raise TeacherError(f"teacher dtype {dtype!r} unknown; choose one of {', '.join(TEACHER_DTYPES)}")
    teacher = _load(path_or_url, layer=layer, storage_options=storage_options, kind=kind, short_input=short_input)
    # always cast: transformers loads a half-precision checkpoint as such, and the stored labels record `dtype`
    return teacher.to(device).eval().set_dtype(dtype)


def _load(path_or_url: str, *, layer: int, storage_options: dict | None, kind: str | None,
          short_input: str | None) -> Teacher:
    whisper_opts = {} if short_input is None else {"short_input": short_input}
    if path_or_url in WHISPER_ALIASES or kind in WHISPER_KINDS:
        return load_whisper_teacher(path_or_url, layer=layer, kind=kind, storage_options=storage_options,
                                    **whisper_opts)
    fs, p = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    if not fs.exists(p):
        raise TeacherFileNotFoundError(f"teacher checkpoint not found: {path_or_url}")
    if kind is None and detect_whisper_kind(fs, p, path_or_url):
        return load_whisper_teacher(path_or_url, layer=layer, storage_options=storage_options, **whisper_opts)
    if short_input is not None:
        raise TeacherError(f"{path_or_url}: --short-input applies to Whisper teachers only")
    if kind == "native" and fs.isdir(p):
        raise TeacherError(f"{path_or_url}: --teacher-kind native needs a .safetensors file, not a directory")
    if kind == "hf" or (kind is None and fs.isdir(p)):
        if not fs.exists(posixpath.join(p.rstrip("/"), "config.json")):
            raise TeacherError(f"{path_or_url}: directory has no config.json or model.bin (expected a HuggingFace "
                             f"model directory or a CTranslate2 / faster-whisper Whisper folder)")
        from distill.teachers.hf import (
            load_hf_teacher,  # transformers is imported only when needed
        )

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
            raise TeacherError(f"{path_or_url}: not a teacher checkpoint ({e}); give a {NATIVE_FORMAT} .safetensors "
                               f"file, a HuggingFace model directory or a Whisper checkpoint (CTranslate2 folder, "
                               f"openai .pt)") from None
        if QUANTIZER_METADATA_KEY in meta:
            raise TeacherError(f"{path_or_url}: is a quantizer file (from `ci-store train-quantizer`), not a teacher; "
                               f"pass it as --quantizer, and as the teacher a {NATIVE_FORMAT} .safetensors file, a "
                               f"HuggingFace model directory or a Whisper checkpoint")
        if meta.get("format") != NATIVE_FORMAT:
            raise TeacherError(f"{path_or_url}: safetensors file without {NATIVE_FORMAT!r} metadata; for a "
                               f"HuggingFace model give its directory (config.json + weights)")
        teacher = NativeTeacher.from_bytes(data, layer=layer, source=path_or_url)
    return teacher
