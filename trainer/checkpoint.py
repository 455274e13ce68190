"""Checkpoints: everything the loop needs to go on, as named groups in one folder.

    primary.safetensors / secondary.safetensors   both models (safetensors: no pickles); a universal run has one
                                                  network and no secondary.safetensors
    state.pt      optimizers, schedulers, step; per rank its data position and RNG states (python, numpy,
                  torch, cuda);
                  read back with torch.load(weights_only=True): tensors, numbers and strings only
    config.json   the resolved training config and the dataset pair's fingerprint
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PRIMARY, SECONDARY, STATE, CONFIG = "primary.safetensors", "secondary.safetensors", "state.pt", "config.json"


def rng_state() -> dict:
    """This process's RNG states in a weights_only-safe form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(python=repr(random.getstate()), numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)),
                 pos=pos, has_gauss=has_gauss, gauss=gauss), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(folder: str | Path, primary, secondary, optims: dict, step: int, data_by_rank: list[dict],
                    rng_by_rank: list[dict], config: dict, fingerprint: str) -> Path:
    """Write a checkpoint folder (models unwrapped from DDP first; `secondary` None: a run of one network)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_weights(primary), str(folder / PRIMARY))
    if secondary is not None:
        save_file(_weights(secondary), str(folder / SECONDARY))
    torch.save(dict(step=step, data=data_by_rank, rng=rng_by_rank,
                    optimizers={k: o.state_dict() for k, (o, _) in optims.items()},
                    schedulers={k: s.state_dict() for k, (_, s) in optims.items()}), folder / STATE)
    (folder / CONFIG).write_text(json.dumps(dict(config=config, dataset_fingerprint=fingerprint), indent=2))
    return folder


def load_checkpoint(folder: str | Path, primary, secondary, optims: dict) -> dict:
    """Load a checkpoint into the (unwrapped) models and optimizers; returns state.pt's contents.
    A truncated or corrupt file raises ValueError naming it."""
    folder = Path(folder)
    for name in (PRIMARY, *([SECONDARY] if secondary is not None else []), STATE, CONFIG):
        if not (folder / name).is_file():
            raise ValueError(f"checkpoint {folder} is missing {name}")
    try:
        primary.load_state_dict(load_file(str(folder / PRIMARY)))
        if secondary is not None:
            secondary.load_state_dict(load_file(str(folder / SECONDARY)))
        state = torch.load(folder / STATE, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (safetensors, pickle and zip errors all mean one thing here)
        raise ValueError(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e})") from e
    for key, (opt, sched) in optims.items():
        opt.load_state_dict(state["optimizers"][key])
        sched.load_state_dict(state["schedulers"][key])
    return state


def load_final(folder: str | Path, cfg, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, int]:
    """(the primary network rebuilt from `cfg` (or `model`, built by the caller) with the checkpoint's weights, in
    eval mode; its step): what the export is made of. The shuffle network's statistics are buffers: the state
    dict restores them."""
    from .step import network

    folder = Path(folder)
    model = network(cfg) if model is None else model
    model.load_state_dict(load_file(str(folder / PRIMARY)))
    return model.eval(), int(torch.load(folder / STATE, weights_only=True, map_location="cpu")["step"])


def load_with_fallback(folder: str | Path, primary, secondary, optims: dict, fallback: bool) -> tuple[dict, Path]:
    """Load checkpoint `folder`; if it is unreadable and `fallback` is set, the newest readable one of the
    other checkpoints beside it (same run) instead, saying so. Without `fallback` the error names it."""
    folder = Path(folder)
    try:
        return load_checkpoint(folder, primary, secondary, optims), folder
    except ValueError as e:
        if not fallback:
            raise ValueError(f"{e}; rerun with --fallback-checkpoint to resume from the previous one") from e
        first_error = e
    others = sorted((p for p in folder.parent.glob("checkpoint_*") if p.is_dir() and p.name < folder.name),
                    key=lambda p: p.name, reverse=True)  # Ray names them by time: newest first
    for other in others:
        try:
            state = load_checkpoint(other, primary, secondary, optims)
        except ValueError:
            continue
        print(f"[train] {first_error}; falling back to {other.name} (step {state['step']}) as "
              "--fallback-checkpoint asks", flush=True)
        return state, other
    raise ValueError(f"{first_error}; no earlier readable checkpoint in {folder.parent}") from first_error
