"""Train our own (larger) teacher: NativeTeacherModel with a character CTC head on the big train split.

Why: the paper distils from a big model trained on far more data than the student sees. Offline we cannot
download HuBERT, so we mirror the setup: the teacher learns CTC on all of `cuts_train`, the student later sees
only `cuts_train_small`, and the extraction job reads a middle/upper layer of this encoder
(`suggested_layer`, 3/4 of the depth like HuBERT-large layer 18 of 24).

Outputs, next to each other: `<out>` (the native safetensors checkpoint, CTC head included, loadable by
`distill.teachers.load_teacher`), `<out>.tokenizer.json` (the CharTokenizer, so the CTC head can be decoded and
the teacher scored later), `<out>.train.json` (config, per-epoch dev CER/WER, data sizes) and a JSONL log of
losses. Everything is a function of the seed (same seed, threads and data -> identical weights).
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from ci_store.fsio import write_file
from distill import devices
from distill.config import JSONConfig
from distill.data.audio import probe_missing, read_audio
from distill.data.manifest import Utterance, load_manifest
from distill.data.sampler import bucket_batches
from distill.schedule import warmup_cosine_lr
from distill.teachers.native import (NativeTeacherConfig, NativeTeacherModel, load_native_model, num_mel_frames,
                                    save_native_teacher)
from distill.data.tokenizer import CharTokenizer, normalize_text

__all__ = ["TeacherTrainConfig", "TeacherTrainResult", "train_teacher", "evaluate_ctc", "greedy_ctc_decode",
           "load_trained_teacher", "tokenizer_path", "suggested_layer", "TeacherDataError"]


class TeacherDataError(ValueError):
    """The training/dev data cannot be used (empty, no text, no usable characters); names the utterances."""


@dataclass
class TeacherTrainConfig(JSONConfig):
    """Model size and optimisation. Defaults: ~5 M parameters, measured ~25-40 s of audio per wall second of
    training with 2 CPU threads (less on a loaded machine), i.e. 1.5-2.5 min per epoch of 1 h of audio."""

    d_model: int = 256
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int | None = None  # default 4 * d_model
    dropout: float = 0.0  # SpecAugment regularises; dropout costs ~30% of a CPU training step
    epochs: int = 5
    max_steps: int | None = None  # stop early after this many updates (for quick runs)
    max_seconds_per_batch: float = 40.0  # padded audio seconds per batch
    num_buckets: int = 10  # duration buckets: batches hold utterances of similar length (little padding)
    lr: float = 2e-3  # peak learning rate (Adam)
    warmup_steps: int | None = None  # default: 10% of all steps, at most 1000
    min_lr_ratio: float = 0.05  # cosine decay from lr to lr * min_lr_ratio over all steps
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    spec_augment: bool = True
    freq_masks: int = 2
    freq_mask_width: int = 10  # mel bins (of 80)
    time_masks_per_second: float = 0.4
    time_mask_width: int = 15  # log-mel frames (10 ms each)
    max_utterance_seconds: float | None = 30.0  # longer training utterances are skipped (memory)
    seed: int = 0
    num_threads: int = 2
    num_workers: int = 2  # audio reading threads (cache) or DataLoader processes (no cache)
    cache_audio: bool = True  # decode all audio once into memory (int16 when lossless): fast epochs
    dev_max_utterances: int | None = None  # score only the first N dev utterances (id order)
    sample_rate: int = 16000
    num_mels: int = 80
    device: str = "cpu"  # cpu, cuda or cuda:N
    dtype: str = "float32"  # autocast dtype of the forward: float32 | bfloat16 | float16 (loss-scaled)
    accum_grad: int = 1  # batches per optimizer update; max_steps, warmup and the lr schedule count updates

    def __post_init__(self):
        checks = [(self.epochs >= 1, "epochs must be >= 1"),
                  (self.max_seconds_per_batch > 0, "max_seconds_per_batch must be > 0"),
                  (self.lr > 0, "lr must be > 0"), (self.num_buckets >= 1, "num_buckets must be >= 1"),
                  (self.grad_clip > 0, "grad_clip must be > 0"), (self.num_threads >= 1, "num_threads must be >= 1"),
                  (self.num_workers >= 0, "num_workers must be >= 0"),
                  (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
                  (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
                  (isinstance(self.accum_grad, int) and self.accum_grad >= 1, "accum_grad must be an integer >= 1"),
                  (self.dtype in devices.DTYPES, f"dtype must be one of {', '.join(devices.DTYPES)}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TeacherTrainConfig: {msg}")
        try:
            devices.parse_device(self.device)
        except devices.DeviceError as e:
            raise ValueError(f"TeacherTrainConfig: {e}") from None

    def model_config(self, vocab_size: int) -> NativeTeacherConfig:
        return NativeTeacherConfig(sample_rate=self.sample_rate, num_mels=self.num_mels, d_model=self.d_model,
                                   num_heads=self.num_heads, ffn_dim=self.ffn_dim or 4 * self.d_model,
                                   num_layers=self.num_layers, dropout=self.dropout, vocab_size=vocab_size)


@dataclass
class TeacherTrainResult:
    model: NativeTeacherModel
    tokenizer: CharTokenizer
    checkpoint: str
    checkpoint_sha256: str
    tokenizer_path: str
    summary_path: str
    log_path: str | None
    history: list = field(default_factory=list)  # one dict per epoch (train loss, dev loss/CER/WER, timings)
    skipped: dict = field(default_factory=dict)  # utterance id -> why it was left out of training
    steps: int = 0
    train_seconds: float = 0.0  # audio seconds per epoch
    wall_seconds: float = 0.0
    suggested_layer: int = 0


def tokenizer_path(checkpoint: str) -> str:
    """Where the teacher's tokenizer lives: beside the checkpoint."""
    return f"{checkpoint}.tokenizer.json"


