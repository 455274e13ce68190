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

from interposer.settings import (add_flags, at_least, check_settings, flag_name, fraction, given, not_negative, positive,
                                 resumable, setting)
from interposer.spaces import default_args, get_space, pair_scale


Arch = Literal["auto", "v4", "shuffle", "universal"]
ARCH_NAMES = {"v4": "interposer-v4", "shuffle": "interposer-shuffle",
              "universal": "interposer-universal"}  # -> interposer.weights.ARCHITECTURES
# the learning rate each network was tuned for (v4: city96's 50k-step recipe; shuffle: bench/quality.py's budget;
# universal: normalised like shuffle, no BatchNorm)
RECIPE_LR = {"v4": 5e-4, "shuffle": 2e-3, "universal": 2e-3}


@dataclass
class ModelConfig:
    ch_mid: int = setting(64, "network width", at_least(1))
    blocks: int = setting(12, "residual blocks", at_least(0))
    arch: Arch = setting("auto", "network: v4 (city96's layout; released files), shuffle (pixel (un)shuffle "
                         "resampling, normalised, with a linear path), universal (one network for every ordered "
                         "pair of --spaces; --universal says the same); default auto: v4 where both spaces have "
                         "one spatial factor, shuffle where they differ")


@dataclass
class UniversalConfig:
    spaces: str = setting("", "universal: the spaces, comma-separated (default: every space of the dataset)",
                          metavar="A,B,...")
    pair_weights: str = setting("", "universal: how often a pair is drawn against the others, e.g. "
                                "'sana->fx2=3,fx2->sana=2' (default: every pair 1)", metavar="A->B=W,...")
    grid: int = setting(8, "universal: pixels per working-grid pixel (the trunk's resolution)", at_least(1))
    emb: int = setting(64, "universal: size of each space's embedding, which modulates the trunk", at_least(1))
    add_space: str = setting("", "universal: train only this new space's adapters and embedding, the rest of "
                             "--from's network frozen (every other pair stays bit-identical)", metavar="CODE")
    base: str = setting("", "universal --add-space: the universal run or export folder to start from (the "
                        "command line's --from)", flag=False)


@dataclass
class OptimConfig:
    lr: float | None = setting(None, "AdamW learning rate (default: the network's recipe, v4 5e-4, shuffle and universal "
                               "2e-3)",
                               positive)
    beta1: float = setting(0.5, "AdamW beta1", fraction)
    beta2: float = setting(0.95, "AdamW beta2", fraction)
    weight_decay: float = setting(0.01, "AdamW weight decay", not_negative)
    grad_clip: float = setting(0.0, "max gradient norm; 0: off", not_negative)


@dataclass
class ScheduleConfig:
    steps: int = setting(50_000, "optimizer steps in all", at_least(1))
    fconst: int = setting(30_000, "steps at constant learning rate first; 0: decay over the whole run", at_least(0))
    cosine: bool = setting(True, "then a cosine decay to 1e-8 at the last step (off: constant throughout)")


@dataclass
class LossConfig:
    p_loss_weight: float = setting(1.0, "L1(primary(src), dst)", not_negative)
    b_loss_weight: float = setting(0.0, "L1(secondary(dst), src)", not_negative)
    r_loss_weight: float = setting(0.0, "L1(secondary(primary(src)), src): the round trip through both",
                                   not_negative)
    h_loss_weight: float = setting(0.0, "L1(primary(secondary(dst)), dst)", not_negative)
    dc_loss_weight: float = setting(0.0, "L1 between per-channel means of primary(src) and dst (colour shift)",
                                    not_negative)
    decoded_loss_weight: float = setting(0.0, "L1 in pixels through the frozen target decoder (colour, hue)",
                                         not_negative)
    decoded_every: int = setting(10, "steps between decoded-space losses", at_least(1))
    decoded_crop: int = setting(8, "target latent pixels decoded per sample (small: the decoder is costly)",
                                at_least(1))


@dataclass
class DataConfig:
    batch: int = setting(128, "global batch of crops, split evenly over the workers", at_least(1))
    crop: int = setting(32, "crop side in source latent pixels (the target crop follows the factors); universal: "
                        "in working-grid pixels", at_least(1))
    val_fraction: float = setting(0.02, "share of images (never tiles) held out for validation, chosen by image "
                                  "id; 0: none", fraction)


@dataclass
class LogConfig:
    log_every: int = setting(50, "steps between progress lines and TensorBoard points", at_least(1),
                             resumable=True)
    eval_every: int = setting(1000, "steps between validation L1 evaluations", at_least(1), resumable=True)
    eval_tiles: int = setting(64, "validation tiles per evaluation (whole tiles; only these are read)",
                              at_least(1), resumable=True)


@dataclass
class CheckpointConfig:
    checkpoint_every: int = setting(1000, "steps between checkpoints", at_least(1), resumable=True)
    num_to_keep: int = setting(3, "checkpoints kept", at_least(1), resumable=True)
    fallback_checkpoint: bool = setting(False, "if the latest checkpoint is unreadable (e.g. truncated), resume "
                                        "from the previous one (off: stop with an error naming it)",
                                        resumable=True)
    preemption_check_every: int = setting(20, "steps between checks for a spot-preemption notice (a barrier)",
                                          at_least(1), resumable=True)


@dataclass
class ResourceConfig:
    workers: int = setting(1, "Ray Train workers (DDP ranks)", at_least(1))
    gpu: bool = setting(False, "one GPU per worker, bf16 autocast")
    cpus_per_worker: int = setting(0, "CPUs (and torch threads) per worker; 0: the cluster's CPUs / workers "
                                   "without GPUs, 1 with them", at_least(0), resumable=True)
    max_failures: int = setting(3, "worker failures Ray Train recovers from by itself, from the latest "
                                "checkpoint; -1: always", at_least(-1), resumable=True)


