"""Training checkpoints as safetensors + JSON: model, optimizer state and RNG state, never pickled.

Everything needed to continue a run bit-for-bit is stored: parameters, Adam moments and step counts, the
torch RNG state (dropout), and the position in the epoch; hyper-parameters and counters go in the JSON.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save

from ci_store.fsio import replace_file


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, rng_states: dict | None = None) -> None:
    """`rng_states`: name -> RNG state tensor ({"torch": torch.get_rng_state()} by default); a data-parallel run
    stores every rank's generators ("torch", "torch.rank1", ..., "cuda", "cuda.rank1", ...)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{pid}.{name}"] = val.detach().cpu().contiguous()
        opt_meta = {"param_groups": sd["param_groups"],
                    "scalars": {str(pid): {n: v for n, v in st.items() if not torch.is_tensor(v)}
                                for pid, st in sd["state"].items()}}
    for name, state in (rng_states if rng_states is not None else {"torch": torch.get_rng_state()}).items():
        tensors[f"rng.{name}"] = state.detach().cpu().contiguous()
    replace_file(path, save(tensors, metadata={"format": "ci-store-checkpoint", "version": "1"}))
    replace_file(_meta_path(path), json.dumps({**meta, "optimizer": opt_meta}, indent=1).encode("utf-8"))


def _meta_path(path: str) -> str:
    return path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else path + ".json"


def load_meta(path: str) -> dict:
    with open(_meta_path(path)) as f:
        return json.load(f)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, rank: int = 0) -> dict:
    """Load into `model` / `optimizer` (on whatever device they are: the file holds CPU tensors) and restore
    rank `rank`'s RNG state; the CUDA generator too when the run saved one and this process computes on CUDA."""
    tensors = load_file(path)
    meta = load_meta(path)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    if optimizer is not None and meta.get("optimizer"):
        om = meta["optimizer"]
        opt_state = {}
        for pid, scalars in om["scalars"].items():
            st = dict(scalars)
            prefix = f"optim.{pid}."
            for k, v in tensors.items():
                if k.startswith(prefix):
                    st[k[len(prefix):]] = v
            opt_state[int(pid)] = st
        optimizer.load_state_dict({"state": opt_state, "param_groups": om["param_groups"]})
    suffix = f".rank{rank}" if rank else ""
    if restore_rng and f"rng.torch{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    if restore_rng and f"rng.cuda{suffix}" in tensors and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])
    return meta
