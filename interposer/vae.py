"""Loading a latent space's VAE (diffusers is imported only here, and only when called: `interposer` itself
never needs it), raw encode/decode, and a space defined by its VAE.

    >>> vae = load_vae(get_space("xl"), "madebyollin/sdxl-vae-fp16-fix", None)   # or a local folder
    >>> z, std = encode_raw(vae, get_space("xl"), pixels)     # (B, 3, T, T) in [-1, 1] -> raw latents

A VAE's *source* is one of three kinds (`source_kind`):
    "diffusers"    a folder or Hub repo of a class diffusers exports (config.json names it)
    "remote_code"  a folder or Hub repo that ships its own modelling code (config.json's `auto_map`): loaded by
                   diffusers.AutoModel with trust_remote_code=True, and only when the caller passes
                   trust_remote_code (the `--trust-remote-code` flag); `code_hashes` fingerprints that code
    "single_file"  one `.safetensors` checkpoint in the original (non-diffusers) key layout, as ComfyUI and
                   A1111 keep in models/vae/: loaded by diffusers' `from_single_file`

Video VAEs (Wan) take (B, 3, T, H, W) and give (B, C, T, h, w): an image is one frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch

from .spaces import LatentSpace, is_builtin

SourceKind = Literal["diffusers", "remote_code", "single_file"]
TRUST_FLAG = "--trust-remote-code"


def vae_class(space: LatentSpace):
    return getattr(importlib.import_module(space.vae_module), space.vae_class)


def _where(source: str, subfolder: str | None) -> str:
    return f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def is_single_file(source: str) -> bool:
    return Path(source).expanduser().is_file()


def source_kind(source: str, subfolder: str | None = None) -> SourceKind:
    """What kind of VAE source this is (reads config.json of folders and Hub repos)."""
    if is_single_file(source):
        return "single_file"
    try:
        config = _vae_config(source, subfolder)
    except ValueError:  # no readable config.json: the diffusers loader says what is missing, in its words
        return "diffusers"
    return "remote_code" if config.get("auto_map") else "diffusers"


def _source_file(source: str, subfolder: str | None, name: str) -> Path:
    local = Path(source).expanduser()
    if local.is_dir():
        return local / (subfolder or "") / name
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, name, subfolder=subfolder))


def code_hashes(source: str, subfolder: str | None = None) -> dict[str, str] | None:
    """{code file: "sha256:..."} of a VAE that ships its own modelling code (the files its config.json's
    `auto_map` names), else None. What a dataset records, so that changed code is noticed."""
    if source_kind(source, subfolder) != "remote_code":
        return None
    auto = _vae_config(source, subfolder).get("auto_map")
    if not auto:
        return None
    refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    out = {}
    for name in sorted({r.split("--")[-1].rsplit(".", 1)[0].replace(".", "/") + ".py" for r in refs}):
        try:
            out[name] = "sha256:" + hashlib.sha256(_source_file(source, subfolder, name).read_bytes()).hexdigest()
        except OSError as e:
            raise ValueError(f"the VAE at {_where(source, subfolder)} names code file {name} in its auto_map, "
                             f"which cannot be read ({_first_line(e)})") from e
    return out


def check_trust(source: str, subfolder: str | None, trust_remote_code: bool,
                expected: dict[str, str] | None = None, what: str = "the VAE") -> dict[str, str] | None:
    """Refuse a VAE with its own code unless trusted; refuse code that differs from `expected` (what a dataset
    recorded when it was built), naming the file. Returns the code's hashes (None: no code of its own)."""
    hashes = code_hashes(source, subfolder)
    if hashes is None:
        return None
    if not trust_remote_code:
        named = _vae_config(source, subfolder).get("_class_name")
        raise ValueError(f"{what} at {_where(source, subfolder)} runs its own code ({named} in "
                         f"{', '.join(hashes)}): read that code, then pass {TRUST_FLAG} to run it")
    for name, digest in (expected or {}).items():
        if hashes.get(name) != digest:
            raise ValueError(f"{what} at {_where(source, subfolder)}: its code file {name} is not the one the "
                             f"dataset was built with ({hashes.get(name, 'missing')[:19]}..., dataset has "
                             f"{digest[:19]}...); restore that file, or build a new dataset")
    return hashes


