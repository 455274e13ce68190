"""Training configuration: typed dataclasses, YAML files, city96 v4 YAML accepted as it is.

    >>> cfg = TrainConfig(src="xl", dst="v1")                    # the v4.0 xl -> v1 recipe
    >>> cfg = TrainConfig.of(src="xl", dst="v1", steps=2000, lr=1e-3)    # flat names, as flags and YAML spell them
    >>> cfg.optim.lr, cfg.schedule.steps, cfg.data.batch
    >>> cfg = load_config("configs/v1-to-xl.yaml", src="v1", dst="xl")

Settings live in small groups (model, optim, schedule, loss, data, log, checkpoint, resources); every setting
also has one flat name, unique across groups, which is its command-line flag and YAML key. A YAML file may
use flat keys or group sections. Unknown keys are refused, naming the key; city96's v4 files work as they
are: their values are used (steps, batch, fconst, cosine, loss weights, optim.*, model.args width and blocks;
ch_in/ch_out/scale are checked against the spaces), and keys that do not apply here (device, resume, dataset
paths, eval_model, save_image, model.rev) are named in one warning with what replaces each.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from interposer.spaces import default_args, get_space, pair_scale


Arch = Literal["auto", "v4", "shuffle"]
ARCH_NAMES = {"v4": "interposer-v4", "shuffle": "interposer-shuffle"}  # -> interposer.weights.ARCHITECTURES
# the learning rate each network was tuned for (v4: city96's 50k-step recipe; shuffle: bench/quality.py's budget)
RECIPE_LR = {"v4": 5e-4, "shuffle": 2e-3}


@dataclass
class ModelConfig:
    ch_mid: int = 64  # network width
    blocks: int = 12  # residual blocks
    arch: Arch = "auto"  # network: v4 (city96's layout), shuffle (pixel (un)shuffle resampling, normalised, linear
    #                      path); auto = v4 for pairs of one spatial factor, shuffle where the factors differ


@dataclass
class OptimConfig:
    lr: float | None = None  # AdamW learning rate; None = the network's recipe (v4 5e-4, shuffle 2e-3)
    beta1: float = 0.5
    beta2: float = 0.95
    weight_decay: float = 0.01  # AdamW's default
    grad_clip: float = 0.0  # max gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    steps: int = 50_000  # optimizer steps in all
    fconst: int = 30_000  # steps at constant LR first
    cosine: bool = True  # then a cosine decay to 1e-8 at the last step (False: constant LR throughout)


@dataclass
class LossConfig:
    p_loss_weight: float = 1.0  # L1(primary(src), dst)
    b_loss_weight: float = 0.0  # L1(secondary(dst), src)
    r_loss_weight: float = 0.0  # L1(secondary(primary(src)), src): round trip through both
    h_loss_weight: float = 0.0  # L1(primary(secondary(dst)), dst)
    dc_loss_weight: float = 0.0  # L1 between per-channel means of primary(src) and dst (colour shift)
    decoded_loss_weight: float = 0.0  # L1 in pixels through the frozen dst decoder (colour/hue shift)
    decoded_every: int = 10  # steps between decoded-space losses
    decoded_crop: int = 8  # target-space latent pixels decoded per sample (small: the decoder is costly)


@dataclass
class DataConfig:
    batch: int = 128  # global batch (crops), split evenly over the workers
    crop: int = 32  # crop side in source-space latent pixels (the target crop follows the factors)
    val_fraction: float = 0.02  # share of *images* (never tiles) held out, chosen by image id


@dataclass
class LogConfig:
    log_every: int = 50  # steps between progress lines and TensorBoard points
    eval_every: int = 1000  # steps between validation L1 evaluations
    eval_tiles: int = 64  # validation tiles per evaluation (whole tiles, not crops; only these are read)


@dataclass
class CheckpointConfig:
    checkpoint_every: int = 1000  # steps between checkpoints
    num_to_keep: int = 3  # checkpoints kept
    fallback_checkpoint: bool = False  # an unreadable latest checkpoint: resume from the previous one
    preemption_check_every: int = 20  # steps between checks for a spot-preemption notice (a barrier)


@dataclass
class ResourceConfig:
    workers: int = 1  # Ray Train workers (DDP ranks)
    gpu: bool = False  # one GPU per worker; bf16 autocast
    cpus_per_worker: int = 0  # CPUs (and torch threads) per worker; 0 = the cluster's CPUs / workers without
    #                           GPUs, 1 with them
    max_failures: int = 3  # worker failures Ray Train recovers from by itself


GROUPS = dict(model=ModelConfig, optim=OptimConfig, schedule=ScheduleConfig, loss=LossConfig, data=DataConfig,
              log=LogConfig, checkpoint=CheckpointConfig, resources=ResourceConfig)
# every setting's flat name (the command-line flag and the YAML key) -> its group
FLAT = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass
class TrainConfig:
    """What a run computes and how it runs, in groups. `TrainConfig.of(lr=1e-3, steps=10)` takes the flat
    names users type (flags, YAML keys); `cfg.optim.lr` reads them."""

    src: str = "xl"  # source latent space (the primary model's input)
    dst: str = "v1"  # target latent space
    seed: int = 0  # every random draw is a function of (seed, step, rank)
    layout: Literal["raw"] = "raw"  # the networks map raw VAE latents
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    @classmethod
    def of(cls, **flat) -> "TrainConfig":
        """From flat names (`steps=10, lr=1e-3, src="xl"`); an unknown name is a TypeError naming it."""
        top = {k: flat.pop(k) for k in ("src", "dst", "seed", "layout") if k in flat}
        groups: dict[str, dict] = {g: {} for g in GROUPS}
        for key, value in flat.items():
            if key not in FLAT:
                raise TypeError(f"unknown setting {key!r}")
            groups[FLAT[key]][key] = value
        return cls(**top, **{g: GROUPS[g](**v) for g, v in groups.items()})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From to_dict()'s nested form (or the flat form older run records hold)."""
        if any(isinstance(v, dict) for v in d.values()):
            return cls(**{k: GROUPS[k](**v) if k in GROUPS else v for k, v in d.items()})
        return cls.of(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """Every setting under its flat name."""
        out = dict(src=self.src, dst=self.dst, seed=self.seed, layout=self.layout)
        for group in GROUPS:
            out.update(dataclasses.asdict(getattr(self, group)))
        return out

    def __post_init__(self):
        self.src, self.dst = get_space(self.src).code, get_space(self.dst).code
        if self.src == self.dst:
            raise ValueError(f"src and dst are both {self.src}: nothing to train")
        if self.model.arch not in ("auto", *ARCH_NAMES):
            raise ValueError(f"arch must be auto, {' or '.join(ARCH_NAMES)}, got {self.model.arch!r}")
        if self.model.arch == "auto":  # resolved here, so that run records hold the network actually trained
            self.model.arch = "v4" if pair_scale(self.src, self.dst) == 1 else "shuffle"
        if self.optim.lr is None:
            self.optim.lr = RECIPE_LR[self.model.arch]
        flat = self.flat()
        positive = ("steps", "batch", "crop", "ch_mid", "eval_every", "checkpoint_every", "log_every",
                    "workers", "num_to_keep", "decoded_every", "decoded_crop", "eval_tiles",
                    "preemption_check_every")
        for name in positive:
            if not isinstance(flat[name], int) or isinstance(flat[name], bool) or flat[name] < 1:
                raise ValueError(f"{name} must be a positive integer, got {flat[name]!r}")
        for name in ("blocks", "fconst", "cpus_per_worker"):
            if not isinstance(flat[name], int) or flat[name] < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {flat[name]!r}")
        if self.data.batch % self.resources.workers:
            raise ValueError(f"batch {self.data.batch} must divide evenly over {self.resources.workers} workers")
        for name in ("p", "b", "r", "h", "dc", "decoded"):
            if flat[f"{name}_loss_weight"] < 0:
                raise ValueError(f"{name}_loss_weight must not be negative")
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.optim.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.optim.lr}")
        crop, scale = self.data.crop, pair_scale(self.src, self.dst)
        if (crop * scale) != int(crop * scale) or crop * scale < 1:
            raise ValueError(f"crop {crop} times the {self.src}->{self.dst} scale {scale} must be a whole number")

    @property
    def uses_secondary(self) -> bool:
        return any(getattr(self.loss, f"{n}_loss_weight") > 0 for n in ("b", "r", "h"))

    @property
    def architecture(self) -> str:
        """config.json's name of the network (interposer.weights.ARCHITECTURES)."""
        return ARCH_NAMES[self.model.arch]

    def model_args(self, reverse: bool = False) -> dict:
        s, d = (self.dst, self.src) if reverse else (self.src, self.dst)
        return default_args(s, d) | dict(ch_mid=self.model.ch_mid, blocks=self.model.blocks)  # the pair's, our size


