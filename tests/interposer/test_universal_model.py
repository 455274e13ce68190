"""The universal interposer as a user loads and runs it: every pair's shapes, its folder, convert(), the
command line, the lookup in $INTERPOSER_HOME, the ComfyUI lists, and a new space that leaves the others alone."""

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run
from interposer import convert, load_interposer, save_interposer
from interposer import spaces as registry
from interposer.spaces import LatentSpace
from interposer.universal_model import UniversalInterposer, UniversalPair

# /8, /4 (Cascade) and /32 (a DC-AE, defined by its VAE) around an /8 working grid: both directions of
# resampling, both sizes of k
SPACES = {"xl": dict(channels=4, factor=8), "ca": dict(channels=4, factor=4), "fx2": dict(channels=32, factor=8),
          "sana": dict(channels=32, factor=32)}
SANA = LatentSpace(code="sana", family="defined by its VAE", channels=32, factor=32, vae_class="AutoencoderDC",
                   vae_repo="/models/dc-ae", scaling="factor")


@pytest.fixture(autouse=True)
def sana_registered(monkeypatch):
    """`sana` known in this test only (a model's config.json carries it to other processes)."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    registry.register_space(SANA)


def _net(spaces=SPACES, seed=0) -> UniversalInterposer:
    net = UniversalInterposer(spaces, ch_mid=8, blocks=2, emb=4)
    net.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # trained-looking FiLM maps, so the target embedding matters
        for block in net.trunk:
            block.film.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return net.eval()


def _latents(code: str, side_px: int = 256, batch: int = 2) -> torch.Tensor:
    c, f = SPACES[code]["channels"], SPACES[code]["factor"]
    return torch.randn(batch, c, side_px // f, side_px // f, generator=torch.Generator().manual_seed(len(code)))


def test_every_pair_maps_the_same_picture_to_the_target_grid():
    net = _net()
    assert len(net.pairs()) == 12
    for src, dst in net.pairs():
        y = net(_latents(src), src, dst)
        assert y.shape == _latents(dst).shape, (src, dst)
        assert torch.isfinite(y).all()
    # the target's embedding steers the trunk: another embedding, another output
    y = net(_latents("xl"), "xl", "fx2")
    with torch.no_grad():
        net.embed["fx2"].copy_(net.embed["sana"])
    assert not torch.allclose(net(_latents("xl"), "xl", "fx2"), y, atol=1e-4)


def test_bad_input_names_what_to_fix():
    net = _net()
    with pytest.raises(ValueError, match=r"converts xl, ca, fx2, sana; not 'v1'"):
        net(_latents("xl"), "xl", "v1")
    with pytest.raises(ValueError, match=r"src and dst are both 'xl'"):
        net(_latents("xl"), "xl", "xl")
    with pytest.raises(ValueError, match=r"expected fx2 latents of shape \(B, 32, H, W\), got \(2, 4, 32, 32\)"):
        net(_latents("xl"), "fx2", "xl")
    with pytest.raises(ValueError, match=r"multiples of 2"):
        net(torch.randn(1, 4, 33, 32), "ca", "xl")
    with pytest.raises(ValueError, match=r"do not make whole sana latents"):
        net(torch.randn(1, 4, 6, 8), "xl", "sana")
    with pytest.raises(ValueError, match=r"at least two spaces"):
        UniversalInterposer({"xl": SPACES["xl"]})
    with pytest.raises(ValueError, match=r"factor 12 and the working grid's 8 must divide one another"):
        UniversalInterposer({"xl": SPACES["xl"], "odd": dict(channels=4, factor=12)})
    with pytest.raises(ValueError, match=r"xl std must be positive"):
        UniversalInterposer({"xl": dict(SPACES["xl"], std=[1, 0, 1, 1]), "ca": SPACES["ca"]})


def test_folder_round_trip_convert_and_the_command_line(isolated_home, tmp_path):
    net = _net()
    folder = save_interposer(net, tmp_path / "uni", version="test")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "interposer-universal" and set(config["spaces"]) == set(SPACES)
    assert "fx2->sana" in config["pairs"] and "src" not in config

    whole = load_interposer(str(folder))
    assert isinstance(whole, UniversalInterposer) and whole.pairs() == net.pairs() and whole.version == "test"
    for src, dst in net.pairs():
        x = _latents(src)
        want = net(x, src, dst)
        pair = load_interposer(src, dst, weights=folder)
        assert isinstance(pair, UniversalPair) and (pair.src, pair.dst, pair.source) == (src, dst, str(folder))
        assert torch.equal(pair(x), want)
        torch.testing.assert_close(convert(x, src, dst, weights=folder), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"uni converts between xl, ca, fx2, sana, not xl -> v1"):
        load_interposer("xl", "v1", weights=folder)
    with pytest.raises(ValueError, match=r"save it without src, dst"):
        save_interposer(net, tmp_path / "other", "xl", "ca")
    assert not (tmp_path / "other").exists()

    x = _latents("ca", batch=1)
    save_file({"samples": x}, tmp_path / "in.safetensors")
    result = run("-m", "interposer", "convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--src", "ca", "--dst", "sana", "--weights", str(folder))
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["samples"], net(x, "ca", "sana"),
                               rtol=1e-5, atol=1e-6)


def test_found_in_interposer_home_after_a_pairwise_network(isolated_home):
    from interposer import InterposerModel

    net = _net()
    save_interposer(net, isolated_home / "my-universal")
    assert load_interposer("sana", "ca").source == str(isolated_home / "my-universal")
    save_interposer(InterposerModel(32, 4, 8, 1, scale=8.0), isolated_home / "sana-to-ca", "sana", "ca")
    assert load_interposer("sana", "ca").source == str(isolated_home / "sana-to-ca")  # the pair's own network first
    assert load_interposer("ca", "sana").source == str(isolated_home / "my-universal")
    listed = run("-m", "interposer", "list", env={"INTERPOSER_HOME": str(isolated_home)})
    assert listed.returncode == 0, listed.stderr
    assert f"local model my-universal (universal: xl, ca, fx2, sana): {isolated_home / 'my-universal'}" in listed.stdout
    assert f"ca -> xl  local: {isolated_home / 'my-universal'}" in listed.stdout


def test_comfyui_lists_offer_its_spaces_and_the_node_runs_it(isolated_home, tmp_path, monkeypatch):
    from interposer.comfy import LatentInterposer

    models = tmp_path / "ComfyUI" / "models"
    monkeypatch.setitem(__import__("sys").modules, "folder_paths", types.SimpleNamespace(models_dir=str(models)))
    net = _net()
    save_interposer(net, models / "interposers" / "uni")
    inputs = LatentInterposer.INPUT_TYPES()["required"]
    assert inputs["latent_src"][0] == inputs["latent_dst"][0] == ["v1", "xl", "v3", "fx", "ca", "fx2", "sana"]
    x = _latents("fx2", batch=1)
    (out,) = LatentInterposer().convert({"samples": x}, "fx2", "sana")
    torch.testing.assert_close(out["samples"], net(x, "fx2", "sana"), rtol=1e-5, atol=1e-6)


def test_a_new_space_leaves_every_other_pair_bit_identical():
    net = _net()
    before = {(s, d): net(_latents(s), s, d) for s, d in net.pairs()}
    net.add_space("wan", channels=16, factor=8)
    net.init_space("wan", torch.Generator().manual_seed(5))
    assert len(net.pairs()) == 20
    for (s, d), y in before.items():
        assert torch.equal(net(_latents(s), s, d), y), (s, d)
    own = net.space_parameters("wan")
    assert sum(p.numel() for p in own) < sum(p.numel() for p in net.parameters()) / 5
    assert net(_latents("xl"), "xl", "wan").shape == (2, 16, 32, 32)
    with pytest.raises(ValueError, match=r"already has space 'wan'"):
        net.add_space("wan", channels=16, factor=8)
