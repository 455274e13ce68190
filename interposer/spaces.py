"""The latent-space registry: one `LatentSpace` entry per space, nothing else to edit.

Each entry says what a raw latent of that space looks like (channels, spatial factor), how diffusion
pipelines scale it (the *scaled* layout), which diffusers VAE class makes it and where users get that
VAE by default. Interposers map **raw** latents: the VAE encoder's output before any scale or shift.

    >>> from interposer.spaces import get_space
    >>> get_space("sdxl").code, get_space("sdxl").channels
    ('xl', 4)

Scaled layout, for spaces with a factor:  scaled = (raw - shift) * scale.
Scaled layout, for per-channel stats:    scaled = (raw - mean[c]) / std[c].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

Scaling = Literal["factor", "per_channel", "vae_batchnorm"]


@dataclass(frozen=True)
class LatentSpace:
    code: str  # short name used in file names and flags, e.g. "xl"
    family: str  # human name of the models that use it
    channels: int  # channels of the raw latent
    factor: int  # pixels per latent pixel along each side
    vae_class: str  # diffusers class name, imported only by pipeline/
    vae_repo: str  # default Hugging Face repo id of the VAE
    vae_subfolder: str | None = None  # subfolder of vae_repo holding the VAE, if any
    aliases: tuple[str, ...] = ()  # other names accepted anywhere a space is named
    scaling: Scaling = "factor"  # how pipelines turn raw latents into model inputs
    scale: float = 1.0  # "factor": multiply after the shift
    shift: float = 0.0  # "factor": subtract before the scale
    mean: tuple[float, ...] | None = None  # "per_channel": per-channel mean of raw latents
    std: tuple[float, ...] | None = None  # "per_channel": per-channel std of raw latents
    vae_module: str = "diffusers"  # module that exports vae_class
    fp16_ok: bool = True  # False where the default VAE makes NaN/inf in fp16
    video: bool = False  # latents may carry a time axis (B, C, T, H, W)
    notes: str = ""  # what a user should know
    decoder: bool = True  # False for encoder-only VAEs: nothing decodes this space's latents to pixels

    def __post_init__(self):
        if self.scaling == "per_channel" and (
            self.mean is None or self.std is None or len(self.mean) != self.channels or len(self.std) != self.channels
        ):
            raise ValueError(f"space {self.code!r}: per_channel scaling needs mean and std of {self.channels} values")
        if self.factor < 1 or self.channels < 1:
            raise ValueError(f"space {self.code!r}: channels and factor must be positive")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.code, *self.aliases)

    def to_dict(self) -> dict:
        """Everything this entry holds, JSON-ready: what a dataset manifest and an exported model record."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpace":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    def describe(self) -> str:
        """One line: what makes two definitions of a space the same or different."""
        how = (f"scale {self.scale:g}, shift {self.shift:g}" if self.scaling == "factor" else self.scaling)
        return (f"{self.code}: {self.channels} channels, factor {self.factor}, {self.vae_class} from "
                f"{self.vae_repo}{':' + self.vae_subfolder if self.vae_subfolder else ''}, {how}"
                + (", video" if self.video else ""))

    def same_latents(self, other: "LatentSpace") -> bool:
        """Whether two definitions describe the same latents (names, notes and aliases aside)."""
        keys = ("channels", "factor", "vae_class", "scaling", "scale", "shift", "mean", "std", "video")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) broadcastable over x's channel axis (dim 1), in x's dtype and device."""
        if self.scaling == "factor":
            shift = torch.tensor(self.shift, dtype=torch.float32)
            scale = torch.tensor(self.scale, dtype=torch.float32)
        elif self.scaling == "per_channel":
            view = (self.channels,) + (1,) * (x.dim() - 2)
            shift = torch.tensor(self.mean, dtype=torch.float32).view(view)
            scale = (1.0 / torch.tensor(self.std, dtype=torch.float32)).view(view)
        else:
            raise ValueError(
                f"space {self.code!r} keeps its scaling in its VAE's batch-norm statistics (and pipelines "
                "patchify it); pass raw latents (layout='raw')"
            )
        return shift.to(x.device), scale.to(x.device)

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """raw VAE latents (B, C, ...) -> the scaled latents diffusion pipelines feed their models."""
        shift, scale = self._stats(raw)
        return ((raw.float() - shift) * scale).to(raw.dtype)

    def to_raw(self, scaled: torch.Tensor) -> torch.Tensor:
        """scaled pipeline latents (B, C, ...) -> raw VAE latents, the inverse of `to_scaled`."""
        shift, scale = self._stats(scaled)
        return (scaled.float() / scale + shift).to(scaled.dtype)


# Wan 2.1's per-channel statistics, as in diffusers' AutoencoderKLWan config (latents_mean / latents_std).
_WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
_WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip

SPACES: tuple[LatentSpace, ...] = (
    LatentSpace(
        code="v1", family="Stable Diffusion 1.x / 2.x", channels=4, factor=8,
        vae_class="AutoencoderKL", vae_repo="stabilityai/sd-vae-ft-mse",
        aliases=("sd1", "sd15", "sd1.5", "sd2", "sdv1"), scale=0.18215,
    ),
    LatentSpace(
        code="xl", family="SDXL (also AuraFlow, PixArt-Sigma)", channels=4, factor=8,
        vae_class="AutoencoderKL", vae_repo="madebyollin/sdxl-vae-fp16-fix",
        aliases=("sdxl", "auraflow", "pixart"), scale=0.13025,
        notes="SDXL's original VAE makes NaN in fp16; the default is the fp16-fix VAE",
    ),
    LatentSpace(
        code="v3", family="Stable Diffusion 3 / 3.5", channels=16, factor=8,
        vae_class="AutoencoderKL", vae_repo="stabilityai/stable-diffusion-3-medium-diffusers", vae_subfolder="vae",
        aliases=("sd3", "sd35", "sd3.5"), scale=1.5305, shift=0.0609,
    ),
    LatentSpace(
        code="fx", family="Flux.1 (also HiDream, Lumina 2)", channels=16, factor=8,
        vae_class="AutoencoderKL", vae_repo="black-forest-labs/FLUX.1-schnell", vae_subfolder="vae",
        aliases=("flux", "flux1", "hidream", "lumina2"), scale=0.3611, shift=0.1159, fp16_ok=False,
        notes="Flux pipelines pack 2x2 patches; interposers take unpacked (B, 16, H/8, W/8) latents",
    ),
    LatentSpace(
        code="fx2", family="Flux.2", channels=32, factor=8,
        vae_class="AutoencoderKLFlux2", vae_repo="black-forest-labs/FLUX.2-dev", vae_subfolder="vae",
        aliases=("flux2",), scaling="vae_batchnorm", fp16_ok=False,
        notes="raw latents before the 2x2 patchify; pipeline scaling is the VAE's batch-norm statistics",
    ),
    LatentSpace(
        code="wan", family="Wan 2.1 / Qwen-Image", channels=16, factor=8,
        vae_class="AutoencoderKLWan", vae_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", vae_subfolder="vae",
        aliases=("wan21", "qwen", "qwen-image"), scaling="per_channel", mean=_WAN_MEAN, std=_WAN_STD, video=True,
        notes="video latents are (B, 16, T, H/8, W/8); an image is one frame",
    ),
    LatentSpace(
        code="ca", family="Stable Cascade stage A/B", channels=4, factor=4,
        vae_class="PaellaVQModel", vae_repo="stabilityai/stable-cascade", vae_subfolder="vqgan",
        aliases=("cascade", "sc"), scale=1 / 0.43,
        vae_module="diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model",
        notes="stage A downsamples 4x, not 8x: interposers from ca resample by 0.5",
    ),
)  # fmt: skip

_BY_NAME: dict[str, LatentSpace] = {}
for _space in SPACES:
    for _name in _space.names:
        if _name.lower() in _BY_NAME:
            raise ValueError(f"latent space name {_name!r} is used twice in the registry")
        _BY_NAME[_name.lower()] = _space
_REGISTERED: dict[str, LatentSpace] = {}  # spaces defined at run time: by a VAE, a manifest, an export


def space_names() -> str:
    """'v1 (sd1, ...), xl (...), ...' for error messages."""
    return ", ".join(f"{s.code} ({', '.join(s.aliases)})" if s.aliases else s.code
                     for s in (*SPACES, *_REGISTERED.values()))


def all_spaces() -> tuple[LatentSpace, ...]:
    """The registry's spaces, then those registered in this process."""
    return (*SPACES, *_REGISTERED.values())


