"""The v4.0 interposer network: raw latents of one space -> raw latents of another.

Module names and shapes match city96's released v4.0 checkpoints key for key, so those files load with
`strict=True`. The network is built from its constructor arguments alone (no guessing from file names):

    head  ExtractBlock(ch_in -> ch_mid): relu(short(x) + long(x))
    core  nearest resample by `scale`, `blocks` x ResBlock(ch_mid), BatchNorm, SiLU
    tail  3x3 conv ch_mid -> ch_out

    >>> import torch
    >>> from interposer.model import InterposerModel
    >>> net = InterposerModel(ch_in=4, ch_out=16, scale=1.0).eval()
    >>> net(torch.randn(1, 4, 32, 32)).shape
    torch.Size([1, 16, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _in_place() -> bool:
    """Whether activations may be overwritten: only when autograd records nothing (no_grad, inference_mode).
    In-place ops give bit-identical results and skip a fresh buffer per op: 5-10% of a CPU forward pass."""
    return not torch.is_grad_enabled()


class _SiLU(nn.Module):
    """nn.SiLU, in place when _in_place() (no parameters, so state-dict keys are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x, inplace=_in_place())


def _branch(ch_in: int, ch_out: int) -> nn.Sequential:
    # conv, SiLU, conv, SiLU, conv, dropout: the "long" path of every block in v4.0
    return nn.Sequential(
        nn.Conv2d(ch_in, ch_out, 3, padding=1),
        _SiLU(),
        nn.Conv2d(ch_out, ch_out, 3, padding=1),
        _SiLU(),
        nn.Conv2d(ch_out, ch_out, 3, padding=1),
        nn.Dropout(0.1),
    )


class ExtractBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.short = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.long = _branch(ch_in, ch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_place():
            return self.long(x).add_(self.short(x)).relu_()
        return F.relu(self.long(x) + self.short(x))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(ch)
        self.long = _branch(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # the residual is the *normalised* input, as in v4.0
        if _in_place():
            return self.long(x).add_(x).relu_()
        return F.relu(self.long(x) + x)


class Resample(nn.Module):
    """Nearest-neighbour resampling by a fixed factor; identity (no copy) at 1.0."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def check_args(ch_in: int, ch_out: int, ch_mid: int, blocks: int, scale: float) -> None:
    """The constructor arguments every interposer network shares, checked (ValueError naming the argument)."""
    for name, value in (("ch_in", ch_in), ("ch_out", ch_out), ("ch_mid", ch_mid)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")


class InterposerModel(nn.Module):
    """raw latents (B, ch_in, H, W) -> raw latents (B, ch_out, H*scale, W*scale)."""

    architecture = "interposer-v4"  # config.json's name for this network (interposer.weights.ARCHITECTURES)
    # Set by the loaders (interposer.weights), not by the constructor: what the network converts.
    src: str | None = None
    dst: str | None = None
    version: str | None = None
    source: str | None = None  # the file, folder or repo it was loaded from

    def __init__(self, ch_in: int = 4, ch_out: int = 4, ch_mid: int = 64, blocks: int = 12, scale: float = 1.0):
        super().__init__()
        check_args(ch_in, ch_out, ch_mid, blocks, scale)
        self.ch_in, self.ch_out, self.ch_mid, self.blocks, self.scale = ch_in, ch_out, ch_mid, blocks, float(scale)
        self.head = ExtractBlock(ch_in, ch_mid)
        self.core = nn.Sequential(
            Resample(scale),
            *[ResBlock(ch_mid) for _ in range(blocks)],
            nn.BatchNorm2d(ch_mid),
            _SiLU(),
        )
        self.tail = nn.Conv2d(ch_mid, ch_out, 3, padding=1)

    def args(self) -> dict:
        """The constructor arguments: everything needed to rebuild this network."""
        return dict(ch_in=self.ch_in, ch_out=self.ch_out, ch_mid=self.ch_mid, blocks=self.blocks, scale=self.scale)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """v4.0 training init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.ch_in:
            raise ValueError(f"expected latents of shape (B, {self.ch_in}, H, W), got {tuple(x.shape)}")
        y = self.head(x)  # (B, ch_mid, H, W)
        z = self.core(y)  # (B, ch_mid, H*scale, W*scale)
        return self.tail(z)  # (B, ch_out, H*scale, W*scale)
