"""Student training with MVQ-KD (CI labels), l1/l2 KD (float labels) or no KD, and its evaluation.

A run directory holds everything needed to continue or evaluate it: `config.json` (student + training
settings), `tokenizer.json`, `last.safetensors` + `last.json` (model, optimizer, RNG, position in the epoch),
`log.jsonl` (one line per logged step / evaluation) and `curves.png`. Re-running with the same directory
resumes from `last`; the result is the same as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from distill.config import JSONConfig
from distill.student.checkpoint import load_checkpoint, save_checkpoint
from distill.data.dataset import KDDataset
from distill.data.loader import make_loader
from distill.data.sampler import ShardBucketSampler
from distill.data.manifest import load_manifest
from distill.data.tokenizer import CharTokenizer, load_tokenizer, normalize_text
from distill.schedule import warmup_cosine_lr


class TrainingError(ValueError):
    """train-student / evaluate cannot run as asked (options that contradict each other or the label store, a run
    directory that is not one or holds other settings); the message names the option or directory."""


@dataclass
class TrainConfig(JSONConfig):
    kd: str = "none"  # none | mvq | l1 | l2
    kd_scale: float = 1.0
    epochs: int = 10
    max_seconds: float = 60.0  # audio seconds per batch (longest utterance x batch size)
    lr: float = 2e-3
    warmup_steps: int = 200
    final_lr_ratio: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    num_workers: int = 0
    threads: int = 2
    log_every: int = 10
    checkpoint_every: int = 200  # steps; also at every epoch end
    cache_features: bool = True


class _SkipFirst(torch.utils.data.Sampler):
    """A batch sampler that skips the batches an interrupted epoch already trained on."""

    def __init__(self, inner: ShardBucketSampler, skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if i >= self.skip:
                yield b

    def __len__(self):
        return max(0, len(self.inner) - self.skip)


def build_model(student_cfg: dict):
    from distill.student.model import StudentConfig, Transducer

    try:
        cfg = StudentConfig.from_dict(student_cfg)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"student architecture (--student): {e}") from e
    return Transducer(cfg)


def train_student(train_manifest, out_dir: str, *, labels: str | None = None, dev_manifest=None,
                  cfg: TrainConfig | None = None, student: dict | None = None, tokenizer=None,
                  storage_options: dict | None = None, progress: bool = True, stop_after_steps: int | None = None,
                  log=print) -> dict:
    """Train (or resume) a student in `out_dir`; returns the final summary (last losses, dev WER)."""
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    if cfg.kd not in ("none", "mvq", "l1", "l2"):
        raise TrainingError(f"--kd must be none, mvq, l1 or l2, got {cfg.kd!r}")
    if cfg.kd != "none" and labels is None:
        raise TrainingError(f"--kd {cfg.kd} needs --labels (a CI store for mvq, a float-label store for l1/l2)")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    ckpt = os.path.join(out_dir, "last.safetensors")
    resuming = os.path.exists(ckpt)
    train_utts = load_manifest(train_manifest) if isinstance(train_manifest, str) else list(train_manifest)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    if resuming:
        tokenizer = load_tokenizer(tok_path)
    elif tokenizer is None:
        tokenizer = CharTokenizer.build([u.text or "" for u in train_utts])
    if not resuming:
        tokenizer.save(tok_path)
    ds = KDDataset(train_utts, tokenizer, labels=labels if cfg.kd != "none" else None,
                   storage_options=storage_options, feature_cache={} if cfg.cache_features else None)
    if ds.dropped:
        log(f"skipping {len(ds.dropped)} utterance(s) whose labels failed extraction: "
            f"{sorted(ds.dropped)[:5]}")
    if cfg.kd == "mvq" and ds.kind != "codes":
        raise TrainingError(f"--kd mvq needs a CI (codes) store, {labels} is a {ds.kind} store")
    if cfg.kd in ("l1", "l2") and ds.kind != "float":
        raise TrainingError(f"--kd {cfg.kd} needs a float-label store, {labels} is a {ds.kind} store")
    cfg_path = os.path.join(out_dir, "config.json")
    if resuming:
        with open(cfg_path) as f:
            saved = json.load(f)
        student_cfg = saved["student"]
        if saved["train"] != cfg.to_dict():
            raise TrainingError(f"{out_dir} holds a run with other training settings; use a new directory. "
                             f"saved: {saved['train']}")
    else:
        student_cfg = dict(student or {})
        student_cfg.update(vocab_size=tokenizer.vocab_size, kd_type=cfg.kd)
        if cfg.kd != "none":
            student_cfg.update(kd_stack=ds.k)
            if cfg.kd == "mvq":
                student_cfg.update(num_codebooks=ds.label_width, codebook_size=ds.codebook_size)
            else:
                student_cfg.update(teacher_dim=ds.label_width)
        with open(cfg_path, "w") as f:
            json.dump({"student": student_cfg, "train": cfg.to_dict(), "labels": labels,
                       "train_manifest": train_manifest if isinstance(train_manifest, str) else None}, f, indent=1)
    torch.manual_seed(cfg.seed)
    model = build_model(student_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-3)
    sampler = ShardBucketSampler(ds.durations(), ds.shard_of(), max_seconds=cfg.max_seconds, shuffle=True,
                                 seed=cfg.seed)
    total_steps = cfg.epochs * len(sampler)
    epoch, batch_in_epoch, step = 0, 0, 0
    if resuming:
        meta = load_checkpoint(ckpt, model, opt)
        epoch, batch_in_epoch, step = meta["epoch"], meta["batch_in_epoch"], meta["step"]
        log(f"resuming {out_dir} at epoch {epoch}, step {step}")
    log_path = os.path.join(out_dir, "log.jsonl")
    if not resuming and os.path.exists(log_path):
        os.remove(log_path)
    dev_utts = (load_manifest(dev_manifest) if isinstance(dev_manifest, str) else list(dev_manifest)) \
        if dev_manifest is not None else None
    dev_cache: dict = {}
    t_start = time.perf_counter()
    summary: dict = {}

    def checkpoint(ep, bie):
        save_checkpoint(ckpt, model, opt, {"epoch": ep, "batch_in_epoch": bie, "step": step})

    while epoch < cfg.epochs:
        sampler.set_epoch(epoch)
        loader = make_loader(ds, _SkipFirst(sampler, batch_in_epoch), num_workers=cfg.num_workers,
                             seed=cfg.seed * 1000 + epoch)
        model.train()
        bar = tqdm(loader, total=len(sampler), initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, dynamic_ncols=True)
        for batch in bar:
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, total_steps, peak=cfg.lr, warmup=cfg.warmup_steps,
                                           final_ratio=cfg.final_lr_ratio)
            total, parts = model.compute_loss(batch, kd_scale=cfg.kd_scale)
            opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            step += 1
            batch_in_epoch += 1
            rec = {"step": step, "epoch": epoch + batch_in_epoch / len(sampler), "loss": float(total.detach()),
                   "loss_transducer": parts["transducer"], "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
                   "frames": parts["frames"], "time": time.perf_counter() - t_start}
            if "kd" in parts:
                rec["loss_kd"] = parts["kd"]
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "loss_transducer", "loss_kd") if k in rec})
            if step % cfg.log_every == 0 or batch_in_epoch == len(sampler):
                _append(log_path, rec)
            summary.update(rec)
            if stop_after_steps is not None and step >= stop_after_steps:
                checkpoint(epoch, batch_in_epoch)
                return {**summary, "stopped_early": True}
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, batch_in_epoch)
        bar.close()
        epoch, batch_in_epoch = epoch + 1, 0
        if dev_utts is not None:
            res = evaluate_model(model, tokenizer, dev_utts, feature_cache=dev_cache,
                                 storage_options=storage_options, max_seconds=cfg.max_seconds)
            _append(log_path, {"step": step, "epoch": epoch, "dev_wer": res["wer"], "dev_errors": res["errors"],
                               "dev_words": res["words"]})
            log(f"epoch {epoch}: dev WER {100 * res['wer']:.2f}% ({res['errors']}/{res['words']})")
            summary["dev_wer"] = res["wer"]
        checkpoint(epoch, 0)
    try:
        plot_curves({os.path.basename(os.path.normpath(out_dir)): log_path}, os.path.join(out_dir, "curves.png"))
    except ImportError:
        pass
    return summary


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def load_student(run_dir: str):
    """(model, tokenizer) from a run directory's last checkpoint, in eval mode."""
    need = [os.path.join(run_dir, n) for n in ("config.json", "last.safetensors", "tokenizer.json")]
    missing = [os.path.basename(p) for p in need if not os.path.isfile(p)]
    if missing:
        raise TrainingError(f"{run_dir}: not a train-student run directory (no {', '.join(missing)}); give the "
                            f"--out directory of a `ci-store train-student` run that saved a checkpoint")
    with open(need[0]) as f:
        saved = json.load(f)
    model = build_model(saved["student"])
    load_checkpoint(os.path.join(run_dir, "last.safetensors"), model, None, restore_rng=False)
    return model.eval(), load_tokenizer(os.path.join(run_dir, "tokenizer.json"))


