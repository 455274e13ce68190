import importlib

import pytest
import torch

from interposer.spaces import (
    RELEASED_PAIRS,
    SPACES,
    default_args,
    get_space,
    pair_scale,
    release_filename,
)


def test_every_name_resolves_to_its_entry():
    for space in SPACES:
        for name in space.names:
            assert get_space(name) is space
            assert get_space(name.upper()) is space


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown latent space 'sd9'; known spaces: v1 .*xl .*ca"):
        get_space("sd9")


@pytest.mark.parametrize(
    "code, channels, factor, scale, shift, vae_class, repo, subfolder",
    [
        ("v1", 4, 8, 0.18215, 0.0, "AutoencoderKL", "stabilityai/sd-vae-ft-mse", None),
        ("xl", 4, 8, 0.13025, 0.0, "AutoencoderKL", "madebyollin/sdxl-vae-fp16-fix", None),
        ("v3", 16, 8, 1.5305, 0.0609, "AutoencoderKL", "stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
        ("fx", 16, 8, 0.3611, 0.1159, "AutoencoderKL", "black-forest-labs/FLUX.1-schnell", "vae"),
        ("ca", 4, 4, 1 / 0.43, 0.0, "PaellaVQModel", "stabilityai/stable-cascade", "vqgan"),
    ],
)
def test_factor_spaces(code, channels, factor, scale, shift, vae_class, repo, subfolder):
    s = get_space(code)
    assert (s.channels, s.factor, s.scaling) == (channels, factor, "factor")
    assert s.scale == pytest.approx(scale) and s.shift == pytest.approx(shift)
    assert (s.vae_class, s.vae_repo, s.vae_subfolder) == (vae_class, repo, subfolder)
    raw = torch.randn(2, channels, 3, 5)
    torch.testing.assert_close(s.to_scaled(raw), (raw - shift) * scale)
    torch.testing.assert_close(s.to_raw(s.to_scaled(raw)), raw)


def test_wan_statistics_match_diffusers():
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    wan = get_space("qwen-image")
    assert (wan.code, wan.channels, wan.factor, wan.scaling) == ("wan", 16, 8, "per_channel")
    assert list(wan.mean) == pytest.approx(params["latents_mean"].default)
    assert list(wan.std) == pytest.approx(params["latents_std"].default)
    raw = torch.randn(1, 16, 2, 4, 4)  # video: (B, C, T, H, W)
    scaled = wan.to_scaled(raw)
    torch.testing.assert_close(scaled[0, 3], (raw[0, 3] - wan.mean[3]) / wan.std[3])
    torch.testing.assert_close(wan.to_raw(scaled), raw)


def test_flux2_scaled_layout_is_refused():
    fx2 = get_space("flux2")
    assert (fx2.channels, fx2.factor, fx2.vae_class) == (32, 8, "AutoencoderKLFlux2")
    with pytest.raises(ValueError, match="batch-norm statistics.*layout='raw'"):
        fx2.to_scaled(torch.zeros(1, 32, 2, 2))


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.code)
def test_vae_class_exists_in_diffusers(space):
    cls = getattr(importlib.import_module(space.vae_module), space.vae_class)
    assert cls.__name__ == space.vae_class


def test_released_pairs_and_their_arguments(layout):
    assert len(RELEASED_PAIRS) == 12 and len(set(RELEASED_PAIRS)) == 12
    assert pair_scale("ca", "xl") == 0.5 and pair_scale("xl", "ca") == 2.0
    for pair, args in layout["config"].items():
        src, dst = pair.split("-to-")
        assert default_args(src, dst) == args
    for src, dst in RELEASED_PAIRS:
        args = default_args(src, dst)
        assert (args["ch_mid"], args["blocks"]) == (64, 12)
        assert args["scale"] == (0.5 if src == "ca" else 1.0)
    assert release_filename("sdxl", "sd15") == "xl-to-v1_interposer-v4.0.safetensors"


def test_per_channel_entry_needs_matching_statistics():
    from interposer.spaces import LatentSpace

    with pytest.raises(ValueError, match="needs mean and std of 16 values"):
        LatentSpace("bad", "bad", 16, 8, "AutoencoderKL", "x/y", scaling="per_channel", mean=(0.0,), std=(1.0,))
