"""MVQ codec: compress each teacher frame (dim floats) to N codebook indexes (uint8 for K<=256, else uint16).

Additive multi-codebook quantization with a fixed pre-transform, chosen over the reference `multi_quantization`
trainer because it wins on held-out error, encode speed and training time (docs/codec.md has the numbers):

  * pre-transform fixed at training time: subtract the training mean, rotate onto the top-r PCA directions
    (r picked by Gaussian water-filling for the bit budget); the dropped directions cost only their variance.
    No batch statistics at encode time, so codes never depend on what else is in the batch.
  * training: residual k-means initialisation, then LSQ-style alternation of code search and a joint
    least-squares update of all codebooks.
  * encoding: one GEMM for all unary terms, then beam search + ICM over a fixed pairwise lookup table.
    Frames go through fixed-size, zero-padded row blocks so every frame sees identically shaped GEMMs:
    a frame's codes are bit-identical whether it is encoded alone or at any position of any batch.

    q = MultiCodebookQuantizer.train(frames, num_codebooks=16)      # frames: [N, dim] or iterable of batches
    codes = q.encode(x)                                             # [T, 16] uint8
    x_hat = q.decode(codes)                                         # [T, dim] float32
    q.save("q.safetensors"); q2 = MultiCodebookQuantizer.load("q.safetensors")
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import numpy as np
import torch

from ci_store.format import codes_dtype

from . import training as T
from .search import SearchTables, search_block

FORMAT = "ci-store-mvq"
VERSION = 1
METADATA_KEY = "ci-store-mvq-config"
TEACHER_FORMAT = "ci-store-teacher"  # distill.teachers.native.NATIVE_FORMAT: recognised to say "that is a teacher"
FRAMES_HINT = "give the .npy frames file written by `ci-store sample-frames`"

# Algorithm options and their defaults (all recorded in `config`).
DEFAULT_OPTS: dict[str, Any] = {
    "proj_dim": "auto",        # int, "auto" (water-filling) or None (no rotation, full dim)
    "beam_size": 8,            # encode-time beam width
    "icm_sweeps": 1,           # encode-time ICM sweeps after the beam search
    "block_rows": 256,         # fixed encode block (rows); part of the codec definition (bit-exact codes)
}
DEFAULT_TRAIN_OPTS: dict[str, Any] = {
    "max_train_frames": 65536,  # frames sampled from the training data
    "kmeans_iters": 8,          # Lloyd iterations per residual stage of the initialisation
    "lsq_iters": 4,             # search / joint least-squares alternations
    "train_beam_size": None,    # beam during training (None: same as beam_size)
    "ridge": 1e-4,              # ridge on the least-squares update, relative to frames per codeword
}



class QuantizerError(ValueError):
    """A quantizer file or its training/encoding input cannot be used; the message names the file or item."""


class QuantizerFileNotFoundError(QuantizerError, FileNotFoundError):
    """The quantizer (or frames) file does not exist; still a FileNotFoundError for callers that catch that."""



def check_code_range(codes: torch.Tensor, codebook_size: int) -> None:
    """QuantizerError naming the first [frames, codebooks] entry outside [0, codebook_size)."""
    if codes.numel():
        bad = (codes < 0) | (codes >= codebook_size)
        if bool(bad.any()):
            row, col = (int(v) for v in torch.nonzero(bad)[0])
            raise QuantizerError(f"codes out of range at row {row}, codebook {col}: value {int(codes[row, col])} "
                                 f"not in [0, {codebook_size})")

def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


class MultiCodebookQuantizer:
    """Additive multi-codebook quantizer with a fixed mean/PCA pre-transform (see module docstring)."""

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int = 256, *, proj_dim: int | None = None,
                 beam_size: int = DEFAULT_OPTS["beam_size"], icm_sweeps: int = DEFAULT_OPTS["icm_sweeps"],
                 block_rows: int = DEFAULT_OPTS["block_rows"], mean=None, projection=None, codebooks=None,
                 train_info: dict | None = None, device="cpu"):
        if not (isinstance(dim, int) and dim > 0):
            raise QuantizerError(f"dim must be a positive int, got {dim!r}")
        if not (isinstance(num_codebooks, int) and num_codebooks > 0):
            raise QuantizerError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        if not _is_pow2(codebook_size) or not 2 <= codebook_size <= 65536:
            raise QuantizerError(f"codebook_size must be a power of two in [2, 65536], got {codebook_size!r}")
        r = dim if proj_dim is None else proj_dim
        if not (isinstance(r, int) and 1 <= r <= dim):
            raise QuantizerError(f"proj_dim must be an int in [1, dim={dim}] or None, got {proj_dim!r}")
        for name, v, lo in (("beam_size", beam_size, 1), ("icm_sweeps", icm_sweeps, 0), ("block_rows", block_rows, 1)):
            if not (isinstance(v, int) and v >= lo):
                raise QuantizerError(f"{name} must be an int >= {lo}, got {v!r}")
        self.dim, self.num_codebooks, self.codebook_size = dim, num_codebooks, codebook_size
        self.proj_dim = proj_dim
        self.beam_size, self.icm_sweeps, self.block_rows = beam_size, icm_sweeps, block_rows
        self.train_info = dict(train_info or {})
        self.device = torch.device(device)

        def t(a, shape, name):
            a = torch.zeros(shape) if a is None else torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
            if tuple(a.shape) != tuple(shape):
                raise QuantizerError(f"array {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            a = a.detach().to(torch.float32).cpu().contiguous()
            if not bool(torch.isfinite(a).all()):
                raise QuantizerError(f"array {name!r} contains NaN or inf")
            return a

        self._mean = t(mean, (dim,), "mean")
        self._projection = None if proj_dim is None else t(projection, (dim, r), "projection")
        if codebooks is None:  # untrained: small random codebooks so the object is usable/testable
            g = torch.Generator().manual_seed(0)
            codebooks = torch.randn((num_codebooks, codebook_size, r), generator=g) * 0.01
        self._codebooks = t(codebooks, (num_codebooks, codebook_size, r), "codebooks")
        self._tables: SearchTables | None = None
        self._dec: torch.Tensor | None = None
        self.to(self.device)

    # ------------------------------------------------------------------------------------------------ basics
    def to(self, device) -> "MultiCodebookQuantizer":
        self.device = torch.device(device)
        self._mean_d = self._mean.to(self.device)
        self._proj_d = None if self._projection is None else self._projection.to(self.device)
        self._cb_d = self._codebooks.to(self.device)
        self._tables = SearchTables(self._cb_d)
        # decoded codebooks in the input space: decode is then a gather-and-sum, no GEMM
        cb = self._cb_d if self._proj_d is None else (self._cb_d.double() @ self._proj_d.double().t()).float()
        self._dec = cb.contiguous()
        return self

    @property
    def codes_dtype(self) -> np.dtype:
        return codes_dtype(self.codebook_size)

    @property
    def config(self) -> dict:
        cfg = {"format": FORMAT, "version": VERSION, "dim": self.dim, "num_codebooks": self.num_codebooks,
               "codebook_size": self.codebook_size, "proj_dim": self.proj_dim, "beam_size": self.beam_size,
               "icm_sweeps": self.icm_sweeps, "block_rows": self.block_rows,
               "codes_dtype": self.codes_dtype.name}
        if self.train_info:
            cfg["train"] = dict(self.train_info)
        return cfg

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self._mean.numpy().copy(), "codebooks": self._codebooks.numpy().copy()}
        if self._projection is not None:
            out["projection"] = self._projection.numpy().copy()
        return out

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict[str, np.ndarray], device="cpu") -> "MultiCodebookQuantizer":
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            fmt = config.get("format") if isinstance(config, dict) else None
            raise QuantizerError(f"not a {FORMAT} quantizer config (format={fmt!r})")
        if config.get("version") != VERSION:
            raise QuantizerError(f"unsupported {FORMAT} version {config.get('version')!r} (this code reads {VERSION})")
        try:
            dim, M, K = int(config["dim"]), int(config["num_codebooks"]), int(config["codebook_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise QuantizerError(f"quantizer config lacks or has a bad dim/num_codebooks/codebook_size: {e}") from None
        proj_dim = config.get("proj_dim")
        need = ["mean", "codebooks"] + (["projection"] if proj_dim is not None else [])
        missing = [n for n in need if n not in arrays]
        if missing:
            raise QuantizerError(f"quantizer arrays lack {', '.join(missing)}")
        extra = sorted(set(arrays) - set(need))
        if extra:
            raise QuantizerError(f"quantizer arrays have unexpected entries: {', '.join(extra)}")
        for n in need:
            if np.asarray(arrays[n]).dtype != np.float32:
                raise QuantizerError(f"quantizer array {n!r} must be float32, got {np.asarray(arrays[n]).dtype}")
        return cls(dim, M, K, proj_dim=proj_dim, beam_size=int(config.get("beam_size", DEFAULT_OPTS["beam_size"])),
                   icm_sweeps=int(config.get("icm_sweeps", DEFAULT_OPTS["icm_sweeps"])),
                   block_rows=int(config.get("block_rows", DEFAULT_OPTS["block_rows"])),
                   mean=arrays["mean"], projection=arrays.get("projection"), codebooks=arrays["codebooks"],
                   train_info=config.get("train"), device=device)

    @property
    def quantizer_id(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode())
        for name, a in sorted(self.to_arrays().items()):
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            h.update(b"\0" + name.encode() + b"\0" + a.dtype.str.encode() + b"\0"
                     + json.dumps(list(a.shape)).encode() + b"\0")
            h.update(a.tobytes())
        return "mvq-" + h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"MultiCodebookQuantizer(dim={self.dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}, proj_dim={self.proj_dim}, id={self.quantizer_id})")

    # ---------------------------------------------------------------------------------------------- encode
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        z = x - self._mean_d
        return z if self._proj_d is None else z @ self._proj_d

    def encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        """[T, dim] float tensor -> [T, N] int64 codes on self.device (fixed zero-padded row blocks)."""
        x = T.as_frames(x, self.dim, "encode input").to(self.device)
        n, B = x.shape[0], self.block_rows
        out = torch.empty((n, self.num_codebooks), dtype=torch.int64, device=self.device)
        with torch.no_grad():
            for s in range(0, n, B):
                xb = x[s:s + B]
                if xb.shape[0] < B:
                    xb = torch.cat([xb, xb.new_zeros((B - xb.shape[0], self.dim))])
                codes = search_block(self._project(xb), self._tables, self.beam_size, self.icm_sweeps)
                out[s:s + B] = codes[: min(B, n - s)]
        return out

    def encode(self, frames, batch_size: int = 8192) -> np.ndarray:
        """[T, dim] (numpy or torch) -> [T, N] uint8 (uint16 if codebook_size > 256). Memory is bounded by
        batch_size rows at a time; the codes do not depend on batch_size (blocks are fixed at block_rows)."""
        if isinstance(frames, (list, tuple)):
            frames = np.asarray(frames, dtype=np.float32)
        if not isinstance(frames, (np.ndarray, torch.Tensor)):
            raise QuantizerError(f"encode input must be a numpy array or torch tensor, got {type(frames).__name__}")
        if frames.ndim != 2:
            raise QuantizerError(f"encode input: expected shape [frames, dim], got {tuple(frames.shape)}")
        if frames.shape[1] != self.dim:
            raise QuantizerError(f"encode input: wrong dim: frames have dim {frames.shape[1]}, "
                                 f"quantizer expects {self.dim}")
        n = frames.shape[0]
        out = np.empty((n, self.num_codebooks), dtype=self.codes_dtype)
        step = max(self.block_rows, (batch_size // self.block_rows) * self.block_rows)
        for s in range(0, n, step):
            chunk = T.as_frames(frames[s:s + step], self.dim, "encode input", row_offset=s)
            out[s:s + step] = self.encode_torch(chunk).cpu().numpy().astype(self.codes_dtype)
        return out

    # ---------------------------------------------------------------------------------------------- decode
    def _check_codes(self, codes) -> torch.Tensor:
        if isinstance(codes, np.ndarray):
            if codes.dtype.kind not in "iu":
                raise QuantizerError(f"codes must be an integer array, got dtype {codes.dtype}")
            c = torch.from_numpy(codes.astype(np.int64, copy=False))
        elif isinstance(codes, torch.Tensor):
            if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
                raise QuantizerError(f"codes must be an integer tensor, got dtype {codes.dtype}")
            c = codes.to(torch.int64)
        else:
            raise QuantizerError(f"codes must be a numpy array or torch tensor, got {type(codes).__name__}")
        if c.ndim != 2 or c.shape[1] != self.num_codebooks:
            raise QuantizerError(f"codes have shape {tuple(c.shape)}: wrong width, "
                                 f"expected [frames, {self.num_codebooks}]")
        check_code_range(c, self.codebook_size)
        return c

    def decode_torch(self, codes: torch.Tensor) -> torch.Tensor:
        """[T, N] integer tensor -> [T, dim] float32 on self.device."""
        c = self._check_codes(codes).to(self.device)
        n = c.shape[0]
        out = self._mean_d.expand(n, self.dim).clone()
        for m in range(self.num_codebooks):
            out += self._dec[m][c[:, m]]
        return out

    def decode(self, codes, batch_size: int = 65536) -> np.ndarray:
        """[T, N] integer codes (numpy or torch) -> [T, dim] float32 numpy."""
        c = self._check_codes(codes)
        out = np.empty((c.shape[0], self.dim), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, c.shape[0], batch_size):
                out[s:s + batch_size] = self.decode_torch(c[s:s + batch_size]).cpu().numpy()
        return out

    # ------------------------------------------------------------------------------------------------ train
    @classmethod
    def train(cls, data, *, dim: int | None = None, num_codebooks: int, codebook_size: int = 256, seed: int = 0,
              device="cpu", progress: bool = True, **algo_opts) -> "MultiCodebookQuantizer":
        """Train on data [N, dim] (np/torch) or an iterable of such batches. Same input + seed + device ->
        bitwise-identical codebooks. algo_opts: see DEFAULT_OPTS and DEFAULT_TRAIN_OPTS."""
        from tqdm.auto import tqdm

        unknown = sorted(set(algo_opts) - set(DEFAULT_OPTS) - set(DEFAULT_TRAIN_OPTS))
        if unknown:
            raise QuantizerError(f"unknown training option(s): {', '.join(unknown)}")
        opts = {**DEFAULT_OPTS, **DEFAULT_TRAIN_OPTS, **algo_opts}
        if not _is_pow2(codebook_size) or not 2 <= codebook_size <= 65536:
            raise QuantizerError(f"codebook_size must be a power of two in [2, 65536], got {codebook_size!r}")
        M, K = num_codebooks, codebook_size
        dev = torch.device(device)
        x = T.collect_frames(data, dim, int(opts["max_train_frames"]), seed)
        dim = x.shape[1]
        N = x.shape[0]
        gen = torch.Generator().manual_seed(seed)
        steps = 1 + M + int(opts["lsq_iters"])
        bar = tqdm(total=steps, desc=f"train MVQ d={dim} N={M} K={K}", disable=not progress, leave=False)

        mean, evals, evecs = T.fit_pca(x)
        pd = opts["proj_dim"]
        if pd == "auto":
            pd = T.auto_proj_dim(evals, bits=M * math.log2(K))
            pd = None if pd >= dim else pd
        elif pd is not None and not (isinstance(pd, int) and 1 <= pd <= dim):
            raise QuantizerError(f"proj_dim must be 'auto', None or an int in [1, {dim}], got {pd!r}")
        projection = None if pd is None else evecs[:, :pd].float().contiguous()
        xd = x.to(dev)
        z = xd - mean.float().to(dev)
        if projection is not None:
            z = z @ projection.to(dev)
        del xd
        total = float(((x.double() - mean) ** 2).sum())
        tail = 0.0 if projection is None else max(0.0, total - float((z.double() ** 2).sum()))
        bar.update(1)

        # residual k-means initialisation
        resid = z.clone()
        cbs, codes = [], []
        for m in range(M):
            c, a = T.kmeans(resid, K, int(opts["kmeans_iters"]), gen)
            resid -= c[a]
            cbs.append(c)
            codes.append(a)
            bar.update(1)
        codebooks = torch.stack(cbs)
        codes = torch.stack(codes, 1)
        history = [(T.sq_error(z, codes, codebooks) + tail) / total]
        del resid

        tb = opts["train_beam_size"] or opts["beam_size"]
        for _ in range(int(opts["lsq_iters"])):
            new_cb = T.lsq_codebooks(z, codes, K, float(opts["ridge"]), gen)
            new_codes = T.search_all(z, new_cb, int(tb), int(opts["icm_sweeps"]))
            codebooks, codes = new_cb, new_codes
            history.append((T.sq_error(z, codes, codebooks) + tail) / total)
            bar.update(1)
            bar.set_postfix(train_rel_err=f"{history[-1]:.4f}")
        bar.close()
        info = {"seed": seed, "train_frames": N, "kmeans_iters": int(opts["kmeans_iters"]),
                "lsq_iters": int(opts["lsq_iters"]), "train_beam_size": int(tb), "ridge": float(opts["ridge"]),
                "train_rel_err": [round(h, 6) for h in history]}
        return cls(dim, M, K, proj_dim=pd, beam_size=int(opts["beam_size"]), icm_sweeps=int(opts["icm_sweeps"]),
                   block_rows=int(opts["block_rows"]), mean=mean.float(), projection=projection,
                   codebooks=codebooks.cpu(), train_info=info, device=dev)

    # ---------------------------------------------------------------------------------------------- save/load
    def save(self, path, storage_options: dict | None = None) -> None:
        """Write a safetensors file (arrays + config JSON in its metadata). Local paths or fsspec URLs."""
        import fsspec
        from safetensors.numpy import save as st_save

        blob = st_save(self.to_arrays(), metadata={METADATA_KEY: json.dumps(self.config, sort_keys=True),
                                                  "quantizer_id": self.quantizer_id})
        with fsspec.open(str(path), "wb", **(storage_options or {})) as f:
            f.write(blob)

    @classmethod
    def load(cls, path, device="cpu", storage_options: dict | None = None) -> "MultiCodebookQuantizer":
        """Read a file written by save(); QuantizerError (a ValueError) naming the file if it is not a ci-store MVQ
        quantizer, QuantizerFileNotFoundError (also a FileNotFoundError) if it does not exist. No pickle."""
        import fsspec
        from safetensors.numpy import load as st_load

        try:
            with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
                blob = f.read()
        except FileNotFoundError:
            raise QuantizerFileNotFoundError(f"quantizer file not found: {path} (give the .safetensors written by "
                                             f"`ci-store train-quantizer`)") from None
        except IsADirectoryError:
            raise QuantizerError(f"{path}: is a directory, not a quantizer file (give the .safetensors written by "
                                 f"`ci-store train-quantizer`)") from None
        config = _safetensors_config(blob, str(path))
        try:
            arrays = st_load(blob)
        except Exception as e:  # safetensors raises its own error types
            raise QuantizerError(f"{path}: not a ci-store MVQ quantizer file (unreadable safetensors: {e})") from None
        try:
            q = cls.from_arrays(config, arrays, device=device)
        except ValueError as e:
            raise QuantizerError(f"{path}: {e}") from None
        return q


def _safetensors_config(blob: bytes, where: str) -> dict:
    """The MVQ config JSON from a safetensors header, or ValueError saying why this is not a quantizer file."""
    bad = f"{where}: not a ci-store MVQ quantizer file"
    if len(blob) < 8:
        raise QuantizerError(f"{bad} (only {len(blob)} bytes)")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen <= 0 or 8 + hlen > len(blob):
        raise QuantizerError(f"{bad} (no safetensors header)")
    try:
        header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise QuantizerError(f"{bad} (safetensors header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and meta.get("format") == TEACHER_FORMAT:
        raise QuantizerError(f"{bad}: it is a teacher checkpoint ({TEACHER_FORMAT}); pass it as --teacher and give "
                             f"the .safetensors written by `ci-store train-quantizer` as the quantizer")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise QuantizerError(f"{bad} (safetensors metadata has no {METADATA_KEY!r} entry)")
    try:
        config = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise QuantizerError(f"{bad} ({METADATA_KEY!r} is not JSON)") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise QuantizerError(f"{bad} (config format is {config.get('format') if isinstance(config, dict) else None!r})")
    return config


def load_frames(path: str, *, mmap: bool = True) -> np.ndarray:
    """Training frames [n, dim] (a numeric .npy file, as written by `ci-store sample-frames`), memory-mapped by
    default. Never unpickles: anything else raises QuantizerError naming the file and what to give instead."""
    path = str(path)
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise QuantizerFileNotFoundError(f"frames file not found: {path} ({FRAMES_HINT})") from None
    except IsADirectoryError:
        raise QuantizerError(f"{path}: is a directory, not a frames file ({FRAMES_HINT})") from None
    except (ValueError, OSError, EOFError) as e:
        try:
            with open(path, "rb") as f:
                is_npy = f.read(6) == b"\x93NUMPY"
        except OSError:
            is_npy = False
        if not is_npy:
            what = "not a .npy file"
        elif "object" in str(e).lower() or "pickle" in str(e).lower():
            what = "a .npy file of Python objects (pickled), which is never loaded"
        else:
            what = f"an unreadable .npy file ({e})"
        raise QuantizerError(f"{path}: {what}; {FRAMES_HINT}") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise QuantizerError(f"{path}: an .npz archive, not a .npy array; {FRAMES_HINT}")
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise QuantizerError(f"{path}: holds a {x.dtype} array of shape {x.shape}, expected float frames "
                             f"[frames, dim]; {FRAMES_HINT}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise QuantizerError(f"{path}: holds no frames (shape {x.shape}); {FRAMES_HINT}")
    return x


# --------------------------------------------------------------------------------------------------- metrics
def relative_reconstruction_error(x, x_hat) -> float:
    """sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 (float64). 1.0 = as bad as predicting the mean."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(x_hat.detach().cpu() if isinstance(x_hat, torch.Tensor) else x_hat, dtype=np.float64)
    if x.shape != y.shape:
        raise QuantizerError(f"shape mismatch: x {x.shape} vs x_hat {y.shape}")
    if x.size == 0:
        raise QuantizerError("relative_reconstruction_error of empty input")
    x2 = x.reshape(-1, x.shape[-1])
    den = float(((x2 - x2.mean(0)) ** 2).sum())
    num = float(((y.reshape(x2.shape) - x2) ** 2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def codebook_usage_entropy(codes, codebook_size: int) -> np.ndarray:
    """Per-codebook entropy (bits) of the code histogram; log2(codebook_size) = uniform use, 0 = collapsed."""
    c = np.asarray(codes.detach().cpu() if isinstance(codes, torch.Tensor) else codes)
    if c.ndim != 2:
        raise QuantizerError(f"codes must be [frames, num_codebooks], got shape {c.shape}")
    if c.shape[0] == 0:
        raise QuantizerError("codebook_usage_entropy of empty codes")
    c = c.astype(np.int64)
    if c.min() < 0 or c.max() >= codebook_size:
        raise QuantizerError(f"codes out of range [0, {codebook_size})")
    out = np.empty(c.shape[1], dtype=np.float64)
    for m in range(c.shape[1]):
        p = np.bincount(c[:, m], minlength=codebook_size).astype(np.float64) / c.shape[0]
        p = p[p > 0]
        out[m] = float(-(p * np.log2(p)).sum())
    return out