def load_vae(space: LatentSpace, source: str, subfolder: str | None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", trust_remote_code: bool = False,
             code: dict[str, str] | None = None):
    """The space's VAE from `source` (a diffusers folder or Hub repo, one with its own code, or a single-file
    checkpoint), eval mode, no grad. `code`: the code hashes a dataset recorded (checked if given)."""
    where = _where(source, subfolder)
    kind = source_kind(source, subfolder)
    if kind == "single_file":
        vae = _load_single_file(space, Path(source).expanduser(), dtype)
        return vae.to(device).eval().requires_grad_(False)
    local = Path(source).expanduser() / (subfolder or "") / "config.json"
    named = _vae_config(source, subfolder).get("_class_name") if local.is_file() else None
    # A VAE with its own code loads its own weights whatever the space's class (a distilled encoder of a
    # registry space, say): its latents' shape is checked where it is used. A diffusers class would not.
    if kind == "diffusers" and isinstance(named, str) and named != space.vae_class:
        # another class's weights would load as random ones, with warnings only: refuse
        raise ValueError(f"the {space.code} space is made by {space.vae_class}, but the VAE at {where} is an "
                         f"{named}; to use it, define a new space from it: --space NEWNAME={source}")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if kind == "remote_code":
        check_trust(source, subfolder, trust_remote_code, code, f"the {space.code} VAE")
        import diffusers

        load = lambda: diffusers.AutoModel.from_pretrained(source, torch_dtype=dtype, trust_remote_code=True,  # noqa: E731
                                                           **kwargs)
    else:
        load = lambda: vae_class(space).from_pretrained(source, torch_dtype=dtype, **kwargs)  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # diffusers' own deprecation chatter
            vae = _quiet_diffusers(load)
    except (OSError, ValueError, ImportError) as e:
        if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise ValueError(f"the {space.code} VAE {where} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                             f"set: download it first, or pass --space {space.code}=/local/folder") from e
        raise ValueError(f"cannot load the {space.code} VAE ({space.vae_class}) from {where}: {_first_line(e)}") from e
    if kind == "diffusers" and type(vae).__name__ != space.vae_class:
        raise ValueError(f"the {space.code} space is made by {space.vae_class}, but the VAE at {where} is a "
                         f"{type(vae).__name__}")
    return vae.to(device).eval().requires_grad_(False)


def _quiet_diffusers(fn):
    """Run fn with diffusers' logger at error level: its notices about custom code and unused config keys
    (auto_map) are printed once per process, in every Ray worker."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return fn()
    finally:
        dlog.set_verbosity(level)


# ------------------------------------------------------------------------------------ single-file checkpoints

_LDM_PREFIXES = ("first_stage_model.", "vae.")


def _ldm_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names (without a full model's `first_stage_model.` prefix) -> shapes, read from the header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    for prefix in _LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in shapes):
            shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    return shapes


def autoencoderkl_config(path: Path, scale: float = 1.0, shift: float | None = None) -> dict:
    """The diffusers AutoencoderKL config of an original-layout (LDM) checkpoint, read from its tensor shapes:
    widths, levels, blocks per level, latent channels, quant convs, mid-block attention. GroupNorm groups are
    not in the shapes: 32, as in every released SD-family VAE (the smallest width where that is narrower)."""
    shapes = _ldm_shapes(path)
    if "encoder.conv_in.weight" not in shapes or "encoder.conv_out.weight" not in shapes:
        raise ValueError(f"{path}: not a VAE checkpoint in the original layout (no encoder.conv_in / "
                         "encoder.conv_out); give a diffusers VAE folder instead")
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    widths = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    config = dict(
        _class_name="AutoencoderKL", in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0] if "decoder.conv_out.weight" in shapes else 3,
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths, layers_per_block=blocks, latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
        norm_num_groups=min(32, min(widths)), scaling_factor=scale, shift_factor=shift,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes)
    return config


def _load_single_file(space: LatentSpace, path: Path, dtype: torch.dtype):
    """diffusers' from_single_file for the space's class: AutoencoderKL with its config read from the file's own
    tensor shapes (offline), other classes diffusers can read that way with the space's default repo's config."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors VAE files are loaded (pickled .pt/.ckpt/.bin files can run code)")
    cls = getattr(diffusers, space.vae_class, None)
    if space.vae_class not in SINGLE_FILE_LOADABLE_CLASSES or cls is None:
        raise ValueError(f"{path}: diffusers cannot read a single-file {space.vae_class} (the {space.code} space's "
                         "VAE class); give its diffusers folder or Hub repo instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if space.vae_class == "AutoencoderKL":
                config = autoencoderkl_config(path, space.scale if space.scaling == "factor" else 1.0,
                                              space.shift if space.scaling == "factor" and space.shift else None)
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "config.json").write_text(json.dumps(config))
                    vae = _quiet_diffusers(lambda: cls.from_single_file(str(path), config=tmp, torch_dtype=dtype,
                                                                        local_files_only=True))
            else:
                vae = _quiet_diffusers(lambda: cls.from_single_file(str(path), config=space.vae_repo,
                                                                    subfolder=space.vae_subfolder, torch_dtype=dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot load {path} as a single-file {space.vae_class} for {space.code}: "
                         f"{_first_line(e)}") from e
    return vae


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------- encode / decode


@torch.inference_mode()
def encode_raw(vae, space: LatentSpace, pixels: torch.Tensor, latent: str = "mean",
               seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pixels (B, 3, T, T) in [-1, 1] -> raw latents (B, C, T/f, T/f) and stds (or None), float32."""
    x = pixels.to(vae.device, vae.dtype)
    if space.video:
        x = x.unsqueeze(2)  # (B, 3, 1, T, T)
    out = vae.encode(x)
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if latent == "sample":
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s))
                                 for s in seeds]).to(mean.device)
            mean = mean + std * noise
    else:  # no distribution: PaellaVQModel / VQModel (before quantisation), AutoencoderTiny; AutoencoderDC
        mean, std = (out.latents if hasattr(out, "latents") else out.latent).float(), None
    if space.video:
        mean = mean.squeeze(2)
        std = std.squeeze(2) if std is not None else None
    return mean, std


@torch.inference_mode()
def decode_raw(vae, space: LatentSpace, latents: torch.Tensor) -> torch.Tensor:
    """raw latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
    z = latents.to(vae.device, vae.dtype)
    if space.video:
        return vae.decode(z.unsqueeze(2)).sample.squeeze(2).float()
    return vae.decode(z).sample.float()


# ------------------------------------------------------------------------------ a space defined by its VAE

PROBE_SIDE = 256  # pixels of the probe image a space defined by its VAE is measured with


def _vae_config(source: str, subfolder: str | None) -> dict:
    """The VAE's config.json, from a local folder or a Hub repo id (the Hub cache; HF_HUB_OFFLINE honoured)."""
    where = f"{source}{':' + subfolder if subfolder else ''}"
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            path = local / (subfolder or "") / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "config.json", subfolder=subfolder))
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # missing file, Hub errors (OSError subclasses), bad JSON
        raise ValueError(f"cannot read the VAE's config.json at {where}: {_first_line(e)}") from e


