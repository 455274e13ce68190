"""The pure-torch training step: models, the v4 losses, the LR schedule, one optimizer step. No Ray here,
so the same code runs in Ray Train workers, in `bench/train.py`'s bare loop and on a GPU machine without Ray.

Losses (L1 each, weighted; the v4.0 recipe):
    p  primary(src)              vs dst      the conversion itself
    b  secondary(dst)            vs src      the reverse model on its own
    r  secondary(primary(src))   vs src      round trip through both
    h  primary(secondary(dst))   vs dst      round trip the other way
    dc per-channel means of primary(src) vs dst        (optional: colour shift)
    decoded  frozen dst decoder(primary(src)) vs decoder(dst) on small crops every k steps (optional)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interposer.model import InterposerModel
from interposer.weights import network_class

from .config import TrainConfig


def latent_stats(src, dst) -> dict:
    """Per-channel mean and std of (N, C, h, w) src and dst latents: the shuffle network's normalisation."""
    m = lambda x: x.double().mean(dim=(0, 2, 3))  # noqa: E731
    sd = lambda x: x.double().std(dim=(0, 2, 3)).clamp_min(1e-3)  # noqa: E731
    return dict(in_mean=m(src).tolist(), in_std=sd(src).tolist(), out_mean=m(dst).tolist(), out_std=sd(dst).tolist())


def network(cfg: TrainConfig, reverse: bool = False, stats: dict | None = None):
    """The configured network for src -> dst (reverse: dst -> src); `stats` (latent_stats of the train split)
    normalise the shuffle network (v4 has none)."""
    cls = network_class(cfg.architecture)
    if cls is InterposerModel:
        return cls(**cfg.model_args(reverse))
    stats = dict(stats or {})
    if reverse and stats:
        stats = dict(in_mean=stats["out_mean"], in_std=stats["out_std"], out_mean=stats["in_mean"],
                     out_std=stats["in_std"])
    return cls(**cfg.model_args(reverse), **stats)


def build_models(cfg: TrainConfig, stats: dict | None = None):
    """(primary src->dst, secondary dst->src), initialised as in v4.0 from cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # conv biases keep torch's default init, drawn from the global RNG
        primary, secondary = network(cfg, False, stats), network(cfg, True, stats)
    primary.init_weights(g)
    secondary.init_weights(g)
    return primary, secondary


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.optim.lr at `step`: 1 for fconst steps, then cosine down to 1e-8 / lr at the last step."""
    s = cfg.schedule
    if not s.cosine or step < s.fconst or s.steps <= s.fconst:
        return 1.0
    t = min(1.0, (step - s.fconst) / max(1, s.steps - s.fconst))
    floor = 1e-8 / cfg.optim.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_optim(cfg: TrainConfig, model: torch.nn.Module):
    """AdamW and its schedule over the parameters of `model` that train (requires_grad)."""
    o = cfg.optim
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


@dataclass
class Losses:
    total: torch.Tensor
    parts: dict[str, float]


def compute_losses(cfg: TrainConfig, primary, secondary, src: torch.Tensor, dst: torch.Tensor,
                   decoder=None, step: int = 0) -> Losses:
    """The weighted v4 losses for one batch of aligned crops (src (B, Cs, h, w), dst (B, Cd, h', w'))."""
    zero = src.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    out = primary(src) if (cfg.loss.p_loss_weight or cfg.loss.r_loss_weight or cfg.loss.dc_loss_weight
                           or cfg.loss.decoded_loss_weight) else None
    if cfg.loss.p_loss_weight:
        parts["p"] = F.l1_loss(out, dst)
    if cfg.loss.b_loss_weight or cfg.loss.h_loss_weight:
        back = secondary(dst)
        if cfg.loss.b_loss_weight:
            parts["b"] = F.l1_loss(back, src)
        if cfg.loss.h_loss_weight:
            parts["h"] = F.l1_loss(primary(back), dst)
    if cfg.loss.r_loss_weight:
        parts["r"] = F.l1_loss(secondary(out), src)
    if cfg.loss.dc_loss_weight:
        parts["dc"] = F.l1_loss(out.mean(dim=(2, 3)), dst.mean(dim=(2, 3)))
    if cfg.loss.decoded_loss_weight and decoder is not None and step % cfg.loss.decoded_every == 0:
        c = min(cfg.loss.decoded_crop, out.shape[-1])
        pred = decoder(out[..., :c, :c])  # (B, 3, c*f, c*f): gradients flow through the frozen decoder
        with torch.no_grad():
            target = decoder(dst[..., :c, :c])
        parts["decoded"] = F.l1_loss(pred, target)
    total = zero
    for name, value in parts.items():
        total = total + getattr(cfg.loss, f"{name}_loss_weight") * value
    return Losses(total, {k: float(v.detach()) for k, v in parts.items()})


def train_step(cfg: TrainConfig, primary, secondary, optims, src, dst, device, decoder=None, step: int = 0) -> Losses:
    """One optimizer step on every model that has a loss; bf16 autocast on GPU, fp32 on CPU."""
    primary.train()
    secondary.train()
    src, dst = src.to(device, non_blocking=True), dst.to(device, non_blocking=True)
    for opt, _ in optims:
        opt.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        losses = compute_losses(cfg, primary, secondary, src, dst, decoder, step)
    losses.total.backward()
    for opt, sched in optims:
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return losses


@torch.no_grad()
def validation_l1(model, src: torch.Tensor, dst: torch.Tensor, device, batch: int = 16) -> float:
    """Mean L1 of model(src) against dst over whole validation tiles, eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(src), batch):
        out = model(src[i : i + batch].to(device).float())
        total += F.l1_loss(out, dst[i : i + batch].to(device).float(), reduction="sum").item()
        n += out.numel()
    model.train(was_training)
    return total / max(n, 1)