def suggested_layer(num_layers: int) -> int:
    """The layer to distil from: 3/4 of the depth, rounded up (HuBERT-large: 18 of 24; 6 layers: 5)."""
    return max(1, math.ceil(0.75 * int(num_layers)))


def load_trained_teacher(path: str, *, storage_options: dict | None = None) -> tuple[NativeTeacherModel, CharTokenizer]:
    """(model in eval mode, tokenizer) of a teacher written by `train_teacher`, e.g. to score it on a test set."""
    model, _ = load_native_model(path, storage_options=storage_options)
    tp = tokenizer_path(path)
    try:
        with fsspec.open(tp, "rt", encoding="utf-8", **(storage_options or {})) as f:
            tok = CharTokenizer.from_json(json.load(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"teacher tokenizer not found: {tp} (written by train-teacher beside the "
                                f"checkpoint)") from None
    if model.ctc_head is None or model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"{path}: CTC head size {model.config.vocab_size} does not match tokenizer {tp} "
                         f"({tok.vocab_size} symbols)")
    return model.eval(), tok


# ------------------------------------------------------------------------------------------------ data

class _Item:
    __slots__ = ("utt", "tokens", "num_samples", "text")

    def __init__(self, utt: Utterance, tokens: list[int], num_samples: int, text: str):
        self.utt, self.tokens, self.num_samples, self.text = utt, tokens, num_samples, text


def _as_utts(manifest, what: str) -> list[Utterance]:
    if isinstance(manifest, str):
        utts = load_manifest(manifest)  # ManifestError names the file for empty/malformed manifests
    else:
        utts = list(manifest)
    if not utts:
        raise TeacherDataError(f"{what}: no utterances")
    # lengths from the file headers where the manifest gives none (an unreadable file: AudioError naming it)
    need = [i for i, u in enumerate(utts) if u.sample_rate is None or (u.num_samples is None and u.duration is None)]
    for i, u in zip(need, probe_missing([utts[i] for i in need])):
        utts[i] = u
    return utts