def is_builtin(name: str) -> bool:
    return str(name).strip().lower() in _BY_NAME


def register_space(space: LatentSpace | dict) -> LatentSpace:
    """Make a space defined outside the registry (by its VAE; read from a dataset manifest or an exported
    model) known to get_space() in this process. Registering the same definition again is a no-op; a name
    that a registry space or another registered space already uses for other latents is refused with both
    descriptions. A registry space's own definition is accepted as it is (manifests record every space)."""
    space = LatentSpace.from_dict(space) if isinstance(space, dict) else space
    for name in space.names:
        known = _BY_NAME.get(name.lower()) or _REGISTERED.get(name.lower())
        if known is not None and not known.same_latents(space):
            where = "the registry's" if is_builtin(name) else "an already registered"
            raise ValueError(f"latent space name {name!r} is taken by {where} {known.describe()}; this one is "
                             f"{space.describe()}: give the new space another name")
    if is_builtin(space.code):
        return _BY_NAME[space.code.lower()]
    for name in space.names:
        _REGISTERED.setdefault(name.lower(), space)
    return _REGISTERED[space.code.lower()]


def get_space(name: str | LatentSpace) -> LatentSpace:
    """The registry entry for a code name or alias (case-insensitive), or a space registered in this
    process; ValueError listing the known ones."""
    if isinstance(name, LatentSpace):
        return name
    key = str(name).strip().lower()
    space = _BY_NAME.get(key) or _REGISTERED.get(key)
    if space is None:
        raise ValueError(f"unknown latent space {name!r}; known spaces: {space_names()} (a space of your own: "
                         f"--space {name}=VAE_FOLDER_OR_REPO defines it from its VAE)")
    return space


