"""HuggingFace HuBERT / wav2vec2 checkpoints as teachers (local directory or fsspec URL, never the Hub).

Base models normalise the first conv layer with GroupNorm over time, so zero padding changes every frame;
those are run per length group without padding. LayerNorm models ("large") are batched with an attention mask,
which HF makes exact (padded frames are zeroed before the positional conv and masked in attention).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import fsspec
import torch

from distill.teachers.base import Teacher, TeacherError, min_samples_for, sha256_of_files

__all__ = ["HFTeacher", "load_hf_teacher", "is_hf_weight_file", "HF_SUPPORTED_MODEL_TYPES"]

HF_SUPPORTED_MODEL_TYPES = ("hubert", "wav2vec2")
_IGNORABLE_MISSING = ("masked_spec_embed",)  # only used for training-time masking


def is_hf_weight_file(name: str) -> bool:
    return (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
            or (name.startswith("pytorch_model") and (name.endswith(".bin") or name.endswith(".bin.index.json"))))


def _hf_files(names: list[str]) -> list[str]:
    return [n for n in names if is_hf_weight_file(n) or n in ("config.json", "preprocessor_config.json")]


class HFTeacher(Teacher):
    """A transformers HubertModel/Wav2Vec2Model; layer 0 = input of the first transformer layer, i = output of
    transformer layer i (before any final encoder LayerNorm). Layers above `layer` are dropped at load."""

    format = "hf"

    def __init__(self, model, *, layer: int, normalize: bool, sample_rate: int, checkpoint_sha256: str,
                 source: str):
        cfg = model.config
        if getattr(cfg, "add_adapter", False):
            raise TeacherError(f"{source}: wav2vec2 checkpoints with an adapter are not supported")
        self.name = str(cfg.model_type)
        self.source, self.checkpoint_sha256 = source, checkpoint_sha256
        self.num_layers = int(cfg.num_hidden_layers)
        self.layer = self._check_layer(layer)
        self.dim = int(cfg.hidden_size)
        self.sample_rate = int(sample_rate)
        self.normalize = bool(normalize)
        self.group_norm = cfg.feat_extract_norm == "group"
        self._kernels, self._strides = [int(k) for k in cfg.conv_kernel], [int(s) for s in cfg.conv_stride]
        hop = 1
        for s in self._strides:
            hop *= s
        self.frame_rate = self.sample_rate / hop
        model.encoder.layers = model.encoder.layers[:max(self.layer, 1)]  # never computed otherwise
        self.model = self.module = model.eval()
        self._tls = threading.local()
        self._install_capture()
        self.min_samples = min_samples_for(self.num_frames)

    def metadata(self) -> dict:
        return {**super().metadata(), "normalize": self.normalize,
                "feat_extract_norm": self.model.config.feat_extract_norm}

    def num_frames(self, num_samples: int) -> int:
        """Same recurrence as HF `_get_feat_extract_output_lengths` (unpadded convs), floored at 0."""
        n = int(num_samples)
        for k, s in zip(self._kernels, self._strides):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    def _install_capture(self) -> None:
        """Hook the chosen layer once; results go to thread-local storage so concurrent embeds (threaded Dask
        workers sharing one teacher) cannot see each other's activations."""
        layers = self.model.encoder.layers
        if self.layer == 0:
            def pre(mod, args, kwargs):
                self._tls.h = args[0] if args else kwargs["hidden_states"]
            layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(mod, args, out):
                self._tls.h = out[0] if isinstance(out, (tuple, list)) else out
            layers[self.layer - 1].register_forward_hook(post)

    def _run(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self._tls.h = None
        self.model(x, attention_mask=attention_mask)
        h, self._tls.h = self._tls.h, None
        if h is None:
            raise RuntimeError(f"teacher {self.name!r}: layer {self.layer} was not reached")
        return h

    def _embed(self, waveforms: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = waveforms
        if self.normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm on the unpadded samples
            rows = []
            for b, n in enumerate(lengths):
                v = x[b, :n]
                v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-7)
                rows.append(torch.nn.functional.pad(v, (0, x.shape[1] - n)))
            x = torch.stack(rows)
        nfr = [self.num_frames(n) for n in lengths]
        out = waveforms.new_zeros(len(lengths), max(nfr), self.dim)
        x = x.to(self.model.dtype)  # the weights' dtype (set_dtype); float32 checkpoints: a no-op
        if self.group_norm:
            groups: dict[int, list[int]] = {}
            for b, n in enumerate(lengths):
                groups.setdefault(n, []).append(b)
            for n, idx in groups.items():
                h = self._run(x[idx, :n], None)
                out[idx, :h.shape[1]] = h[:, :out.shape[1]].to(out.dtype)
        else:
            mask = (torch.arange(x.shape[1], device=x.device)[None, :]
                    < torch.tensor(lengths, device=x.device)[:, None]).long()
            h = self._run(x, mask)
            t = min(h.shape[1], out.shape[1])
            out[:, :t] = h[:, :t].to(out.dtype)
        return out


def _load_local(local_dir: str, *, layer: int, source: str) -> HFTeacher:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    names = sorted(os.listdir(local_dir))
    with open(os.path.join(local_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    classes = {"hubert": transformers.HubertModel, "wav2vec2": transformers.Wav2Vec2Model}
    if model_type not in classes:
        raise TeacherError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(HF_SUPPORTED_MODEL_TYPES)})")
    weights = [n for n in names if is_hf_weight_file(n)]
    safetensors = [n for n in weights if ".safetensors" in n]
    if not weights:
        raise TeacherError(f"{source}: no weight files (model.safetensors or pytorch_model.bin) in the directory")
    pre = {}
    if "preprocessor_config.json" in names:
        with open(os.path.join(local_dir, "preprocessor_config.json"), encoding="utf-8") as f:
            pre = json.load(f)
    hashed = (safetensors or weights) + ["config.json"] + (["preprocessor_config.json"] if pre else [])
    sha = sha256_of_files(os.path.join(local_dir, n) for n in hashed)
    model, info = classes[model_type].from_pretrained(
        local_dir, local_files_only=True, use_safetensors=bool(safetensors), weights_only=True,
        output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not any(s in k for s in _IGNORABLE_MISSING)]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise TeacherError(f"{source}: checkpoint does not match its config; missing weights {sorted(missing)[:10]}"
                         f"{', mismatched ' + str(list(mismatched)[:10]) if mismatched else ''}")
    return HFTeacher(model, layer=layer, normalize=bool(pre.get("do_normalize", False)),
                     sample_rate=int(pre.get("sampling_rate", 16000)), checkpoint_sha256=sha, source=source)


def load_hf_teacher(path_or_url: str, *, layer: int, storage_options: dict | None = None) -> HFTeacher:
    """Load an HF-format directory (config.json + weights [+ preprocessor_config.json]); remote directories are
    copied to a temporary local directory first, which is removed once the weights are in memory."""
    fs, root = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return _load_local(root, layer=layer, source=path_or_url)
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    wanted = _hf_files(names)
    tmp = tempfile.mkdtemp(prefix="ci-store-teacher-")
    try:
        for n in wanted:
            fs.get(f"{root.rstrip('/')}/{n}", os.path.join(tmp, n))
        return _load_local(tmp, layer=layer, source=path_or_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
