"""Training the universal interposer: one network, every ordered pair of the run's spaces. Pure torch, no Ray.

    cfg = TrainConfig.of(arch="universal", spaces="xl,ca,fx2", steps=600, crop=16)
    net = universal_network(cfg, universal_stats(reader, cfg))
    stream = UniversalStream(reader, *pair_draws(cfg), crop=16, grid=8, batch=16, seed=0, rank=0, world=1)
    losses = universal_step(cfg, PairsForward(net), optims, stream.next(step), device)

Each step's samples are tiles, each with a pair drawn by --pair-weights (trainer.data.UniversalStream); the loss
is L1(net(x, src, dst), y) averaged over the samples, whatever their pairs. One forward over every pair of the
step (PairsForward), so DDP sees one forward per backward; the adapters of spaces a rank did not draw are unused
there (DDP is told: find_unused_parameters).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from interposer.spaces import get_space
from interposer.universal_model import UniversalInterposer

from .config import TrainConfig
from .data import PairBatch, TileReader
from .step import Losses, validation_l1

STATS_TILES = 256  # train tiles a normalising network's statistics are measured on (the first, in dataset order)


def run_spaces(cfg: TrainConfig, manifest) -> list[str]:
    """The run's spaces: --spaces, or every space of the dataset (in the manifest's order)."""
    return cfg.space_list() or list(manifest.spaces)


def pair_draws(cfg: TrainConfig, spaces: list[str]) -> tuple[list[tuple[str, str]], list[float]]:
    """(every ordered pair of `spaces` (with --add-space: those with the new space), its draw weight); a
    --pair-weights pair outside them is refused."""
    new = cfg.universal.add_space
    pairs = [(a, b) for a in spaces for b in spaces if a != b and (not new or new in (a, b))]
    named = cfg.pair_weight_map()
    unknown = [f"{a}->{b}" for a, b in named if (a, b) not in pairs]
    if unknown:
        raise ValueError(f"--pair-weights names {', '.join(unknown)}, not a pair of this run's spaces "
                         f"({', '.join(spaces)})")
    weights = [named.get(p, 1.0) for p in pairs]
    if not sum(weights) > 0:
        raise ValueError("--pair-weights gives every pair weight 0: nothing would be drawn")
    return pairs, weights


def universal_stats(reader: TileReader, cfg: TrainConfig) -> dict[str, dict]:
    """Per-channel mean and std of each space's raw latents on the first STATS_TILES train tiles: the adapters'
    normalisation (the same numbers on every rank and every resume)."""
    return {code: channel_stats(torch.from_numpy(x)) for code, x in zip(reader.spaces,
                                                                        reader.take_all("train", STATS_TILES))}


def channel_stats(latents: torch.Tensor) -> dict:
    """{mean, std}: per-channel lists over (N, C, H, W) latents, in float64 (std at least 1e-3)."""
    t = latents.double()
    return dict(mean=t.mean(dim=(0, 2, 3)).tolist(), std=t.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def universal_network(cfg: TrainConfig, spaces: list[str], stats: dict[str, dict],
                      base: dict | None = None) -> UniversalInterposer:
    """The configured universal network over `spaces`, initialised from cfg.seed. With `base` (--add-space: the
    --from network's `args` and `state`): that network plus the new space's adapters and embedding, initialised
    from cfg.seed, the only parameters that train (everything else has requires_grad off)."""
    if base is not None:
        new = cfg.universal.add_space
        net = UniversalInterposer(**base["args"])
        net.load_state_dict(base["state"])
        space = get_space(new)
        net.add_space(new, channels=space.channels, factor=space.factor, **stats.get(new, {}))
        net.init_space(new, torch.Generator().manual_seed(cfg.seed))
        net.requires_grad_(False)
        for p in net.space_parameters(new):
            p.requires_grad_(True)
        return net
    adapters = {c: dict(channels=get_space(c).channels, factor=get_space(c).factor, **stats.get(c, {}))
                for c in spaces}
    net = UniversalInterposer(adapters, ch_mid=cfg.model.ch_mid, blocks=cfg.model.blocks, grid=cfg.universal.grid,
                              emb=cfg.universal.emb)
    net.init_weights(torch.Generator().manual_seed(cfg.seed))
    return net


class PairsForward(nn.Module):
    """net over every pair of a step in one forward: [(src, dst, x)] -> [net(x, src, dst)]."""

    def __init__(self, net: UniversalInterposer):
        super().__init__()
        self.net = net

    def forward(self, groups: list[tuple[str, str, torch.Tensor]]) -> list[torch.Tensor]:
        return [self.net(x, src, dst) for src, dst, x in groups]


def universal_step(cfg: TrainConfig, model: nn.Module, optims, batches: list[PairBatch], device) -> Losses:
    """One optimizer step of `model` (a PairsForward, DDP-wrapped or not) on a step's pair batches."""
    model.train()
    for opt, _ in optims:
        opt.zero_grad(set_to_none=True)
    groups = [(b.src, b.dst, b.x.to(device, non_blocking=True)) for b in batches]
    targets = [b.y.to(device, non_blocking=True) for b in batches]
    n = sum(len(b.x) for b in batches)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        outs = model(groups)
        total = sum(F.l1_loss(o.float(), y) * len(y) for o, y in zip(outs, targets)) / n  # each sample alike
    total.backward()
    for opt, sched in optims:
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return Losses(total, {"p": float(total.detach())})


def validate_pairs(net: UniversalInterposer, val: dict[str, torch.Tensor], pairs, device) -> dict[str, float]:
    """Validation L1 over whole tiles: `val_l1` (the mean over pairs) and `val_l1/SRC->DST` for each pair."""
    per = {f"val_l1/{s}->{d}": validation_l1(net.pair(s, d), val[s], val[d], device) for s, d in pairs}
    return {"val_l1": sum(per.values()) / len(per), **per}