# --- the v4.0 interposers that city96/SD-Latent-Interposer released (Hub subfolder "v4.0") ---

RELEASE_REPO = "city96/SD-Latent-Interposer"
RELEASE_VERSION = "v4.0"
RELEASED_PAIRS: tuple[tuple[str, str], ...] = (
    ("v1", "xl"), ("xl", "v1"),
    ("v1", "v3"), ("xl", "v3"),
    ("v3", "v1"), ("v3", "xl"), ("fx", "v1"), ("fx", "xl"),
    ("fx", "v3"),
    ("ca", "v1"), ("ca", "xl"), ("ca", "v3"),
)  # fmt: skip


def pair_scale(src: str | LatentSpace, dst: str | LatentSpace) -> float:
    """Spatial resampling of a src -> dst interposer: 0.5 for ca (4x) -> an 8x space."""
    return get_space(src).factor / get_space(dst).factor


def default_args(src: str | LatentSpace, dst: str | LatentSpace) -> dict:
    """Constructor arguments of the v4.0 architecture for a pair (those of every released pair)."""
    s, d = get_space(src), get_space(dst)
    return dict(ch_in=s.channels, ch_out=d.channels, ch_mid=64, blocks=12, scale=pair_scale(s, d))


def release_filename(src: str, dst: str, version: str = RELEASE_VERSION) -> str:
    """'xl-to-v1_interposer-v4.0.safetensors', the released file layout."""
    return f"{get_space(src).code}-to-{get_space(dst).code}_interposer-{version}.safetensors"


def is_released(src: str, dst: str) -> bool:
    return (get_space(src).code, get_space(dst).code) in RELEASED_PAIRS


def released_pairs_text() -> str:
    return ", ".join(f"{a}->{b}" for a, b in RELEASED_PAIRS)
