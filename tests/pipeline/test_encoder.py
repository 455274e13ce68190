import numpy as np
import pytest
import torch

from interposer.spaces import SPACES, get_space
from interposer.pipeline.encoder import TileEncoder, VAESpec, encode_raw, fingerprint, load_vae, parse_space_arg


def _tiles(n: int, side: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.code)
def test_every_registry_class_encodes_raw_latents(space, vaes):
    """Each diffusers class the registry names, loaded by path, gives (C, T/f, T/f) raw latents: the
    distribution mean (or Paella's pre-quantisation latents), unscaled."""
    enc = TileEncoder([VAESpec(space.code, str(vaes[space.code]), None, "float32")], device="cpu", batch_size=2)
    tiles = _tiles(3)
    keys = [f"k{i}" for i in range(3)]
    lat, std, finite = enc.encode(tiles, keys)[space.code]
    assert lat.shape == (3, space.channels, 64 // space.factor, 64 // space.factor) and lat.dtype == np.float16
    assert finite.all() and std is None
    vae = load_vae(space, str(vaes[space.code]), None)
    pixels = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = pixels.unsqueeze(2) if space.video else pixels
    with torch.no_grad():
        out = vae.encode(x)
    direct = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
    direct = direct.squeeze(2) if space.video else direct
    np.testing.assert_allclose(lat.astype(np.float32), direct.numpy(), atol=2e-3, rtol=2e-3)
    assert lat.std() > 0.05  # stand-ins must give latents that vary, or the tests prove nothing


def test_grouping_is_fixed_so_results_are_reproducible(vaes):
    """Forward passes take a call's tiles in groups of batch_size, in order, whatever else the call holds: the
    latents of 5 tiles are those of their groups (2, 2, 1) encoded call by call, byte for byte, and a repeat is
    the same bytes."""
    enc = TileEncoder([VAESpec("v1", str(vaes["v1"]), None, "float32")], device="cpu", batch_size=2)
    tiles, keys = _tiles(5), [f"k{i}" for i in range(5)]
    whole = enc.encode(tiles, keys)["v1"][0]
    assert whole.tobytes() == enc.encode(tiles, keys)["v1"][0].tobytes()
    groups = [enc.encode(tiles[i : i + 2], keys[i : i + 2])["v1"][0] for i in range(0, 5, 2)]
    assert np.concatenate(groups).tobytes() == whole.tobytes()


def test_sample_and_std(vaes):
    spec = VAESpec("xl", str(vaes["xl"]), None, "float32", latent="sample", store_std=True)
    enc = TileEncoder([spec], device="cpu")
    tiles = _tiles(2)
    lat, std, _ = enc.encode(tiles, ["a", "b"])["xl"]
    lat2, _, _ = enc.encode(tiles, ["a", "b"])["xl"]
    lat3, _, _ = enc.encode(tiles, ["a", "c"])["xl"]
    assert std.shape == lat.shape and (std > 0).all()
    assert np.array_equal(lat, lat2)  # the sample is seeded by tile key
    assert np.array_equal(lat[0], lat3[0]) and not np.array_equal(lat[1], lat3[1])


def test_nonfinite_is_retried_in_fp32(vaes):
    spec = VAESpec("v1", str(vaes["v1"]), None, "bfloat16")
    enc = TileEncoder([spec], device="cpu", batch_size=4)
    vae = enc.vaes["v1"]
    # like SDXL's VAE in fp16: the low-precision pass overflows on one tile, fp32 does not
    vae.encoder.register_forward_hook(
        lambda m, i, o: torch.where(torch.arange(len(o)).view(-1, 1, 1, 1) == 1, torch.inf, o)
        if o.dtype == torch.bfloat16 else o)
    tiles = _tiles(3)
    lat, _, finite = enc.encode(tiles, ["a", "b", "c"])["v1"]
    assert finite.all()
    fp32 = load_vae(get_space("v1"), str(vaes["v1"]), None)
    pixels = torch.from_numpy(tiles[1:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = encode_raw(fp32, get_space("v1"), pixels)[0].half().numpy()
    assert np.array_equal(lat[1], expected[0])


def test_nonfinite_in_fp32_too_is_reported(vaes):
    enc = TileEncoder([VAESpec("v1", str(vaes["v1"]), None, "float32")], device="cpu")
    enc.vaes["v1"].encoder.register_forward_hook(
        lambda m, i, o: torch.where(torch.arange(len(o)).view(-1, 1, 1, 1) == 0, torch.nan, o))
    _, _, finite = enc.encode(_tiles(2), ["a", "b"])["v1"]
    assert finite.tolist() == [False, True]


def test_fingerprint_follows_the_weights(vaes):
    a = load_vae(get_space("v1"), str(vaes["v1"]), None)
    b = load_vae(get_space("v1"), str(vaes["v1"]), None)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert fingerprint(a) != fingerprint(b)


def test_space_arguments(vaes):
    assert parse_space_arg("sdxl") == ("xl", None, None)
    assert parse_space_arg("sd3=stabilityai/stable-diffusion-3-medium-diffusers:vae") == \
        ("v3", "stabilityai/stable-diffusion-3-medium-diffusers", "vae")
    assert parse_space_arg(f"v1={vaes['v1']}") == ("v1", str(vaes["v1"]), None)
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo id"):
        parse_space_arg("v1=/no/such/folder")
    with pytest.raises(ValueError, match=r"not from s3://b/vae; on a cluster give a Hub repo id .* file_mounts"):
        parse_space_arg("v1=s3://b/vae")
    with pytest.raises(ValueError, match="unknown latent space 'v9'"):
        parse_space_arg("v9")
    with pytest.raises(ValueError, match=r"cannot load the v1 VAE \(AutoencoderKL\) from"):
        load_vae(get_space("v1"), str(vaes["v1"].parent), None)
