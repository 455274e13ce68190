"""Training configuration: typed dataclasses, YAML files, city96 v4 YAML accepted as it is.

    >>> cfg = TrainConfig(src="xl", dst="v1")                    # the v4.0 xl -> v1 recipe
    >>> cfg = load_config("configs/v1-to-xl.yaml", src="v1", dst="xl")

Unknown keys are refused, naming the key; keys of city96's v4 files that do not apply here (their .bin
dataset paths, eval_model, save_image) are named in a warning and ignored.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from interposer.spaces import get_space, pair_scale


@dataclass
class TrainConfig:
    src: str = "xl"  # source latent space (the primary model's input)
    dst: str = "v1"  # target latent space
    steps: int = 50_000  # optimizer steps in all
    batch: int = 128  # global batch (crops), split evenly over the workers
    crop: int = 32  # crop side in source-space latent pixels (the target crop follows the factors)
    fconst: int = 30_000  # steps at constant LR before the cosine decay to 1e-8
    lr: float = 5e-4  # AdamW learning rate
    beta1: float = 0.5
    beta2: float = 0.95
    weight_decay: float = 0.01  # AdamW's default
    p_loss_weight: float = 1.0  # L1(primary(src), dst)
    b_loss_weight: float = 0.0  # L1(secondary(dst), src)
    r_loss_weight: float = 0.0  # L1(secondary(primary(src)), src): round trip through both
    h_loss_weight: float = 0.0  # L1(primary(secondary(dst)), dst)
    dc_loss_weight: float = 0.0  # L1 between per-channel means of primary(src) and dst (colour shift)
    decoded_loss_weight: float = 0.0  # L1 in pixels through the frozen dst decoder (colour/hue shift)
    decoded_every: int = 10  # steps between decoded-space losses
    decoded_crop: int = 8  # target-space latent pixels decoded per sample (small: the decoder is costly)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ch_mid: int = 64  # network width
    blocks: int = 12  # residual blocks
    seed: int = 0
    val_fraction: float = 0.02  # share of *images* (never tiles) held out, chosen by image id
    eval_every: int = 1000  # steps between validation L1 evaluations
    eval_tiles: int = 64  # validation tiles per evaluation (whole tiles, not crops)
    checkpoint_every: int = 1000  # steps between checkpoints
    log_every: int = 50  # steps between progress lines and TensorBoard points
    preemption_check_every: int = 20  # steps between checks for a spot-preemption notice (a barrier)
    num_to_keep: int = 3  # checkpoints kept
    workers: int = 1  # Ray Train workers (DDP ranks)
    gpu: bool = False  # one GPU per worker; bf16 autocast
    cpus_per_worker: int = 0  # CPUs (and torch threads) per worker; 0 = all of the cluster's CPUs / workers
    #                           without GPUs, 1 with them
    max_failures: int = 3  # worker failures Ray Train recovers from by itself
    fallback_checkpoint: bool = False  # an unreadable latest checkpoint: resume from the previous one
    layout: Literal["raw"] = "raw"  # the networks map raw VAE latents

    def __post_init__(self):
        self.src, self.dst = get_space(self.src).code, get_space(self.dst).code
        if self.src == self.dst:
            raise ValueError(f"src and dst are both {self.src}: nothing to train")
        positive = ("steps", "batch", "crop", "ch_mid", "eval_every", "checkpoint_every", "log_every",
                    "workers", "num_to_keep", "decoded_every", "decoded_crop", "eval_tiles",
                    "preemption_check_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.blocks < 0 or self.fconst < 0 or self.cpus_per_worker < 0:
            raise ValueError("blocks, fconst and cpus_per_worker must not be negative")
        if self.batch % self.workers:
            raise ValueError(f"batch {self.batch} must divide evenly over {self.workers} workers")
        for name in ("p", "b", "r", "h", "dc", "decoded"):
            if getattr(self, f"{name}_loss_weight") < 0:
                raise ValueError(f"{name}_loss_weight must not be negative")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        scale = pair_scale(self.src, self.dst)
        if (self.crop * scale) != int(self.crop * scale) or self.crop * scale < 1:
            raise ValueError(f"crop {self.crop} times the {self.src}->{self.dst} scale {scale} must be a whole number")

    @property
    def uses_secondary(self) -> bool:
        return any(getattr(self, f"{n}_loss_weight") > 0 for n in ("b", "r", "h"))

    def model_args(self, reverse: bool = False) -> dict:
        s, d = (self.dst, self.src) if reverse else (self.src, self.dst)
        return dict(ch_in=get_space(s).channels, ch_out=get_space(d).channels, ch_mid=self.ch_mid,
                    blocks=self.blocks, scale=pair_scale(s, d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# city96 v4 YAML keys -> ours (values are taken as they are)
_CITY96 = {"steps": "steps", "batch": "batch", "fconst": "fconst", "p_loss_weight": "p_loss_weight",
           "r_loss_weight": "r_loss_weight", "b_loss_weight": "b_loss_weight", "h_loss_weight": "h_loss_weight"}
_CITY96_IGNORED = ("dataset", "eval_model", "save_image", "cosine", "model.rev", "model.args.ch_in",
                   "model.args.ch_out", "model.args.scale", "data", "eval", "save_every", "device", "resume")
# what replaces an ignored key here, named in the warning
_CITY96_INSTEAD = {"device": "--gpu", "resume": "rerun the same command to resume", "dataset": "--data",
                   "data": "--data", "eval_model": "interposer eval", "save_every": "--checkpoint-every",
                   "model.args.ch_in": "from --src", "model.args.ch_out": "from --dst",
                   "model.args.scale": "from --src/--dst", "model.rev": "--rev"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_from_dict(raw: dict, where: str = "config", **overrides) -> TrainConfig:
    """Our keys (flat) or city96 v4 keys (model.src/dst/args, optim.lr/beta1/beta2, ...) -> TrainConfig."""
    flat = _flatten(raw or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values, ignored, unknown = {}, [], []
    for key, value in flat.items():
        if key in known:
            values[key] = value
        elif key in _CITY96:
            values[_CITY96[key]] = value
        elif key in ("model.src", "model.dst"):
            values[key.split(".")[1]] = value
        elif key in ("optim.lr", "optim.beta1", "optim.beta2"):
            values[key.split(".")[1]] = value
        elif key == "model.args.ch_mid":
            values["ch_mid"] = value
        elif key == "model.args.blocks":
            values["blocks"] = value
        elif any(key == k or key.startswith(k + ".") for k in _CITY96_IGNORED):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if ignored:
        def named(key: str) -> str:
            instead = _CITY96_INSTEAD.get(key) or _CITY96_INSTEAD.get(key.split(".")[0])
            return f"{key} ({instead})" if instead else key

        listed = ", ".join(map(named, sorted(ignored)))
        warnings.warn(f"{where}: ignoring key(s) that do not apply here: {listed}", stacklevel=2)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A YAML file (ours or city96 v4) with command-line overrides on top; None: defaults."""
    if path is None:
        return config_from_dict({}, **overrides)
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"--config {path}: not valid YAML ({first})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of keys to values")
    return config_from_dict(raw or {}, where=str(path), **overrides)