def _probe_class(name: str, source: str, subfolder: str | None, trust_remote_code: bool) -> tuple[str, dict]:
    """(class name, config) of the VAE at source, refusing what cannot be a VAE before loading it."""
    import diffusers

    where = f"{source}{':' + subfolder if subfolder else ''}"
    if is_single_file(source):
        return "AutoencoderKL", autoencoderkl_config(Path(source).expanduser())
    config = _vae_config(source, subfolder)
    class_name = config.get("_class_name")
    if config.get("auto_map"):
        check_trust(source, subfolder, trust_remote_code, what=f"--space {name}: the VAE")
        return class_name, config
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"--space {name}={where}: config.json names {class_name!r}, not a diffusers model class "
                         "(and no auto_map to code of its own)")
    if not callable(getattr(cls, "encode", None)) or not callable(getattr(cls, "decode", None)):
        raise ValueError(f"--space {name}={where}: {class_name} cannot encode and decode images (no encode/decode)")
    return class_name, config


@torch.inference_mode()
def space_from_vae(name: str, source: str, subfolder: str | None = None,
                   trust_remote_code: bool = False) -> LatentSpace:
    """A latent space defined by its VAE: the class from config.json's `_class_name` (a diffusers class, code of
    its own with trust_remote_code, or AutoencoderKL for a single-file checkpoint); channels, spatial factor and
    image-or-video measured by encoding one probe image (and checked against the config); whether it can decode
    (encoder-only VAEs cannot); the scaled layout from `scaling_factor`/`shift_factor`, or per-channel
    `latents_mean` / `latents_std` where the config has them (scaled = (raw - mean) * scaling_factor / std).

    >>> space = space_from_vae("dcx", "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers")
    >>> register_space(space)          # then get_space("dcx") works in this process
    """
    if is_builtin(name):
        raise ValueError(f"{name!r} is a registry space; give a space defined by its VAE another name")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or not name[0].isalpha():
        raise ValueError(f"space name {name!r}: use letters, digits, '-', '_' or '.', starting with a letter")
    where = f"{source}{':' + subfolder if subfolder else ''}"
    class_name, config = _probe_class(name, source, subfolder, trust_remote_code)
    probe_space = LatentSpace(name, class_name, 1, 1, class_name, source, subfolder)
    vae = load_vae(probe_space, source, subfolder, trust_remote_code=trust_remote_code)
    pixels = torch.rand(1, 3, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent, video = None, False
    for video in (False, True):  # image VAEs take (B, 3, H, W); video VAEs (B, 3, T, H, W)
        try:
            latent, _ = encode_raw(vae, dataclasses.replace(probe_space, video=video), pixels)
            break
        except (RuntimeError, ValueError, TypeError) as e:
            error = e
    if latent is None:
        raise ValueError(f"--space {name}={where}: {class_name} could not encode a {PROBE_SIDE}px image "
                         f"({_first_line(error)})")
    channels, side = latent.shape[1], latent.shape[-1]
    if latent.dim() != 4 or latent.shape[-2] != side or PROBE_SIDE % side:
        raise ValueError(f"--space {name}={where}: a {PROBE_SIDE}px image gave latents of shape "
                         f"{tuple(latent.shape)}: not a whole spatial factor")
    for key in ("latent_channels", "z_dim"):
        if isinstance(config.get(key), int) and config[key] != channels:
            raise ValueError(f"--space {name}={where}: config.json says {key} {config[key]}, the VAE gives "
                             f"{channels} channels")
    try:  # encoder-only VAEs (a distilled encoder, say) raise NotImplementedError
        decode_raw(vae, dataclasses.replace(probe_space, video=video), latent[..., :2, :2])
        decoder = True
    except NotImplementedError:
        decoder = False
    scale = float(config.get("scaling_factor") or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    stats = isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels
    layout = dict(scaling="per_channel", mean=tuple(map(float, mean)), std=tuple(float(v) / scale for v in std)) \
        if stats else dict(scale=scale, shift=float(config.get("shift_factor") or 0.0))
    kind = source_kind(source, subfolder)
    notes = f"defined by its VAE ({where})" + (", which runs its own code" if kind == "remote_code" else "") \
        + ("" if decoder else "; encoder only (no decoder)")
    return LatentSpace(name, f"{class_name} VAE", channels, PROBE_SIDE // side, class_name, source, subfolder,
                       video=video, notes=notes, decoder=decoder, **layout)