# city96 v4 keys that have no counterpart here, and what replaces each (named in one warning)
_CITY96_INSTEAD = {"device": "--gpu", "resume": "rerun the same command to resume", "dataset": "--data",
                   "eval_model": "interposer eval", "save_image": "interposer eval writes eval.json",
                   "save_every": "--checkpoint-every", "eval": "--eval-every", "model.rev": "--rev"}
# city96 v4 keys that name a value of ours under another name
_CITY96_RENAMED = {"model.src": "src", "model.dst": "dst", "model.args.ch_mid": "ch_mid",
                   "model.args.blocks": "blocks"}
_CITY96_DERIVED = ("model.args.ch_in", "model.args.ch_out", "model.args.scale")  # checked against src/dst


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
    """Flat keys (`lr: 1e-3`), grouped keys (`optim: {lr: 1e-3}`) or city96 v4 keys (model.src/dst/args,
    optim.lr, cosine, ...) -> TrainConfig, with `overrides` (command-line flags; None = not given) on top."""
    flat = _flatten(raw or {})
    top = ("src", "dst", "seed")
    values, derived, ignored, unknown = {}, {}, [], []
    for key, value in flat.items():
        group, _, name = key.rpartition(".")
        if key in top or key in FLAT:
            values[key] = value
        elif group in GROUPS and FLAT.get(name) == group:
            values[name] = value
        elif key in _CITY96_RENAMED:
            values[_CITY96_RENAMED[key]] = value
        elif key in _CITY96_DERIVED:
            derived[key] = value
        elif any(key == k or key.startswith(k + ".") for k in _CITY96_INSTEAD):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        known = ", ".join(sorted([*top, *FLAT]))
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {known}")
    if ignored:
        def named(key: str) -> str:
            instead = _CITY96_INSTEAD.get(key) or _CITY96_INSTEAD.get(key.split(".")[0])
            return f"{key} ({instead})" if instead else key

        listed = ", ".join(map(named, sorted(ignored)))
        warnings.warn(f"{where}: ignoring key(s) that do not apply here: {listed}", stacklevel=2)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig.of(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    args = cfg.model_args()
    for key, value in derived.items():  # city96 spells out what the spaces imply: it must agree
        name = key.rsplit(".", 1)[1]
        if float(value) != float(args[name]):
            raise ValueError(f"{where}: {key} is {value}, but {cfg.src} -> {cfg.dst} needs {args[name]}; "
                             "fix the file or --src/--dst")
    return cfg


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