@torch.inference_mode()
def evaluate_model(model, tokenizer, utts, *, feature_cache: dict | None = None, storage_options=None,
                   max_seconds: float = 120.0, return_hyps: bool = False, decoding: str = "greedy",
                   beam: int = 4) -> dict:
    """Decode `utts` (greedy, or modified beam search with `beam` hypotheses) and score WER against their texts."""
    from distill.student.decode import cer, greedy_search, modified_beam_search, wer

    if decoding not in ("greedy", "modified_beam_search"):
        raise ValueError(f"decoding must be 'greedy' or 'modified_beam_search', got {decoding!r}")

    was_training = model.training
    model.eval()
    ds = KDDataset(utts, tokenizer, storage_options=storage_options, feature_cache=feature_cache)
    sampler = ShardBucketSampler(ds.durations(), None, max_seconds=max_seconds, shuffle=False)
    refs, hyps, ids = [], [], []
    for batch in make_loader(ds, sampler):
        if decoding == "greedy":
            out = greedy_search(model, batch["feats"], batch["feat_lens"])
        else:
            out = modified_beam_search(model, batch["feats"], batch["feat_lens"], beam=beam)
        hyps += [tokenizer.decode(h) for h in out]
        refs += [normalize_text(t) for t in batch["texts"]]
        ids += batch["ids"]
    if was_training:
        model.train()
    res = {**wer(refs, hyps), **cer(refs, hyps)}
    if return_hyps:
        res["hyps"] = dict(zip(ids, hyps))
        res["refs"] = dict(zip(ids, refs))
    return res


def evaluate(run_dir: str, manifest, *, storage_options=None, max_seconds: float = 120.0) -> dict:
    model, tokenizer = load_student(run_dir)
    utts = load_manifest(manifest) if isinstance(manifest, str) else list(manifest)
    return evaluate_model(model, tokenizer, utts, storage_options=storage_options, max_seconds=max_seconds)


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(logs: dict[str, str], out_png: str) -> None:
    """Training loss parts and dev WER per run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, path in logs.items():
        recs = read_log(path)
        steps = [r for r in recs if "loss" in r]
        if steps:
            x = [r["epoch"] for r in steps]
            axes[0].plot(x, [r.get("loss_transducer", r["loss"]) for r in steps], label=label)
            if any("loss_kd" in r for r in steps):
                axes[1].plot(x, [r.get("loss_kd", float("nan")) for r in steps], label=label)
        dev = [r for r in recs if "dev_wer" in r]
        if dev:
            axes[2].plot([r["epoch"] for r in dev], [100 * r["dev_wer"] for r in dev], marker="o", label=label)
    for ax, title in zip(axes, ["transducer loss", "KD loss", "dev WER (%)"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
