"""The universal interposer: one network for every ordered pair of its spaces.

Each space has an *input adapter* (its raw latents -> the shared working grid) and an *output adapter*
(working grid -> its raw latents); between them a *shared trunk* of residual blocks, each modulated by the
target space's learned embedding (FiLM: per-channel scale and shift). K spaces need one file and K adapter
pairs instead of K(K-1) networks; a new space is two adapters and one embedding, trained with the trunk frozen
(every other pair's outputs stay bit-identical: nothing they use changes).

    input  (space s, factor f_s):  normalise (s's mean, std) -> resample to the grid -> 3x3, SiLU, 3x3
    trunk  (ch_mid at factor grid): blocks x [FiLM(e_dst) -> SiLU, 3x3, SiLU, 3x3 -> + residual]
    output (space d, factor f_d):  3x3, SiLU -> resample from the grid -> SiLU, 3x3 -> de-normalise (d's stats)

Resampling keeps every value: a finer space (Cascade /4 onto an /8 grid) enters by pixel unshuffle and leaves by
pixel shuffle; a coarser one (DC-AE /32) enters by a 1x1 conv to ch_mid*k*k channels and pixel shuffle, and leaves
by pixel unshuffle and a 1x1 conv. There is no BatchNorm: a batch may mix pairs, and per-sample arithmetic keeps
training and inference the same.

    >>> import torch
    >>> from interposer.universal_model import UniversalInterposer
    >>> net = UniversalInterposer({"xl": dict(channels=4, factor=8), "ca": dict(channels=4, factor=4)}).eval()
    >>> net(torch.randn(1, 4, 64, 64), "ca", "xl").shape       # /4 -> /8: half the side
    torch.Size([1, 4, 32, 32])
    >>> net.pair("xl", "ca")(torch.randn(1, 4, 32, 32)).shape  # bound to one pair: what convert() runs
    torch.Size([1, 4, 64, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import _in_place, _SiLU
from .shuffle_model import _stats


def _ratio(factor: int, grid: int, code: str) -> tuple[int, bool]:
    """(k, finer): a space at `factor` reaches the grid by a k x k (un)shuffle; finer = its latents are larger."""
    big, small = max(factor, grid), min(factor, grid)
    if big % small:
        raise ValueError(f"space {code!r}: factor {factor} and the working grid's {grid} must divide one another")
    return big // small, factor < grid


def _conv(ch_in: int, ch_out: int, size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(ch_in, ch_out, size, padding=size // 2)


class InputAdapter(nn.Module):
    """raw latents of one space (B, C, H, W) -> working features (B, ch_mid, H*f/grid, W*f/grid)."""

    def __init__(self, channels: int, k: int, finer: bool, ch_mid: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        if k == 1:
            self.resample = _conv(channels, ch_mid)
        elif finer:  # k x k latent pixels -> one grid pixel, all of them kept as channels
            self.resample = nn.Sequential(nn.PixelUnshuffle(k), _conv(channels * k * k, ch_mid))
        else:  # one latent pixel -> k x k grid pixels, each its own 1x1 projection
            self.resample = nn.Sequential(_conv(channels, ch_mid), _SiLU(), _conv(ch_mid, ch_mid * k * k, 1),
                                          nn.PixelShuffle(k))
        self.mix = nn.Sequential(_SiLU(), _conv(ch_mid, ch_mid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.resample((x - self.mean) / self.std))


class OutputAdapter(nn.Module):
    """working features (B, ch_mid, h, w) -> raw latents of one space (B, C, h*grid/f, w*grid/f)."""

    def __init__(self, channels: int, k: int, finer: bool, ch_mid: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.mix = nn.Sequential(_conv(ch_mid, ch_mid), _SiLU())
        if k == 1:
            self.resample = nn.Identity()
        elif finer:  # one grid pixel -> k x k latent pixels
            self.resample = nn.Sequential(_conv(ch_mid, ch_mid * k * k, 1), nn.PixelShuffle(k))
        else:  # k x k grid pixels -> one latent pixel, all of them seen
            self.resample = nn.Sequential(nn.PixelUnshuffle(k), _conv(ch_mid * k * k, ch_mid, 1))
        self.tail = nn.Sequential(_SiLU(), _conv(ch_mid, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tail(self.resample(self.mix(h))) * self.std + self.mean


class FiLMBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x * (1 + scale) + shift)))), (scale, shift) a linear map of the target embedding."""

    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.film = nn.Linear(emb, 2 * ch)
        self.conv1, self.conv2 = _conv(ch, ch), _conv(ch, ch)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(e).view(2, 1, -1, 1, 1)  # (1, ch, 1, 1) each
        h = F.silu(torch.addcmul(shift, x, 1 + scale), inplace=_in_place())
        h = self.conv2(F.silu(self.conv1(h), inplace=_in_place()))
        return h.add_(x) if _in_place() else h + x


