"""Decoding codes made by the reference `multi_quantization` package (icefall's MVQ recipe), without that package.

icefall saves its quantizer as `torch.save(quantizer.state_dict())`: `to_logits.weight`, `to_logits.bias`,
`centers` [num_codebooks, codebook_size, dim], `logits_scale`, `centers_scale` (scalars) and `id_buf` (the
8 hex digits of its id as uint8). Its decode is `sum_c exp(scale_speed * centers_scale) * centers[c, idx_c]`
with `scale_speed = 10.0` (multi_quantization 0.1.1, `Quantizer.get_centers`). Only decoding is needed to use
imported CIs, so `ReferenceQuantizer` keeps the whole state dict (so it can be handed back to the package) but
implements decode only.

A ci-store keeps either kind of quantizer in its `quantizer/` group (arrays + a JSON config whose `format`
names the kind); `decoder_from_state` turns `CIStore.quantizer_state()` into the matching decoder, so codes
decode from the store alone whichever quantizer made them.

    q = ReferenceQuantizer.load("quantizer.pt")                 # torch.load(weights_only=True), no pickle code
    dec = decoder_from_state(store.quantizer_state())           # ours or the reference one
    frames = dec.decode(store[utt_id])
"""
from __future__ import annotations

import io
import pickle
import re

import numpy as np
import torch

from .quantizer import MultiCodebookQuantizer, QuantizerError, check_code_range

FORMAT = "multi-quantization"
VERSION = 1
SCALE_SPEED = 10.0        # multi_quantization.Quantizer.scale_speed (fixed in the package, not in the state dict)
STATE_KEYS = ("to_logits.weight", "to_logits.bias", "centers", "logits_scale", "centers_scale", "id_buf")