def _ids(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(i) for i in ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _items(utts: list[Utterance], tok: CharTokenizer, cfg: TeacherTrainConfig, frames_of, what: str,
           train: bool) -> tuple[list[_Item], dict[str, str]]:
    """Utterances with token ids; raises for missing/unusable text, skips (train only) what CTC cannot learn."""
    no_text = [u.id for u in utts if not (u.text or "").strip()]
    if no_text:
        raise TeacherDataError(f"{what}: utterances without a transcript: {_ids(no_text)}")
    empty = [u.id for u in utts if not normalize_text(u.text)]
    if empty:
        raise TeacherDataError(f"{what}: transcripts with no usable characters (letters, digits, apostrophes) "
                               f"in utterances {_ids(empty)}")
    items, skipped = [], {}
    for u in utts:
        n = u.num_samples_at(cfg.sample_rate)
        tokens = tok.encode(u.text)
        frames = frames_of(n)
        need = len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:]))  # CTC needs a blank between repeats
        if train and cfg.max_utterance_seconds and n > cfg.max_utterance_seconds * cfg.sample_rate:
            skipped[u.id] = f"longer than max_utterance_seconds={cfg.max_utterance_seconds}"
        elif frames < max(1, need if train else 1):
            if not train:
                raise TeacherDataError(f"{what}: utterance {u.id!r} is too short for the teacher "
                                       f"({n} samples -> {frames} frames)")
            skipped[u.id] = f"{frames} frames cannot carry {len(tokens)} tokens ({need} with repeats)"
        else:
            items.append(_Item(u, tokens, n, normalize_text(u.text)))
    if not items:
        raise TeacherDataError(f"{what}: all {len(utts)} utterances were skipped, e.g. "
                               f"{next(iter(skipped.items()))}")
    return items, skipped


class _Audio:
    """Waveforms by item index: decoded once into memory (cache) or read on demand."""

    def __init__(self, items: list[_Item], rate: int, cache: bool, workers: int, progress: bool, what: str):
        self.items, self.rate, self.cache = items, rate, None
        if cache:
            from tqdm.auto import tqdm

            with ThreadPoolExecutor(max(1, workers)) as pool:  # libsndfile decodes without the GIL
                arrays = list(tqdm(pool.map(self._read_packed, range(len(items))), total=len(items),
                                   desc=f"loading {what} audio", disable=not progress, leave=False))
            self.cache = arrays

    def _read_packed(self, i: int) -> np.ndarray:
        x = read_audio(self.items[i].utt, self.rate)
        q = np.round(x * 32768.0)
        if np.abs(q).max(initial=0) < 32768 and np.array_equal(q / 32768.0, x):
            return q.astype(np.int16)  # 16-bit sources: exact and half the memory
        return x

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.cache is None:
            return read_audio(self.items[i].utt, self.rate)
        a = self.cache[i]
        return a.astype(np.float32) / 32768.0 if a.dtype == np.int16 else a


def _collate(audio: _Audio, items: list[_Item], idx: list[int]):
    waves = [audio[i] for i in idx]
    lens = torch.tensor([len(w) for w in waves], dtype=torch.long)
    x = torch.zeros(len(waves), int(lens.max()))
    for j, w in enumerate(waves):
        x[j, :len(w)] = torch.from_numpy(w)
    toks = [items[i].tokens for i in idx]
    return x, lens, torch.tensor([t for ts in toks for t in ts], dtype=torch.long), \
        torch.tensor([len(t) for t in toks], dtype=torch.long), idx


class _BatchDataset(torch.utils.data.Dataset):
    """One element = one whole batch, so DataLoader workers read and pad batches in parallel (no cache)."""

    def __init__(self, audio: _Audio, items: list[_Item], batches: list[list[int]]):
        self.audio, self.items, self.batches = audio, items, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k: int):
        return _collate(self.audio, self.items, self.batches[k])