class UniversalInterposer(nn.Module):
    """raw latents (B, C_src, H, W) of space src -> raw latents (B, C_dst, H*f_src/f_dst, W*f_src/f_dst) of dst.

    adapters: code -> {channels, factor, mean (optional), std (optional)}, what each space's adapters are built
    from (mean and std: per-channel statistics of its raw latents, measured on the training data).
    """

    architecture = "interposer-universal"  # config.json's name for this network (interposer.weights.ARCHITECTURES)
    version: str | None = None  # set by the loaders
    source: str | None = None

    def __init__(self, adapters: dict[str, dict], ch_mid: int = 64, blocks: int = 12, grid: int = 8, emb: int = 64):
        super().__init__()
        if not isinstance(adapters, dict) or len(adapters) < 2:
            raise ValueError(f"a universal interposer needs at least two spaces, got {adapters!r}")
        for name, value in (("ch_mid", ch_mid), ("grid", grid), ("emb", emb)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
        self.ch_mid, self.blocks, self.grid, self.emb = ch_mid, blocks, grid, emb
        self.spaces: dict[str, dict] = {}
        self.inputs, self.outputs = nn.ModuleDict(), nn.ModuleDict()
        self.embed = nn.ParameterDict()
        self.trunk = nn.ModuleList([FiLMBlock(ch_mid, emb) for _ in range(blocks)])
        for code, spec in adapters.items():
            self.add_space(code, **spec)

    def add_space(self, code: str, channels: int, factor: int, mean=None, std=None) -> None:
        """Give the network adapters and an embedding for one more space (untrained: see init_space)."""
        if not isinstance(code, str) or not code or "." in code:
            raise ValueError(f"a space code must be a non-empty name without dots, got {code!r}")
        if code in self.spaces:
            raise ValueError(f"the universal interposer already has space {code!r}")
        if not isinstance(channels, int) or channels < 1 or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"space {code!r}: channels and factor must be positive integers, "
                             f"got {channels!r}, {factor!r}")
        k, finer = _ratio(factor, self.grid, code)
        m, s = _stats(mean, channels, f"{code} mean", 0.0), _stats(std, channels, f"{code} std", 1.0)
        self.inputs[code] = InputAdapter(channels, k, finer, self.ch_mid, m, s)
        self.outputs[code] = OutputAdapter(channels, k, finer, self.ch_mid, m.clone(), s.clone())
        self.embed[code] = nn.Parameter(torch.zeros(self.emb))
        self.spaces[code] = dict(channels=channels, factor=factor, mean=[float(v) for v in m.flatten()],
                                 std=[float(v) for v in s.flatten()])

    def args(self) -> dict:
        """The constructor arguments: everything needed to rebuild this network."""
        return dict(adapters={c: dict(v) for c, v in self.spaces.items()}, ch_mid=self.ch_mid, blocks=self.blocks,
                    grid=self.grid, emb=self.emb)

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of distinct spaces this network converts."""
        return [(a, b) for a in self.spaces for b in self.spaces if a != b]

    def space_parameters(self, code: str) -> list[nn.Parameter]:
        """What belongs to one space alone: its two adapters and its embedding (what add-space trains)."""
        return [*self.inputs[code].parameters(), *self.outputs[code].parameters(), self.embed[code]]

    def init_space(self, code: str, generator: torch.Generator | None = None) -> None:
        """Initialise one space's adapters (conv N(0, 0.02)) and its embedding (N(0, 1))."""
        for m in (*self.inputs[code].modules(), *self.outputs[code].modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed[code], 0.0, 1.0, generator=generator)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Convs N(0, 0.02) (v4.0's), FiLM maps start at zero (every block starts unmodulated), embeddings N(0, 1)."""
        for block in self.trunk:
            for conv in (block.conv1, block.conv2):
                nn.init.normal_(conv.weight, 0.0, 0.02, generator=generator)
                nn.init.zeros_(conv.bias)
            nn.init.zeros_(block.film.weight)
            nn.init.zeros_(block.film.bias)
        for code in self.spaces:
            self.init_space(code, generator)

    def check(self, src: str, dst: str) -> None:
        for code in (src, dst):
            if code not in self.spaces:
                raise ValueError(f"this universal interposer converts {', '.join(self.spaces)}; not {code!r}")
        if src == dst:
            raise ValueError(f"src and dst are both {src!r}: nothing to convert")

    def forward(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        self.check(src, dst)
        c, f = self.spaces[src]["channels"], self.spaces[src]["factor"]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"expected {src} latents of shape (B, {c}, H, W), got {tuple(x.shape)}")
        k, finer = _ratio(f, self.grid, src)
        if finer and (x.shape[-1] % k or x.shape[-2] % k):
            raise ValueError(f"{src} latent sides {tuple(x.shape[-2:])} must be multiples of {k} (the working grid "
                             f"is /{self.grid}, {src} is /{f})")
        kd, d_finer = _ratio(self.spaces[dst]["factor"], self.grid, dst)
        h = self.inputs[src](x)  # (B, ch_mid, H*f/grid, W*f/grid)
        if not d_finer and (h.shape[-1] % kd or h.shape[-2] % kd):
            raise ValueError(f"{src} latent sides {tuple(x.shape[-2:])} do not make whole {dst} latents "
                             f"({dst} is /{self.spaces[dst]['factor']}, {src} is /{f})")
        e = self.embed[dst]
        for block in self.trunk:
            h = block(h, e)
        return self.outputs[dst](h)  # (B, C_dst, H*f_src/f_dst, W*f_src/f_dst)

    def pair(self, src: str, dst: str) -> "UniversalPair":
        """This network bound to one pair: a module with forward(x), as a pairwise network has."""
        self.check(src, dst)
        return UniversalPair(self, src, dst)


class UniversalPair(nn.Module):
    """A universal interposer bound to src -> dst (shares its parameters): what convert() and eval run."""

    def __init__(self, model: UniversalInterposer, src: str, dst: str):
        super().__init__()
        self.model, self.src, self.dst = model, src, dst
        self.ch_in, self.ch_out = model.spaces[src]["channels"], model.spaces[dst]["channels"]
        self.scale = model.spaces[src]["factor"] / model.spaces[dst]["factor"]
        self.architecture, self.version, self.source = model.architecture, model.version, model.source

    def args(self) -> dict:
        return self.model.args()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.src, self.dst)