class ReferenceQuantizer:
    """The decoding half of `multi_quantization.Quantizer`, built from its state dict (numpy arrays)."""

    def __init__(self, state: dict[str, np.ndarray], where: str = "quantizer"):
        state = _check_state(state, where)
        self.state = state
        C, K, D = state["centers"].shape
        self.num_codebooks, self.codebook_size, self.dim = int(C), int(K), int(D)
        self.id_str = bytes(state["id_buf"].tolist()).decode("ascii")
        # the same float32 ops as Quantizer.get_centers(), so decode matches the package bit for bit
        with torch.no_grad():
            scale = (torch.from_numpy(state["centers_scale"]) * SCALE_SPEED).exp()
            self._centers = scale * torch.from_numpy(state["centers"])

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path, storage_options: dict | None = None) -> "ReferenceQuantizer":
        """Read a `torch.save`d state dict with `weights_only=True`: a file holding anything but tensors is refused."""
        import fsspec

        try:
            with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
                blob = f.read()
        except FileNotFoundError:
            raise QuantizerError(f"{path}: quantizer file not found") from None
        try:
            sd = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            why = f"it holds a pickled {m.group(1)} object" if m else "it holds pickled objects"
            raise QuantizerError(f"{path}: refused to load: {why}, not just tensors "
                                 f"(torch.load(weights_only=True) never runs pickled code)") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise QuantizerError(f"{path}: not a torch.save file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict):
            raise QuantizerError(f"{path}: expected a multi_quantization state dict, got {type(sd).__name__}")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise QuantizerError(f"{path}: state dict entries {', '.join(map(repr, bad))} are not tensors")
        return cls({k: v.detach().cpu().numpy() for k, v in sd.items()}, where=str(path))

    @property
    def config(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dim": self.dim, "num_codebooks": self.num_codebooks,
                "codebook_size": self.codebook_size, "scale_speed": SCALE_SPEED, "reference_id": self.id_str}

    @property
    def quantizer_id(self) -> str:
        """The package's own 8-hex-digit id (what icefall names its quantizer files by), prefixed by the kind."""
        return f"multi-quantization-{self.id_str}"

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: self.state[k].copy() for k in STATE_KEYS}

    def to_store_quantizer(self) -> dict:
        """The `quantizer=` argument of ci_store.create()."""
        return {"id": self.quantizer_id, "config": self.config, "arrays": self.to_arrays()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for `multi_quantization.Quantizer.load_state_dict` (to hand the quantizer back to icefall)."""
        return {k: torch.from_numpy(self.state[k].copy()) for k in STATE_KEYS}

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict[str, np.ndarray]) -> "ReferenceQuantizer":
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise QuantizerError(f"not a {FORMAT} quantizer config (format={_fmt(config)!r})")
        if config.get("version") != VERSION:
            raise QuantizerError(f"unsupported {FORMAT} version {config.get('version')!r} (this code reads {VERSION})")
        if config.get("scale_speed", SCALE_SPEED) != SCALE_SPEED:
            raise QuantizerError(f"{FORMAT} quantizer with scale_speed {config.get('scale_speed')!r}; "
                                 f"only {SCALE_SPEED} (multi_quantization 0.1.1) is supported")
        q = cls(dict(arrays), where="store quantizer")
        for k in ("dim", "num_codebooks", "codebook_size"):
            if k in config and config[k] != getattr(q, k):
                raise QuantizerError(f"store quantizer: config says {k}={config[k]!r}, arrays give {getattr(q, k)}")
        return q

    def __repr__(self) -> str:
        return (f"ReferenceQuantizer(dim={self.dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}, id={self.id_str})")

    # ------------------------------------------------------------------------------------------------ decode
    def decode_torch(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., num_codebooks] integer tensor -> [..., dim] float32 (the package's gather-and-sum)."""
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise QuantizerError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.ndim < 1 or codes.shape[-1] != self.num_codebooks:
            raise QuantizerError(f"codes have shape {tuple(codes.shape)}: expected [..., {self.num_codebooks}]")
        shape = codes.shape
        idx = codes.reshape(-1, self.num_codebooks).to(torch.int64)
        check_code_range(idx, self.codebook_size)
        B = idx.shape[0]
        gathered = torch.gather(self._centers, 1,
                                idx.t().contiguous().unsqueeze(-1).expand(self.num_codebooks, B, self.dim))
        return gathered.sum(dim=0).reshape(*shape[:-1], self.dim)

    def decode(self, codes) -> np.ndarray:
        """[T, num_codebooks] integer codes (numpy or torch) -> [T, dim] float32 numpy."""
        if isinstance(codes, np.ndarray):
            if codes.dtype.kind not in "iu":
                raise QuantizerError(f"codes must be an integer array, got dtype {codes.dtype}")
            codes = torch.from_numpy(codes.astype(np.int64, copy=False))
        elif not isinstance(codes, torch.Tensor):
            raise QuantizerError(f"codes must be a numpy array or torch tensor, got {type(codes).__name__}")
        with torch.no_grad():
            return self.decode_torch(codes).cpu().numpy()


def _fmt(config) -> object:
    return config.get("format") if isinstance(config, dict) else None


def _check_state(state: dict, where: str) -> dict[str, np.ndarray]:
    """Names, shapes and dtypes of a multi_quantization state dict, or QuantizerError naming what is wrong."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise QuantizerError(f"{where}: not a multi_quantization Quantizer state dict: lacks "
                             f"{', '.join(missing)} (has {', '.join(sorted(map(str, state))) or 'nothing'})")
    extra = sorted(set(state) - set(STATE_KEYS))
    if extra:
        raise QuantizerError(f"{where}: unexpected entries in a multi_quantization state dict: {', '.join(extra)}")
    out = {k: np.asarray(state[k]) for k in STATE_KEYS}
    for k in ("to_logits.weight", "to_logits.bias", "centers", "logits_scale", "centers_scale"):
        if out[k].dtype != np.float32:
            raise QuantizerError(f"{where}: {k} must be float32, got {out[k].dtype}")
    c = out["centers"]
    if c.ndim != 3 or 0 in c.shape:
        raise QuantizerError(f"{where}: centers must be [num_codebooks, codebook_size, dim], got {list(c.shape)}")
    C, K, D = c.shape
    for k, shape in (("to_logits.weight", (C * K, D)), ("to_logits.bias", (C * K,)), ("logits_scale", ()),
                     ("centers_scale", ())):
        if out[k].shape != shape:
            raise QuantizerError(f"{where}: {k} has shape {list(out[k].shape)}, expected {list(shape)} "
                                 f"(centers are {list(c.shape)})")
    idb = out["id_buf"]
    if idb.dtype != np.uint8 or idb.ndim != 1:
        raise QuantizerError(f"{where}: id_buf must be a 1-d uint8 tensor, got {idb.dtype} {list(idb.shape)}")
    try:
        bytes(idb.tolist()).decode("ascii")
    except UnicodeDecodeError:
        raise QuantizerError(f"{where}: id_buf is not an ASCII id") from None
    if not np.isfinite(c).all() or not np.isfinite(out["centers_scale"]).all():
        raise QuantizerError(f"{where}: centers or centers_scale hold NaN/inf")
    return out


def decoder_from_state(state: tuple[dict, dict[str, np.ndarray]] | None, where: str = "store"):
    """The decoder for a store's `quantizer_state()`: ours (ci-store-mvq) or the reference (multi-quantization)."""
    from .quantizer import FORMAT as MVQ_FORMAT

    if state is None:
        raise QuantizerError(f"{where} holds no quantizer; its codes cannot be decoded from the store alone")
    config, arrays = state
    kind = _fmt(config)
    try:
        if kind == MVQ_FORMAT:
            return MultiCodebookQuantizer.from_arrays(config, arrays)
        if kind == FORMAT:
            return ReferenceQuantizer.from_arrays(config, arrays)
    except QuantizerError as e:
        raise QuantizerError(f"{where}: {e}") from None
    except ValueError as e:
        raise QuantizerError(f"{where}: quantizer: {e}") from None
    raise QuantizerError(f"{where}: unknown quantizer format {kind!r} (known: {MVQ_FORMAT!r}, {FORMAT!r})")


def decoder_from_store(store):
    """Shorthand: the decoder kept inside a CIStore."""
    return decoder_from_state(store.quantizer_state(), where=store.url)


def store_quantizer(q) -> dict:
    """The `quantizer=` argument of ci_store.create() for either kind of quantizer."""
    if isinstance(q, ReferenceQuantizer):
        return q.to_store_quantizer()
    if isinstance(q, MultiCodebookQuantizer):
        return {"id": q.quantizer_id, "config": q.config, "arrays": q.to_arrays()}
    raise QuantizerError(f"not a quantizer: {type(q).__name__}")


def load_quantizer_file(path, storage_options: dict | None = None):
    """Our safetensors quantizer or a reference `torch.save`d state dict, told apart by the file's first bytes."""
    import fsspec

    try:
        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            head = f.read(4)
    except FileNotFoundError:
        raise QuantizerError(f"{path}: quantizer file not found") from None
    if head[:2] == b"PK" or head[:1] == b"\x80":      # torch.save: a zip archive, or a bare (legacy) pickle
        return ReferenceQuantizer.load(path, storage_options)
    try:
        return MultiCodebookQuantizer.load(path, storage_options=storage_options)
    except QuantizerError:
        raise
    except ValueError as e:
        raise QuantizerError(str(e)) from None
