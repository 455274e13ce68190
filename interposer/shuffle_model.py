"""The resampling interposer: for pairs whose spatial factors differ (Cascade /4, DC-AE /32, ...).

The v4.0 network resamples by nearest neighbour right after its first block: going from /8 to /32 it keeps
one latent pixel in sixteen. This one keeps everything: pixel (un)shuffle moves space into channels and back,
so each output pixel sees every input pixel it covers. It also learns in normalised units (each space's
per-channel mean and std, measured on the training data and kept as constructor arguments) and carries a
linear path beside the network (a 1x1 map of the same (un)shuffled input), so it starts as a linear map
that already sees all k*k input pixels and learns what a linear map cannot.

    down (scale 1/k):  unshuffle(k) -> ExtractBlock(ch_in*k*k -> ch_mid) -> blocks x ResBlock -> BN, SiLU, conv
    up   (scale k):    ExtractBlock -> blocks_low x ResBlock (default blocks // 6) -> conv to ch_mid*k*k -> shuffle(k)
                       -> (blocks - blocks_low) x ResBlock at the output grid -> BN, SiLU, conv
    same factor:       ExtractBlock -> blocks x ResBlock -> BN, SiLU, conv   (v4's layout, plus the above)

    >>> import torch
    >>> from interposer.shuffle_model import ShuffleInterposer
    >>> net = ShuffleInterposer(ch_in=32, ch_out=32, scale=0.25).eval()   # /8 -> /32
    >>> net(torch.randn(1, 32, 32, 32)).shape
    torch.Size([1, 32, 8, 8])
"""

from __future__ import annotations

import torch
from torch import nn

from .model import ExtractBlock, ResBlock, _SiLU, check_args


def _factor(scale: float) -> int:
    k = 1 / scale if scale < 1 else scale
    if abs(k - round(k)) > 1e-6 or round(k) < 1:
        raise ValueError(f"scale must be a whole number or its inverse (1/2, 1/4, 2, 4, ...), got {scale!r}")
    return int(round(k))


def _stats(values, channels: int, name: str, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((1, channels, 1, 1), default)
    if len(values) != channels:
        raise ValueError(f"{name} needs {channels} values (one per channel), got {len(values)}")
    t = torch.tensor([float(v) for v in values]).view(1, channels, 1, 1)
    if name.endswith("std") and not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive")
    return t


class ShuffleInterposer(nn.Module):
    """raw latents (B, ch_in, H, W) -> raw latents (B, ch_out, H*scale, W*scale)."""

    architecture = "interposer-shuffle"  # config.json's name for this network (interposer.weights.ARCHITECTURES)
    src: str | None = None  # set by the loaders, as for InterposerModel
    dst: str | None = None
    version: str | None = None
    source: str | None = None

    def __init__(self, ch_in: int = 4, ch_out: int = 4, ch_mid: int = 64, blocks: int = 12, scale: float = 1.0,
                 blocks_low: int | None = None, in_mean: list[float] | None = None, in_std: list[float] | None = None,
                 out_mean: list[float] | None = None, out_std: list[float] | None = None):
        super().__init__()
        check_args(ch_in, ch_out, ch_mid, blocks, scale)
        k = _factor(scale)
        up = scale > 1
        if blocks_low is None:  # upsampling: a sixth of the blocks on the coarse grid, the rest on the fine one
            blocks_low = blocks // 6 if up else blocks  # (bench/quality.py, sana -> fx2: 2 of 12 low gave 21.00 dB,
            #                                              4 gave 20.87, 8 gave 19.89)
        if not 0 <= blocks_low <= blocks:
            raise ValueError(f"blocks_low must be in [0, blocks], got {blocks_low!r}")
        if not up:
            blocks_low = blocks
        self.ch_in, self.ch_out, self.ch_mid, self.blocks, self.scale = ch_in, ch_out, ch_mid, blocks, float(scale)
        self.blocks_low, self.k, self.up = blocks_low, k, up
        self.register_buffer("in_mean", _stats(in_mean, ch_in, "in_mean", 0.0))
        self.register_buffer("in_std", _stats(in_std, ch_in, "in_std", 1.0))
        self.register_buffer("out_mean", _stats(out_mean, ch_out, "out_mean", 0.0))
        self.register_buffer("out_std", _stats(out_std, ch_out, "out_std", 1.0))
        self.given_stats = dict(in_mean=in_mean, in_std=in_std, out_mean=out_mean, out_std=out_std)

        down = k if not up and k > 1 else 1
        self.unshuffle = nn.PixelUnshuffle(down) if down > 1 else nn.Identity()
        self.head = ExtractBlock(ch_in * down * down, ch_mid)
        self.low = nn.Sequential(*[ResBlock(ch_mid) for _ in range(blocks_low)])
        self.expand = nn.Sequential(nn.Conv2d(ch_mid, ch_mid * k * k, 3, padding=1), nn.PixelShuffle(k)) \
            if up else nn.Identity()
        self.high = nn.Sequential(*[ResBlock(ch_mid) for _ in range(blocks - blocks_low)])
        self.out = nn.Sequential(nn.BatchNorm2d(ch_mid), _SiLU())
        self.tail = nn.Conv2d(ch_mid, ch_out, 3, padding=1)
        # the linear path: a 1x1 map of the (un)shuffled input, so every output pixel sees its k*k input pixels
        self.linear = nn.Conv2d(ch_in * down * down, ch_out * (k * k if up else 1), 1)
        self.linear_shuffle = nn.PixelShuffle(k) if up else nn.Identity()

    def args(self) -> dict:
        """The constructor arguments: everything needed to rebuild this network."""
        return dict(ch_in=self.ch_in, ch_out=self.ch_out, ch_mid=self.ch_mid, blocks=self.blocks, scale=self.scale,
                    blocks_low=self.blocks_low, **{k: [float(v) for v in getattr(self, k).flatten()]
                                                   for k in ("in_mean", "in_std", "out_mean", "out_std")})

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """v4.0's init (conv N(0, 0.02), BatchNorm N(1, 0.02)); the tail starts at zero, so the network starts as
        its linear path and learns the rest as a residual."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.ch_in:
            raise ValueError(f"expected latents of shape (B, {self.ch_in}, H, W), got {tuple(x.shape)}")
        if not self.up and self.k > 1 and (x.shape[-1] % self.k or x.shape[-2] % self.k):
            raise ValueError(f"latent sides {tuple(x.shape[-2:])} must be multiples of {self.k} (the /{self.k} "
                             "resampling)")
        x = self.unshuffle((x - self.in_mean) / self.in_std)  # (B, ch_in*d*d, H/d, W/d), normalised
        y = self.low(self.head(x))  # (B, ch_mid, H/d, W/d)
        y = self.high(self.expand(y))  # (B, ch_mid, H*scale, W*scale)
        y = self.tail(self.out(y)) + self.linear_shuffle(self.linear(x))  # (B, ch_out, H*scale, W*scale)
        return y * self.out_std + self.out_mean
