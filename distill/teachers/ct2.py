"""A numpy-only reader for CTranslate2's `model.bin` (so faster-whisper folders load without the ctranslate2 runtime).

Layout (little endian), as written by ctranslate2/specs/model_spec.py `_serialize`, binary version 6:
u32 version, str spec name, u32 spec revision, u32 variable count, then per variable: str name, u8 rank, rank x
u32 dims, u8 dtype id, u32 byte count, raw bytes; then u32 alias count and (str alias, str target) pairs.
A str is u16 length (including a trailing NUL) followed by the UTF-8 bytes and the NUL.
Every length is checked against the bytes left, so a truncated or corrupt file is a TeacherError naming the file,
never a huge allocation: variables are zero-copy views into the buffer until a caller converts them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from distill.teachers.base import TeacherError

__all__ = ["CT2Model", "read_ct2_model", "CT2_BINARY_VERSION"]

CT2_BINARY_VERSION = 6
# dtype ids of ctranslate2's DataType enum (model_spec._dtype_to_type_id order)
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
           5: np.dtype("<u2")}  # 5 = bfloat16, kept as raw uint16 until converted
_BF16 = 5
_MAX_RANK = 8


@dataclass
class CT2Model:
    """Spec name/revision and the variables of a model.bin: name -> (array view, ctranslate2 dtype id)."""

    spec: str
    revision: int
    variables: dict
    aliases: dict

    def float32(self, name: str) -> np.ndarray:
        """Variable `name` as float32, dequantised when the file stores int8/int16 weights with a `_scale`."""
        arr, dt = self.variables[name]
        if dt == _BF16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        out = arr.astype(np.float32)
        if dt in (1, 2):  # quantised weight: value = q / scale (per output row for int8, scalar for int16)
            scale_name = name + "_scale"
            if scale_name not in self.variables:
                raise KeyError(f"{name} is quantised but {scale_name} is missing")
            scale = self.variables[scale_name][0].astype(np.float32)
            out = out / scale.reshape(scale.shape + (1,) * (out.ndim - scale.ndim))
        return out

    def scalar(self, name: str) -> int:
        arr, _ = self.variables[name]
        return int(arr.reshape(-1)[0])


def read_ct2_model(buf, source: str, *, want=lambda name: True) -> CT2Model:
    """Parse a model.bin held in `buf` (bytes, memoryview or mmap); variables (aliases resolved) with want(name)
    are returned as views into `buf`."""
    mv = memoryview(buf)
    size = len(mv)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise TeacherError(f"{source}: truncated or corrupt CTranslate2 model.bin: {what} needs {n} bytes at "
                               f"offset {pos}, the file has {size}")
        out = mv[pos:pos + n]
        pos += n
        return out

    def u(fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        n = u("H", what + " length")
        raw = bytes(take(n, what))
        if n < 1 or raw[-1] != 0:
            raise TeacherError(f"{source}: corrupt CTranslate2 model.bin: {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise TeacherError(f"{source}: corrupt CTranslate2 model.bin: {what} is not UTF-8") from None

    version = u("I", "binary version")
    if version != CT2_BINARY_VERSION:
        raise TeacherError(f"{source}: CTranslate2 model.bin binary version {version} is not supported (this reader "
                           f"knows version {CT2_BINARY_VERSION}; re-convert with ctranslate2>=3)")
    spec = string("spec name")
    revision = u("I", "spec revision")
    count = u("I", "variable count")
    variables: dict = {}
    for i in range(count):
        name = string(f"name of variable {i}")
        rank = u("B", f"rank of {name}")
        if rank > _MAX_RANK:
            raise TeacherError(f"{source}: corrupt CTranslate2 model.bin: variable {name} has rank {rank}")
        shape = tuple(u("I", f"shape of {name}") for _ in range(rank))
        dt = u("B", f"dtype of {name}")
        if dt not in _DTYPES:
            raise TeacherError(f"{source}: CTranslate2 model.bin variable {name} has unknown dtype id {dt}")
        nbytes = u("I", f"byte count of {name}")
        expect = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt].itemsize
        if nbytes != expect:
            raise TeacherError(f"{source}: corrupt CTranslate2 model.bin: variable {name} of shape {list(shape)} "
                               f"declares {nbytes} bytes, expected {expect}")
        raw = take(nbytes, f"data of {name}")
        variables[name] = (np.frombuffer(raw, dtype=_DTYPES[dt]).reshape(shape), dt)  # a view: no copy
    aliases = {}
    for i in range(u("I", "alias count")):
        alias = string(f"alias {i}")
        aliases[alias] = string(f"target of alias {alias}")
    # the converter stores equal variables once and names the others as aliases of it (anywhere in the model)
    for alias, target in aliases.items():
        if want(alias):
            if target not in variables:
                raise TeacherError(f"{source}: corrupt CTranslate2 model.bin: alias {alias} names missing "
                                   f"variable {target}")
            variables[alias] = variables[target]
    return CT2Model(spec, revision, {k: v for k, v in variables.items() if want(k)}, aliases)
