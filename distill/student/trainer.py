"""Student training with MVQ-KD (CI labels), l1/l2 KD (float labels) or no KD, and its evaluation.

The KD labels come from a label store (`labels`), or from a teacher run on every batch (`online_teacher`,
distill/student/online_teacher.py): the on-the-fly baseline a store is measured against, which makes the same labels.

A run directory holds everything needed to continue or evaluate it: `config.json` (student + training
settings), `tokenizer.json`, `last.safetensors` + `last.json` (model, optimizer, RNG, position in the epoch),
`log.jsonl` (one line per logged step / evaluation) and `curves.png`. Re-running with the same directory
resumes from `last`; the result is the same as an uninterrupted run. Device (cpu / cuda), mixed precision
(--dtype), gradient accumulation and data-parallel processes (distill/student/distributed.py) are handled here;
checkpoints hold CPU tensors, so a run trained on GPUs resumes or evaluates on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch

from distill import devices
from distill.config import JSONConfig
from distill.student.checkpoint import load_checkpoint, save_checkpoint
from distill.data.audio import read_audio
from distill.data.dataset import KDDataset
from distill.data.fbank import FRAME_SHIFT_MS
from distill.data.feature_cache import FeatureCache
from distill.data.loader import make_loader
from distill.data.sampler import ShardBucketSampler, make_train_sampler
from distill.data.manifest import load_manifest
from distill.data.tokenizer import CharTokenizer, load_tokenizer, normalize_text
from distill.student.distributed import (Rank, RankBatches, SpawnedRankError, barrier, current_rank,
                                         init_distributed, spawn, updates_per_epoch)
from distill.schedule import warmup_cosine_lr
from distill.student.online_teacher import OnlineTeacherSpec, load_online_teacher


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
    feature_cache_mb: int = 0  # LRU fbank cache per loader process (0: off); see distill/data/feature_cache.py
    dtype: str = "float32"  # autocast dtype of the forward: float32 | bfloat16 | float16 (loss-scaled)
    accum_grad: int = 1  # micro-batches per optimizer update (per process); the lr schedule counts updates


# settings that cannot change a run's result: a resumed run may differ in them ("cache_features": before
# feature_cache_mb, run directories saved an unbounded on/off cache)
_RESULT_NEUTRAL = ("feature_cache_mb", "cache_features")


def _result_settings(train: dict) -> dict:
    return {k: v for k, v in train.items() if k not in _RESULT_NEUTRAL}


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
                  device: str = "cpu", world_size: int | None = None, online_teacher: OnlineTeacherSpec | None = None,
                  log=print) -> dict:
    """Train (or resume) a student in `out_dir`; returns the final summary (last losses, dev WER).

    KD labels come from the store at `labels`, or, with `online_teacher`, from that teacher (and quantizer) run on
    `device` in this process on every batch.

    `device`: cpu, cuda or cuda:N (under torch.distributed, cuda means cuda:LOCAL_RANK). `world_size` N > 1 spawns
    N local processes (gloo on CPU, nccl on CUDA) unless this process already is a rank of a job (torchrun)."""
    cfg = cfg or TrainConfig()
    _check_settings(cfg, labels, device, online_teacher)
    rank = current_rank()
    if world_size is not None and world_size > 1 and not rank.distributed:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "last.safetensors")):  # a refused resume: one clear error, here
            with open(os.path.join(out_dir, "config.json")) as f:
                _check_resume(json.load(f), cfg, world_size, out_dir)
        try:
            return spawn(world_size, train_student, (train_manifest, out_dir), dict(
                labels=labels, dev_manifest=dev_manifest, cfg=cfg, student=student, tokenizer=tokenizer,
                storage_options=storage_options, progress=progress, stop_after_steps=stop_after_steps,
                device=device, world_size=None, online_teacher=online_teacher, log=log))
        except SpawnedRankError as e:
            raise TrainingError(f"--world-size {world_size}: {e}") from None
    if world_size is not None and rank.world_size != max(world_size, 1):
        raise TrainingError(f"--world-size {world_size} but this process is rank {rank.rank} of a job of "
                            f"{rank.world_size} (WORLD_SIZE from torchrun); leave --world-size out under torchrun")
    kind, index = devices.parse_device(device)
    if rank.distributed and kind == "cuda" and index is not None:
        raise TrainingError(f"--device {device} with {rank.world_size} processes: each rank takes its own GPU; "
                            f"use --device cuda (rank r computes on cuda:LOCAL_RANK)")
    dev = devices.torch_device(device, rank.local_rank if rank.distributed else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    joined = init_distributed(rank, dev.type)
    try:
        return _train(train_manifest, out_dir, labels=labels, dev_manifest=dev_manifest, cfg=cfg, student=student,
                      tokenizer=tokenizer, storage_options=storage_options, progress=progress and rank.is_main,
                      stop_after_steps=stop_after_steps, device=device, dev=dev, rank=rank,
                      online_teacher=online_teacher, log=log if rank.is_main else _quiet)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _quiet(*_args, **_kw) -> None:
    """Ranks other than 0 print nothing (their messages would repeat rank 0's)."""


def label_source_problem(kd: str, labels, online_teacher: OnlineTeacherSpec | None) -> tuple[str, str] | None:
    """(option, why) when --kd, --labels, --online-teacher and --quantizer contradict each other; None if they fit.
    Shared by train-student (a click error on that option) and `train_student` (a TrainingError)."""
    if labels is not None and online_teacher is not None:
        return "--online-teacher", ("give --labels (labels read from a store) or --online-teacher (labels made by "
                                    "the teacher while training), not both")
    if online_teacher is None:
        if kd != "none" and labels is None:
            return "--labels", (f"--kd {kd} needs --labels (a CI store for mvq, a float-label store for l1/l2) or "
                                f"--online-teacher (a teacher run on every batch)")
        return None
    if kd == "none":
        return "--online-teacher", "--kd none trains without a teacher; choose --kd mvq, l1 or l2 to use one"
    if kd == "mvq" and online_teacher.quantizer is None:
        return "--quantizer", ("--kd mvq with --online-teacher needs --quantizer (the quantizer file that turns the "
                               "teacher's frames into codes)")
    if kd in ("l1", "l2") and online_teacher.quantizer is not None:
        return "--quantizer", (f"--kd {kd} trains on the teacher's float frames; --quantizer only applies to "
                               f"--kd mvq")
    return None


def _check_settings(cfg: TrainConfig, labels, device: str, online_teacher: OnlineTeacherSpec | None = None) -> None:
    """Refuse contradictory or unusable options before any data is read or any process is started."""
    if cfg.kd not in ("none", "mvq", "l1", "l2"):
        raise TrainingError(f"--kd must be none, mvq, l1 or l2, got {cfg.kd!r}")
    problem = label_source_problem(cfg.kd, labels, online_teacher)
    if problem is not None:
        raise TrainingError(problem[1])
    if not isinstance(cfg.accum_grad, int) or cfg.accum_grad < 1:
        raise TrainingError(f"--accum-grad must be an integer >= 1, got {cfg.accum_grad!r}")
    try:
        devices.check_device(device)
        devices.check_dtype(cfg.dtype, device)
    except devices.DeviceError as e:
        raise TrainingError(str(e)) from None


# settings that change the numbers a run computes: a resumed run must keep them (their option names for the message)
_MUST_MATCH = {"dtype": "--dtype", "accum_grad": "--accum-grad"}
_DEFAULTS_BEFORE_SCALE = {"dtype": "float32", "accum_grad": 1}  # what runs saved before these settings existed


def _check_resume(saved: dict, cfg: TrainConfig, world_size: int, out_dir: str) -> None:
    train = {**_DEFAULTS_BEFORE_SCALE, **saved["train"]}
    for key, option in _MUST_MATCH.items():
        if train[key] != getattr(cfg, key):
            raise TrainingError(f"{option} {getattr(cfg, key)}: the run in {out_dir} was trained with {option} "
                                f"{train[key]} and must resume with it (it changes the updates); use a new --out "
                                f"directory to change it")
    saved_world = saved.get("runtime", {}).get("world_size", 1)
    if saved_world != world_size:
        raise TrainingError(f"--world-size {world_size}: the run in {out_dir} was trained by {saved_world} "
                            f"process(es) and must resume with as many (the processes split each update's "
                            f"batches); use a new --out directory to change it")
    if _result_settings(train) != _result_settings(cfg.to_dict()):
        raise TrainingError(f"{out_dir} holds a run with other training settings; use a new directory. "
                            f"saved: {saved['train']}")


# what a resumed on-the-fly run must keep: the labels it learns from depend on these (the paths may move)
_ONLINE_MUST_MATCH = {"checkpoint_sha256": "teacher checkpoint (sha256)", "layer": "--layer",
                      "teacher_dtype": "--teacher-dtype", "quantizer_id": "--quantizer (id)"}


def _check_online_resume(saved: dict, mine: dict | None, out_dir: str) -> None:
    """A resumed run keeps its label source: the same store-or-teacher choice, and the same teacher and quantizer."""
    theirs = saved.get("online_teacher")
    if (theirs is None) != (mine is None):
        was = (f"--online-teacher {theirs['teacher']} --layer {theirs['layer']}" if theirs is not None
               else f"--labels {saved.get('labels')}")
        raise TrainingError(f"the run in {out_dir} was trained with {was} and must resume with it (the labels "
                            f"would change); use a new --out directory to change it")
    if theirs is None:
        return
    for key, what in _ONLINE_MUST_MATCH.items():
        if theirs.get(key) != mine.get(key):
            raise TrainingError(f"--online-teacher {mine['teacher']}: its {what} is {mine.get(key)!r} but the run "
                                f"in {out_dir} was trained with {theirs.get(key)!r} (teacher {theirs['teacher']}); "
                                f"resume with the same teacher, or use a new --out directory")


class _LossOf(torch.nn.Module):
    """The student's training loss as a forward(), so DistributedDataParallel sees (and synchronises) it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, kd_scale: float, step: int):
        return self.model.compute_loss(batch, kd_scale=kd_scale, step=step)


def _to_device(batch: dict, dev) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _rng_states(rank: Rank, dev) -> dict:
    """Every rank's generators, gathered on rank 0 (dropout continues exactly on resume); {} on the others."""
    mine = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(dev)
    if not rank.distributed:
        return mine
    gathered = [None] * rank.world_size if rank.is_main else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if not rank.is_main:
        return {}
    return {name + (f".rank{r}" if r else ""): state for r, states in enumerate(gathered) for name, state in
            states.items()}


def _train(train_manifest, out_dir: str, *, labels, dev_manifest, cfg: TrainConfig, student, tokenizer,
           storage_options, progress: bool, stop_after_steps, device: str, dev, rank: Rank, log,
           online_teacher: OnlineTeacherSpec | None = None) -> dict:
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    ckpt = os.path.join(out_dir, "last.safetensors")
    resuming = os.path.exists(ckpt)
    barrier(rank)  # every rank has seen whether this is a resume before rank 0 can write a checkpoint
    train_utts = load_manifest(train_manifest) if isinstance(train_manifest, str) else list(train_manifest)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    if resuming:
        tokenizer = load_tokenizer(tok_path)
    elif tokenizer is None:
        tokenizer = CharTokenizer.build([u.text or "" for u in train_utts])
    if not resuming and rank.is_main:
        tokenizer.save(tok_path)
    # the online teacher runs here, in the main process on the training device; the loader hands it waveforms
    online = None if online_teacher is None else load_online_teacher(online_teacher, device=dev,
                                                                     storage_options=storage_options)
    ds = KDDataset(train_utts, tokenizer, labels=labels if cfg.kd != "none" and online is None else None,
                   storage_options=storage_options, feature_cache=FeatureCache.from_mb(cfg.feature_cache_mb),
                   audio_rate=online.sample_rate if online is not None else None)
    if ds.dropped:
        log(f"skipping {len(ds.dropped)} utterance(s) whose labels failed extraction: "
            f"{sorted(ds.dropped)[:5]}")
    source = online if online is not None else ds  # kind, k, label_width, codebook_size of the KD labels
    if online is None:
        if cfg.kd == "mvq" and ds.kind != "codes":
            raise TrainingError(f"--kd mvq needs a CI (codes) store, {labels} is a {ds.kind} store")
        if cfg.kd in ("l1", "l2") and ds.kind != "float":
            raise TrainingError(f"--kd {cfg.kd} needs a float-label store, {labels} is a {ds.kind} store")
    elif online.kind == "float":
        # standardised with statistics over the training utterances, as float_label_stats takes them from a store
        by_id = {u.id: u for u in ds.utts}
        online.fit_stats([u.id for u in ds.utts],
                         lambda uid: read_audio(by_id[uid], online.sample_rate, storage_options=storage_options))
        online.seconds = 0.0  # teacher_seconds counts the labelling of training batches only
    cfg_path = os.path.join(out_dir, "config.json")
    session = {"device": device, "world_size": rank.world_size,
               "backend": ("nccl" if dev.type == "cuda" else "gloo") if rank.distributed else None}
    if resuming:
        with open(cfg_path) as f:
            saved = json.load(f)
        student_cfg = saved["student"]
        _check_resume(saved, cfg, rank.world_size, out_dir)
        _check_online_resume(saved, online.provenance(online_teacher) if online is not None else None, out_dir)
    else:
        student_cfg = dict(student or {})
        student_cfg.update(vocab_size=tokenizer.vocab_size, kd_type=cfg.kd)
        if cfg.kd != "none":
            student_cfg.update(kd_stack=source.k)
            if cfg.kd == "mvq":
                student_cfg.update(num_codebooks=source.label_width, codebook_size=source.codebook_size)
            else:
                student_cfg.update(teacher_dim=source.label_width)
        saved = {"student": student_cfg, "train": cfg.to_dict(), "labels": labels,
                 "online_teacher": online.provenance(online_teacher) if online is not None else None,
                 "train_manifest": train_manifest if isinstance(train_manifest, str) else None,
                 "runtime": {"world_size": rank.world_size, "sessions": []}}
    torch.manual_seed(cfg.seed)
    model = build_model(student_cfg).to(dev)
    if rank.rank:  # same initial weights on every rank, its own dropout masks (rank 0 keeps the seed's stream)
        torch.manual_seed(cfg.seed + rank.rank)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-3)
    sampler = make_train_sampler(ds, max_seconds=cfg.max_seconds, seed=cfg.seed)
    W, A = rank.world_size, cfg.accum_grad
    # updates per epoch: the mixing sampler's batch count varies a little between epochs
    epoch_updates = [updates_per_epoch(len(sampler.epoch_batches(e)), W, A) for e in range(cfg.epochs)]
    if min(epoch_updates, default=1) == 0:
        raise TrainingError(f"an epoch has {len(sampler.epoch_batches(0))} batch(es), fewer than one update takes "
                            f"({W} process(es) x --accum-grad {A}); lower --accum-grad / --world-size or "
                            f"--max-seconds")
    total_steps = sum(epoch_updates)
    epoch, update_in_epoch, step = 0, 0, 0
    scaler = devices.grad_scaler(cfg.dtype, dev)
    if resuming:
        meta = load_checkpoint(ckpt, model, opt, rank=rank.rank)
        epoch, step = meta["epoch"], meta["step"]
        if meta.get("grad_scaler"):  # float16's loss scale continues where it was
            scaler.load_state_dict(meta["grad_scaler"])
        update_in_epoch = meta.get("update_in_epoch", meta.get("batch_in_epoch", 0))
        log(f"resuming {out_dir} at epoch {epoch}, step {step}")
    if stop_after_steps is not None:  # recorded so the run directory says why it ended where it did
        session["stop_after_steps"] = stop_after_steps
    if rank.is_main:
        saved.setdefault("runtime", {"world_size": 1}).setdefault("sessions", []).append({**session, "step": step})
        with open(cfg_path, "w") as f:
            json.dump(saved, f, indent=1)
    log_path = os.path.join(out_dir, "log.jsonl")
    if not resuming and rank.is_main and os.path.exists(log_path):
        os.remove(log_path)
    dev_utts = (load_manifest(dev_manifest) if isinstance(dev_manifest, str) else list(dev_manifest)) \
        if dev_manifest is not None else None
    dev_cache: dict = {}
    net = _LossOf(model)
    if rank.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=model.kd_head is not None and not cfg.kd_scale)
    t_start = time.perf_counter()
    summary: dict = {}
    if stop_after_steps is not None and step >= stop_after_steps:  # re-running a stopped run (--max-steps) is a no-op
        log(f"{out_dir} is at step {step}, already at the stop after {stop_after_steps} steps; nothing to do")
        return {"step": step, "stopped_early": True}
    # one loader for the run (persistent workers); each epoch re-points its batch sampler (set_epoch below)
    mine = RankBatches(sampler, rank=rank.rank, world_size=W, accum=A)
    loader = make_loader(ds, mine, num_workers=cfg.num_workers, seed=cfg.seed)

    def checkpoint(ep, uie):
        states = _rng_states(rank, dev)
        if rank.is_main:
            save_checkpoint(ckpt, model, opt, {"epoch": ep, "update_in_epoch": uie, "step": step,
                                               "grad_scaler": scaler.state_dict() or None}, rng_states=states)
        barrier(rank)

    while epoch < cfg.epochs:
        per_epoch = epoch_updates[epoch]
        mine.set_epoch(epoch, skip_updates=update_in_epoch)  # the loader's (persistent) workers serve every epoch
        model.train()
        bar = tqdm(total=per_epoch, initial=update_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, dynamic_ncols=True)
        micro = 0
        for batch in loader:
            if micro == 0:
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine_lr(step, total_steps, peak=cfg.lr, warmup=cfg.warmup_steps,
                                               final_ratio=cfg.final_lr_ratio)
                opt.zero_grad(set_to_none=True)
                # over the update, all ranks: loss, transducer, kd, encoder frames, utterances, feature frames
                # and, for the pruned loss, its unscaled simple and pruned NLLs
                sums = torch.zeros(8, dtype=torch.float64)
            if online is not None:  # on-the-fly KD: the teacher labels this batch now
                batch["labels"], batch["label_mask"] = online.batch_labels(batch.pop("waves"), batch["feat_lens"],
                                                                           batch["ids"])
            batch = _to_device(batch, dev)
            micro += 1
            # accumulation micro-steps keep their gradients local; the update's last one all-reduces them
            sync = contextlib.nullcontext() if micro == A or not rank.distributed else net.no_sync()
            with sync:
                with devices.autocast(cfg.dtype, dev):
                    total, parts = net(batch, cfg.kd_scale, step)
                scaler.scale(total / A if A > 1 else total).backward()
            sums += torch.tensor([parts["total"], parts["transducer"], parts.get("kd", 0.0), parts["frames"],
                                  len(batch["ids"]), float(batch["feat_lens"].sum()), parts.get("simple", 0.0),
                                  parts.get("pruned", 0.0)], dtype=torch.float64)
            if micro < A:
                continue
            micro = 0
            scaler.unscale_(opt)
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            scaler.step(opt)
            scaler.update()
            step += 1
            update_in_epoch += 1
            if rank.distributed:
                reduced = sums.to(dev)
                torch.distributed.all_reduce(reduced)
                sums = reduced.cpu()
            n = W * A
            rec = {"step": step, "epoch": epoch + update_in_epoch / per_epoch, "loss": float(sums[0]) / n,
                   "loss_transducer": float(sums[1]) / n, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
                   "frames": int(sums[3]), "utterances": int(sums[4]),
                   "audio_seconds": round(float(sums[5]) * FRAME_SHIFT_MS / 1000, 2), "time": time.perf_counter() - t_start}
            if "kd" in parts:
                rec["loss_kd"] = float(sums[2]) / n
            if online is not None:  # this process's labelling time since the session started (like "time")
                rec["teacher_seconds"] = online.seconds
            if "pruned" in parts:  # loss_transducer is then the scaled combination of these two
                rec["loss_simple"], rec["loss_pruned"] = float(sums[6]) / n, float(sums[7]) / n
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "loss_transducer", "loss_kd") if k in rec})
            stopping = stop_after_steps is not None and step >= stop_after_steps
            # a stopped run logs its last step too: the log says where (and after how long) it stopped
            if rank.is_main and (step % cfg.log_every == 0 or update_in_epoch == per_epoch or stopping):
                _append(log_path, rec)
            summary.update(rec)
            if stopping:
                checkpoint(epoch, update_in_epoch)
                return {**summary, "stopped_early": True}
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, update_in_epoch)
        bar.close()
        epoch, update_in_epoch = epoch + 1, 0
        if dev_utts is not None and rank.is_main:
            res = evaluate_model(model, tokenizer, dev_utts, feature_cache=dev_cache,
                                 storage_options=storage_options, max_seconds=cfg.max_seconds, dtype=cfg.dtype)
            _append(log_path, {"step": step, "epoch": epoch, "dev_wer": res["wer"], "dev_errors": res["errors"],
                               "dev_words": res["words"]})
            log(f"epoch {epoch}: dev WER {100 * res['wer']:.2f}% ({res['errors']}/{res['words']})")
            summary["dev_wer"] = res["wer"]
        checkpoint(epoch, 0)  # its barrier also holds the other ranks while rank 0 scores the dev set
    if rank.is_main:
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
                   max_seconds: float = 120.0, return_hyps: bool = False, dtype: str = "float32",
                   decoding: str = "greedy", beam: int = 4) -> dict:
    """Decode `utts` (greedy, or modified beam search with `beam` hypotheses) and score WER against their texts
    (on the model's device, the forward in `dtype`)."""
    from distill.student.decode import cer, greedy_search, modified_beam_search, wer

    if decoding not in ("greedy", "modified_beam_search"):
        raise ValueError(f"decoding must be 'greedy' or 'modified_beam_search', got {decoding!r}")

    was_training = model.training
    model.eval()
    ds = KDDataset(utts, tokenizer, storage_options=storage_options, feature_cache=feature_cache)
    sampler = ShardBucketSampler(ds.durations(), None, max_seconds=max_seconds, shuffle=False)
    refs, hyps, ids = [], [], []
    dev = next(model.parameters()).device
    for batch in make_loader(ds, sampler):
        feats, feat_lens = batch["feats"].to(dev), batch["feat_lens"].to(dev)
        with devices.autocast(dtype, dev):
            if decoding == "greedy":
                out = greedy_search(model, feats, feat_lens)
            else:
                out = modified_beam_search(model, feats, feat_lens, beam=beam)
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


def evaluate(run_dir: str, manifest, *, storage_options=None, max_seconds: float = 120.0, device: str = "cpu",
             dtype: str = "float32", decoding: str = "greedy", beam: int = 4) -> dict:
    """WER of the run's last checkpoint on `manifest`, computed on `device` (whatever device trained it)."""
    try:
        devices.check_device(device)
        devices.check_dtype(dtype, device)
    except devices.DeviceError as e:
        raise TrainingError(str(e)) from None
    model, tokenizer = load_student(run_dir)
    model.to(devices.torch_device(device))
    utts = load_manifest(manifest) if isinstance(manifest, str) else list(manifest)
    return evaluate_model(model, tokenizer, utts, storage_options=storage_options, max_seconds=max_seconds,
                          dtype=dtype, decoding=decoding, beam=beam)


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