def _iterate(audio: _Audio, items: list[_Item], batches: list[list[int]], workers: int):
    if audio.cache is not None or workers == 0:
        for b in batches:
            yield _collate(audio, items, b)
        return
    loader = torch.utils.data.DataLoader(_BatchDataset(audio, items, batches), batch_size=None, shuffle=False,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    yield from loader


# ------------------------------------------------------------------------------------------------ model bits

class _SpecAugment:
    """Time/frequency masks on the normalised log-mel (output of `input_norm`), training mode only.

    Masks are drawn per batch (from the trainer's seeded generator) before the forward pass and applied by a
    forward hook, so teacher_native.py stays untouched and the saved model has no trace of them."""

    def __init__(self, model: NativeTeacherModel, cfg: TeacherTrainConfig, rng: np.random.Generator):
        self.cfg, self.rng, self.mask = cfg, rng, None
        self.handle = model.input_norm.register_forward_hook(self._hook)

    def draw(self, lengths: torch.Tensor) -> None:
        c = self.cfg
        frames = [num_mel_frames(int(n), c.sample_rate) for n in lengths]
        mask = np.ones((len(frames), max(frames), c.num_mels), dtype=np.float32)
        for b, t in enumerate(frames):
            for _ in range(c.freq_masks):
                w = int(self.rng.integers(0, c.freq_mask_width + 1))
                f0 = int(self.rng.integers(0, c.num_mels - w + 1))
                mask[b, :, f0:f0 + w] = 0
            for _ in range(int(round(c.time_masks_per_second * t / 100.0))):
                w = int(self.rng.integers(0, min(c.time_mask_width, t // 5) + 1))
                t0 = int(self.rng.integers(0, t - w + 1))
                mask[b, t0:t0 + w, :] = 0
        self.mask = torch.from_numpy(mask)

    def _hook(self, module, args, output):
        if not module.training or self.mask is None:
            return None
        m, self.mask = self.mask.to(device=output.device, dtype=output.dtype), None
        t = output.shape[1]
        if m.shape[1] < t:  # features a frame or two longer than the sample count implies: leave those unmasked
            m = torch.cat([m, m.new_ones((m.shape[0], t - m.shape[1], m.shape[2]))], 1)
        return output * m[:, :t, :]

    def remove(self) -> None:
        self.handle.remove()


def _ctc_loss(model: NativeTeacherModel, x, lens, targets, target_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CTC loss over the batch, logits)."""
    out = model(x, lens)
    logp = out.logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, V]
    loss = F.ctc_loss(logp, targets, out.frame_lengths, target_lens, blank=0, reduction="sum", zero_infinity=True)
    return loss, out


def greedy_ctc_decode(logits: torch.Tensor, lengths: torch.Tensor, tokenizer) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks (and <unk>), join characters into text."""
    best = logits.argmax(-1).cpu().numpy()
    texts = []
    for b, n in enumerate(torch.as_tensor(lengths).tolist()):
        path = best[b, :int(n)]
        keep = path[np.r_[True, path[1:] != path[:-1]]] if len(path) else path
        texts.append(tokenizer.decode([int(t) for t in keep if t != tokenizer.blank_id]))
    return texts


@torch.no_grad()
def evaluate_ctc(model: NativeTeacherModel, tokenizer, utts, *, max_seconds_per_batch: float = 60.0,
                 num_workers: int = 0, cache: _Audio | None = None, progress: bool = False,
                 dtype: str = "float32") -> dict:
    """Greedy-CTC scores of `model` on utterances (a manifest path or list): loss per token, CER and WER (jiwer,
    on normalised text) and a few (ref, hyp) examples, computed on the model's device with the forward in
    `dtype`. Restores the model's training mode afterwards."""
    import jiwer

    cfg = TeacherTrainConfig(sample_rate=model.config.sample_rate, num_mels=model.config.num_mels)
    if cache is None:
        items, _ = _items(_as_utts(utts, "dev"), tokenizer, cfg, model.num_frames, "dev", train=False)
        cache = _Audio(items, cfg.sample_rate, False, num_workers, progress, "dev")
    items = cache.items
    batches = bucket_batches([it.num_samples for it in items], int(max_seconds_per_batch * cfg.sample_rate), None,
                             num_buckets=10)
    was_training = model.training
    model.eval()
    hyps: dict[int, str] = {}
    loss_sum, tokens = 0.0, 0
    try:
        dev = next(model.parameters()).device
        for x, lens, tg, tl, idx in _iterate(cache, items, batches, num_workers):
            with devices.autocast(dtype, dev):
                loss, out = _ctc_loss(model, *(t.to(dev) for t in (x, lens, tg, tl)))
            loss_sum += float(loss.detach())
            tokens += int(tl.sum())
            for i, h in zip(idx, greedy_ctc_decode(out.logits, out.frame_lengths, tokenizer)):
                hyps[i] = h
    finally:
        model.train(was_training)
    refs = [it.text for it in items]
    hyp = [hyps[i] for i in range(len(items))]
    # jiwer rejects empty hypotheses in some versions; a lone space scores as "all deleted"
    safe = [h if h else " " for h in hyp]
    return {"loss": loss_sum / max(tokens, 1), "cer": float(jiwer.cer(refs, safe)),
            "wer": float(jiwer.wer(refs, safe)), "utterances": len(items),
            "examples": [(refs[i], hyp[i]) for i in range(min(3, len(items)))]}


# ------------------------------------------------------------------------------------------------ training

def train_teacher(train, out: str, config: TeacherTrainConfig | None = None, *, dev=None,
                  log_path: str | None = "auto", progress: bool = True, storage_options: dict | None = None,
                  echo: Callable[[str], None] | None = None) -> TeacherTrainResult:
    """Train a CTC teacher on `train` (manifest path or Utterance list) and write it to `out`.

    Writes `out` after every epoch (so an interrupted run leaves the last finished epoch), the tokenizer beside
    it, `<out>.train.json` at the end, and the JSONL log (`log_path="auto"`: `<out>.log.jsonl` for local
    outputs; None: no log). `dev` (optional) is scored per epoch with greedy CTC (CER/WER), printed via `echo`.
    Raises TeacherDataError/ManifestError naming the file or utterances for unusable data.
    """
    cfg = config or TeacherTrainConfig()
    try:
        devices.check_device(cfg.device)
        devices.check_dtype(cfg.dtype, cfg.device)
    except devices.DeviceError as e:
        raise TeacherDataError(str(e)) from None
    target = devices.torch_device(cfg.device)
    t_start = time.time()
    torch.set_num_threads(cfg.num_threads)
    say = echo or _default_echo
    train_utts = _as_utts(train, "train")
    with_text = [u.text for u in train_utts if u.text and normalize_text(u.text)]
    try:
        tok = CharTokenizer.build(with_text)
    except ValueError:
        raise TeacherDataError(f"train: no transcript has usable characters (letters, digits, apostrophes); "
                               f"e.g. utterance {train_utts[0].id!r} text {train_utts[0].text!r}") from None

    torch.manual_seed(cfg.seed)
    model = NativeTeacherModel(cfg.model_config(tok.vocab_size))
    items, skipped = _items(train_utts, tok, cfg, model.num_frames, "train", train=True)
    dev_items = None
    if dev is not None:
        dev_utts = _as_utts(dev, "dev")
        if cfg.dev_max_utterances:
            dev_utts = sorted(dev_utts, key=lambda u: u.id)[:cfg.dev_max_utterances]
        dev_items, _ = _items(dev_utts, tok, cfg, model.num_frames, "dev", train=False)

    fs, local_out = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(local_out)) or ".", exist_ok=True)
    if log_path == "auto":
        log_path = f"{out}.log.jsonl" if isinstance(fs, LocalFileSystem) else None
    log = open(log_path, "w", encoding="utf-8") if log_path else None

    def record(obj: dict) -> None:
        if log:
            log.write(json.dumps(obj) + "\n")
            log.flush()

    rng = np.random.default_rng([cfg.seed, 1])
    max_samples = int(cfg.max_seconds_per_batch * cfg.sample_rate)
    lengths = [it.num_samples for it in items]
    plan = [bucket_batches(lengths, max_samples, rng, cfg.num_buckets) for _ in range(cfg.epochs)]
    A = cfg.accum_grad  # an epoch's batches that do not fill a last update are left out
    total = sum(len(p) // A for p in plan)
    if total == 0:
        raise TeacherDataError(f"train: an epoch has {len(plan[0])} batch(es), fewer than one update of "
                               f"accum_grad={A}; lower --accum-grad or --max-seconds-per-batch")
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(1000, total // 10))
    train_seconds = sum(lengths) / cfg.sample_rate
    n_params = sum(p.numel() for p in model.parameters())
    say(f"teacher: {n_params / 1e6:.2f} M parameters ({cfg.num_layers} layers x d_model {cfg.d_model}, "
        f"{tok.vocab_size} CTC symbols); train {len(items)} utterances, {train_seconds / 3600:.3f} h "
        f"({len(skipped)} skipped); {total} steps, warmup {warmup}")
    if skipped:
        say(f"skipped {len(skipped)} training utterances: " + "; ".join(
            f"{k!r}: {v}" for k, v in list(skipped.items())[:3]) + (" ..." if len(skipped) > 3 else ""))
    record({"type": "config", "config": cfg.to_dict(), "model": model.config.to_dict(), "parameters": n_params,
            "train_utterances": len(items), "train_hours": train_seconds / 3600, "skipped": skipped,
            "dev_utterances": len(dev_items) if dev_items else 0, "total_steps": total, "warmup_steps": warmup})

    audio = _Audio(items, cfg.sample_rate, cfg.cache_audio, cfg.num_workers, progress, "train")
    dev_audio = (_Audio(dev_items, cfg.sample_rate, cfg.cache_audio, cfg.num_workers, progress, "dev")
                 if dev_items else None)
    model.to(target)
    scaler = devices.grad_scaler(cfg.dtype, target)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=cfg.weight_decay, fused=True)  # fused: one kernel, not ~100 small ones
    aug = _SpecAugment(model, cfg, np.random.default_rng([cfg.seed, 2])) if cfg.spec_augment else None
    from tqdm.auto import tqdm

    history, step, sha = [], 0, ""
    tok_json = json.dumps(tok.to_json(), ensure_ascii=False, indent=1)
    write_file(tokenizer_path(out), tok_json.encode("utf-8"), storage_options)
    try:
        model.train()
        for epoch in range(1, cfg.epochs + 1):
            if step >= total:
                break
            t_ep = time.time()
            loss_sum = tok_sum = audio_sum = 0.0
            updates = min(len(plan[epoch - 1]) // A, total - step)
            batches = plan[epoch - 1][:updates * A]
            bar = tqdm(total=updates, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                       dynamic_ncols=True)
            micro = 0
            for x, lens, tg, tl, _ in _iterate(audio, items, batches, cfg.num_workers):
                if micro == 0:
                    lr = warmup_cosine_lr(step, total, peak=cfg.lr, warmup=warmup, final_ratio=cfg.min_lr_ratio)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    upd_loss = upd_utts = upd_secs = 0.0
                if aug:
                    aug.draw(lens)
                with devices.autocast(cfg.dtype, target):
                    loss, _ = _ctc_loss(model, *(t.to(target, non_blocking=True) for t in (x, lens, tg, tl)))
                ntok = int(tl.sum())
                scaler.scale(loss / ntok / A if A > 1 else loss / ntok).backward()  # each batch's mean / A
                micro += 1
                secs = float(lens.sum()) / cfg.sample_rate
                loss_sum += float(loss.detach())
                tok_sum += ntok
                audio_sum += secs
                upd_loss += float(loss.detach()) / ntok / A
                upd_utts += len(lens)
                upd_secs += secs
                if micro < A:
                    continue
                micro = 0
                scaler.unscale_(opt)
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                if math.isfinite(gnorm) or scaler.is_enabled():  # the scaler skips (and shrinks) on inf itself
                    scaler.step(opt)
                    scaler.update()
                step += 1
                rate = audio_sum / max(time.time() - t_ep, 1e-9)
                record({"type": "step", "epoch": epoch, "step": step, "loss": upd_loss, "lr": lr,
                        "grad_norm": gnorm, "utterances": int(upd_utts), "audio_seconds": round(upd_secs, 3),
                        "elapsed": round(time.time() - t_start, 3)})
                bar.set_postfix(loss=f"{loss_sum / tok_sum:.3f}", lr=f"{lr:.2e}", rtf=f"{rate:.1f}x")
                bar.update(1)
            bar.close()
            ep_wall = time.time() - t_ep
            sha = save_native_teacher(model, out, storage_options=storage_options)
            entry = {"type": "epoch", "epoch": epoch, "step": step, "train_loss": loss_sum / max(tok_sum, 1),
                     "train_audio_seconds": round(audio_sum, 2), "train_wall_seconds": round(ep_wall, 2),
                     "audio_seconds_per_second": round(audio_sum / max(ep_wall, 1e-9), 2)}
            msg = (f"epoch {epoch}: train loss {entry['train_loss']:.3f} ({audio_sum / max(ep_wall, 1e-9):.1f} s of "
                   f"audio/s, {ep_wall:.0f} s)")
            if dev_audio is not None:
                t_dev = time.time()
                ev = evaluate_ctc(model, tok, None, max_seconds_per_batch=cfg.max_seconds_per_batch,
                                  num_workers=cfg.num_workers, cache=dev_audio, dtype=cfg.dtype)
                entry.update(dev_loss=ev["loss"], dev_cer=ev["cer"], dev_wer=ev["wer"],
                             dev_wall_seconds=round(time.time() - t_dev, 2))
                msg += (f"; dev loss {ev['loss']:.3f} CER {100 * ev['cer']:.2f}% WER {100 * ev['wer']:.2f}%"
                        f"\n  ref: {ev['examples'][0][0]}\n  hyp: {ev['examples'][0][1]}")
            say(msg)
            record(entry)
            history.append(entry)
    finally:
        if aug:
            aug.remove()
        if log:
            log.close()
    model.to("cpu").eval()  # callers get the model where every checkpoint reader expects it
    wall = time.time() - t_start
    layer = suggested_layer(cfg.num_layers)
    summary = {"checkpoint": out, "checkpoint_sha256": sha, "tokenizer": tokenizer_path(out),
               "config": cfg.to_dict(), "model": model.config.to_dict(), "parameters": n_params,
               "train": train if isinstance(train, str) else None, "dev": dev if isinstance(dev, str) else None,
               "train_utterances": len(items), "train_hours": round(train_seconds / 3600, 4),
               "skipped": skipped, "steps": step, "wall_seconds": round(wall, 1), "history": history,
               "suggested_layer": layer}
    summary_path = f"{out}.train.json"
    write_file(summary_path, json.dumps(summary, indent=1).encode("utf-8"), storage_options)
    return TeacherTrainResult(model=model, tokenizer=tok, checkpoint=out, checkpoint_sha256=sha,
                              tokenizer_path=tokenizer_path(out), summary_path=summary_path, log_path=log_path,
                              history=history, skipped=skipped, steps=step, train_seconds=train_seconds,
                              wall_seconds=wall, suggested_layer=layer)


def _default_echo(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)