GROUPS = dict(model=ModelConfig, universal=UniversalConfig, optim=OptimConfig, schedule=ScheduleConfig, loss=LossConfig, data=DataConfig,
              log=LogConfig, checkpoint=CheckpointConfig, resources=ResourceConfig)
# every setting's flat name (the command-line flag and the YAML key) -> its group
FLAT = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
RESUMABLE = resumable(*GROUPS.values())  # settings that do not change what is computed: a resume may change them


@dataclass
class TrainConfig:
    """What a run computes and how it runs, in groups. `TrainConfig.of(lr=1e-3, steps=10)` takes the flat
    names users type (flags, YAML keys); `cfg.optim.lr` reads them."""

    src: str = "xl"  # source latent space (the primary model's input); a universal run clears it (every pair)
    dst: str = "v1"  # target latent space; a universal run clears it
    seed: int = setting(0, "seed of every random draw: each is a function of (seed, step, rank)", at_least(0))
    layout: Literal["raw"] = "raw"  # the networks map raw VAE latents
    model: ModelConfig = field(default_factory=ModelConfig)
    universal: UniversalConfig = field(default_factory=UniversalConfig)
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
        for part in (self, *(getattr(self, group) for group in GROUPS)):
            check_settings(part)
        if self.is_universal:
            self._check_universal()
            return
        for f in dataclasses.fields(UniversalConfig):
            if getattr(self.universal, f.name) != f.default:
                raise ValueError(f"{'--from' if f.name == 'base' else flag_name(f.name)} applies to a universal run "
                                 "(--universal)")
        self.src, self.dst = get_space(self.src).code, get_space(self.dst).code
        if self.src == self.dst:
            raise ValueError(f"src and dst are both {self.src}: nothing to train")
        if self.model.arch == "auto":  # resolved here, so that run records hold the network actually trained
            self.model.arch = "v4" if pair_scale(self.src, self.dst) == 1 else "shuffle"
        if self.optim.lr is None:
            self.optim.lr = RECIPE_LR[self.model.arch]
        if self.data.batch % self.resources.workers:
            raise ValueError(f"batch {self.data.batch} must divide evenly over {self.resources.workers} workers")
        crop, scale = self.data.crop, pair_scale(self.src, self.dst)
        if (crop * scale) != int(crop * scale) or crop * scale < 1:
            raise ValueError(f"crop {crop} times the {self.src}->{self.dst} scale {scale} must be a whole number")

    @property
    def is_universal(self) -> bool:
        return self.model.arch == "universal"

    def _check_universal(self) -> None:
        """A universal run: no src/dst (every pair of its spaces; the command line refuses --src/--dst with
        --universal), the conversion loss only."""
        self.src = self.dst = ""
        if self.optim.lr is None:
            self.optim.lr = RECIPE_LR["universal"]
        others = [n for n in ("b", "r", "h", "dc", "decoded") if getattr(self.loss, f"{n}_loss_weight")]
        if others:
            raise ValueError(f"a universal run trains the conversion loss (p) only; set "
                             f"{', '.join(n + '_loss_weight' for n in others)} to 0")
        if self.data.batch % self.resources.workers:
            raise ValueError(f"batch {self.data.batch} must divide evenly over {self.resources.workers} workers")
        u = self.universal
        if bool(u.add_space) != bool(u.base):
            raise ValueError("--add-space NEW and --from RUN go together: the new space's adapters are trained "
                             "onto RUN's universal network")
        if u.add_space:
            u.add_space = get_space(u.add_space).code
        spaces = self.space_list()
        if self.universal.spaces and len(spaces) < 2:
            raise ValueError(f"--spaces {self.universal.spaces!r}: a universal run needs at least two spaces")
        self.pair_weight_map()  # its mistakes, now

    def space_list(self) -> list[str]:
        """--spaces as codes, in the given order ([] until the driver fills it from the dataset)."""
        codes = [get_space(c.strip()).code for c in self.universal.spaces.split(",") if c.strip()]
        if len(set(codes)) != len(codes):
            raise ValueError(f"--spaces {self.universal.spaces!r} names a space twice")
        return codes

    def pair_weight_map(self) -> dict[tuple[str, str], float]:
        """--pair-weights as {(src, dst): weight}; pairs not named weigh 1."""
        out = {}
        for item in filter(None, (i.strip() for i in self.universal.pair_weights.split(","))):
            pair, _, weight = item.partition("=")
            a, arrow, b = pair.partition("->")
            if not arrow or not weight:
                raise ValueError(f"--pair-weights {item!r}: expected SRC->DST=WEIGHT, e.g. sana->fx2=3")
            try:
                w = float(weight)
                key = (get_space(a.strip()).code, get_space(b.strip()).code)
            except ValueError as e:
                raise ValueError(f"--pair-weights {item!r}: expected SRC->DST=WEIGHT ({e})") from None
            if not w >= 0 or w == float("inf"):
                raise ValueError(f"--pair-weights {item!r}: a weight is a finite number of at least 0")
            out[key] = w
        return out

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


def add_train_flags(parser) -> None:
    """A flag for every setting: the seed, then each group's fields in order."""
    add_flags(parser, TrainConfig)
    for cls in GROUPS.values():
        add_flags(parser, cls)


def train_flags_given(args) -> dict[str, Any]:
    """The settings given as flags, by flat name."""
    return {k: v for cls in (TrainConfig, *GROUPS.values()) for k, v in given(args, cls).items()}


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
    if derived and cfg.is_universal:
        raise ValueError(f"{where}: {', '.join(sorted(derived))} describe one pair's network; a universal run has "
                         "none: leave them out")
    args = cfg.model_args() if derived else {}
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


