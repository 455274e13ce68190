"""Latent spaces defined by their VAE (`--space NAME=FOLDER` for a NAME the registry does not know): measured
from the real diffusers classes at tiny widths, recorded in the manifest and the export, and taken through
build -> add-space -> train -> convert, each in its own process, with no registry entry."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run
from interposer.spaces import LatentSpace, get_space, is_builtin, register_space
from interposer.vae import space_from_vae

DC_SCALE = 0.41407
KL_MEAN, KL_STD, KL_SCALE = (0.1, -0.2, 0.3, 0.05), (1.0, 2.0, 0.5, 1.5), 0.5


def _spread(vae):
    with torch.no_grad():  # diffusers' default init gives near-constant latents at this size
        for p in vae.parameters():
            if p.dim() > 1:
                p.normal_(0.0, (1.0 / p[0].numel()) ** 0.5)
    return vae


@pytest.fixture(scope="session")
def new_vaes(tmp_path_factory) -> dict[str, Path]:
    """An AutoencoderDC (8 channels, factor 8, scaling_factor != 1), an AutoencoderTiny and an AutoencoderKL
    with per-channel latents_mean/std: classes and layouts the registry has no entry for."""
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny, UNet2DModel

    root = tmp_path_factory.mktemp("new-vaes")
    torch.manual_seed(0)
    four = ("ResBlock",) * 4
    _spread(AutoencoderDC(
        latent_channels=8, attention_head_dim=8, encoder_block_types=four, decoder_block_types=four,
        encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, encoder_layers_per_block=(1,) * 4,
        decoder_layers_per_block=(1,) * 4, encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
        upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=DC_SCALE)).save_pretrained(root / "dc")
    _spread(AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                            num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)).save_pretrained(root / "tiny")
    _spread(AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1, latents_mean=KL_MEAN, latents_std=KL_STD, scaling_factor=KL_SCALE)
            ).save_pretrained(root / "kl")
    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, sample_size=8,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(root / "unet")
    return {k: root / k for k in ("dc", "tiny", "kl", "unet")}


def test_a_space_is_measured_from_its_vae(new_vaes):
    dc = space_from_vae("dcm", str(new_vaes["dc"]))
    assert (dc.channels, dc.factor, dc.vae_class, dc.scaling, dc.scale, dc.shift, dc.video) == \
        (8, 8, "AutoencoderDC", "factor", DC_SCALE, 0.0, False)
    tiny = space_from_vae("tinym", str(new_vaes["tiny"]))
    assert (tiny.channels, tiny.factor, tiny.vae_class, tiny.scale) == (4, 8, "AutoencoderTiny", 1.0)
    kl = space_from_vae("klm", str(new_vaes["kl"]))
    assert (kl.channels, kl.factor, kl.scaling, kl.mean) == (4, 8, "per_channel", KL_MEAN)
    raw = torch.randn(2, 4, 3, 3)
    expected = (raw - torch.tensor(KL_MEAN).view(4, 1, 1)) * KL_SCALE / torch.tensor(KL_STD).view(4, 1, 1)
    torch.testing.assert_close(kl.to_scaled(raw), expected)  # diffusers' (x - mean) * scaling_factor / std
    torch.testing.assert_close(kl.to_raw(kl.to_scaled(raw)), raw)
    assert LatentSpace.from_dict(json.loads(json.dumps(kl.to_dict()))) == kl  # what manifests and exports hold


def test_what_cannot_define_a_space_is_refused_in_one_line(new_vaes, tmp_path):
    with pytest.raises(ValueError, match=r"--space unet=.*: UNet2DModel cannot encode and decode images"):
        space_from_vae("unet", str(new_vaes["unet"]))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"_class_name": "NotAModel"}')
    with pytest.raises(ValueError, match=r"config.json names 'NotAModel', not a diffusers model class"):
        space_from_vae("odd", str(tmp_path / "odd"))
    with pytest.raises(ValueError, match=r"cannot read the VAE's config.json at"):
        space_from_vae("none", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"'sdxl' is a registry space"):
        space_from_vae("sdxl", str(new_vaes["dc"]))
    # a definition that takes a registry name (an alias too) for other latents: refused with both descriptions
    other = LatentSpace.from_dict(get_space("xl").to_dict() | dict(code="auraflow", aliases=[], channels=8))
    with pytest.raises(ValueError, match=r"'auraflow' is taken by the registry's xl: 4 channels.*this one is "
                                         r"auraflow: 8 channels"):
        register_space(other)
    assert register_space(get_space("xl").to_dict()) is get_space("xl")  # the same definition: accepted
    from interposer.vae import load_vae

    # a registry name given another class's VAE would load as random weights: refused, naming both classes
    with pytest.raises(ValueError, match=r"the xl space is made by AutoencoderKL, but the VAE at .* is an "
                                         r"AutoencoderDC; to use it, define a new space from it: --space NEWNAME="):
        load_vae(get_space("xl"), str(new_vaes["dc"]), None)


@pytest.fixture(scope="session")
def new_dataset(ray_session, photos, vaes, new_vaes, tmp_path_factory) -> Path:
    """Built by the CLI in its own process: v1 (registry) and dcx (defined by its AutoencoderDC)."""
    out = tmp_path_factory.mktemp("new-space-data") / "v1-dcx"
    result = run("-m", "interposer", "data", "build", "--images", str(photos), "--space", f"v1={vaes['v1']}",
                 "--space", f"dcx={new_vaes['dc']}", "--out", str(out), "--tile-size", "64", "--max-tiles", "4",
                 "--min-size", "64", "--shard-size", "2", "--gpus-per-worker", "0",
                 env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_build_add_space_train_and_convert_with_no_registry_entry(new_dataset, new_vaes, ray_session, tmp_path):
    from interposer.pipeline.build import AddSpaceConfig, add_space
    from interposer.pipeline.schema import read_manifest

    address = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    manifest = json.loads((new_dataset / "manifest.json").read_text())
    dcx = manifest["spaces"]["dcx"]
    assert (dcx["vae_class"], dcx["channels"], dcx["latent_shape"]) == ("AutoencoderDC", 8, [8, 8, 8])
    assert dcx["space"]["scale"] == DC_SCALE and manifest["spaces"]["v1"]["space"]["code"] == "v1"

    # add-space reads dcx's definition from the manifest; klx is defined by its VAE here
    add_space(AddSpaceConfig(data=str(new_dataset), space=f"klx={new_vaes['kl']}", gpus_per_worker=0, quiet=True))
    entry = read_manifest(str(new_dataset)).spaces["klx"]
    assert entry.space["scaling"] == "per_channel" and entry.tiles == manifest["counts"]["tiles"]
    # the same name for other latents is refused, naming both
    with pytest.raises(ValueError, match=r"'dcx' is taken by an already registered dcx: 8 channels.*this one is "
                                         r"dcx: 4 channels, factor 8, AutoencoderTiny"):
        add_space(AddSpaceConfig(data=str(new_dataset), space=f"dcx={new_vaes['tiny']}", gpus_per_worker=0,
                                 quiet=True))

    # train klx -> dcx in a fresh process: both spaces come from the dataset's manifest
    result = run("-m", "interposer", "train", "--data", str(new_dataset), "--src", "klx", "--dst", "dcx", "--out",
                 str(tmp_path / "runs"), "--name", "kd", "--steps", "4", "--batch", "4", "--crop", "4",
                 "--checkpoint-every", "4", "--val-fraction", "0", env=address)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    export = tmp_path / "runs" / "kd" / "export"
    config = json.loads((export / "config.json").read_text())
    assert (config["src"], config["dst"]) == ("klx", "dcx")
    assert config["spaces"]["klx"]["mean"] == list(KL_MEAN) and config["spaces"]["dcx"]["channels"] == 8

    # convert in a fresh process with only the export: raw and scaled layouts
    raw = torch.randn(1, 4, 8, 8)
    save_file({"samples": raw}, str(tmp_path / "in.safetensors"))
    for layout in ("raw", "scaled"):
        out = tmp_path / f"out-{layout}.safetensors"
        given = raw if layout == "raw" else space_from_vae("klz", str(new_vaes["kl"])).to_scaled(raw)
        save_file({"samples": given}, str(tmp_path / f"in-{layout}.safetensors"))
        result = run("-m", "interposer", "convert", str(tmp_path / f"in-{layout}.safetensors"), str(out),
                     "--src", "klx", "--dst", "dcx", "--weights", str(export), "--layout", layout)
        assert result.returncode == 0, result.stderr
        got = load_file(str(out))["samples"]
        assert got.shape == (1, 8, 8, 8)
        if layout == "raw":
            from interposer import load_interposer

            with torch.no_grad():
                torch.testing.assert_close(got, load_interposer(str(export))(raw), atol=1e-5, rtol=1e-5)
            raw_out = got
        else:  # scaled in, scaled out: dcx's scaling_factor applied to the same raw result
            torch.testing.assert_close(got, raw_out * DC_SCALE, atol=1e-5, rtol=1e-4)
    listed = run("-m", "interposer", "list", env={"INTERPOSER_HOME": str(tmp_path / "runs" / "kd")})
    assert listed.returncode == 0 and "dcx*" in listed.stdout and "klx*" in listed.stdout, listed.stdout
    assert not is_builtin("dcx")

    # ComfyUI: the node offers the spaces of the models it finds locally and converts with them, in a new process
    import shutil

    shutil.copytree(export, tmp_path / "home" / "klx-to-dcx")
    node = run("-c", "import torch; from interposer.comfy import LatentInterposer as N; "
               "codes = N.INPUT_TYPES()['required']['latent_src'][0]; print(codes[-2:]); "
               "out = N().convert({'samples': torch.randn(1, 4, 8, 8)}, 'klx', 'dcx')[0]['samples']; "
               "print(tuple(out.shape))", env={"INTERPOSER_HOME": str(tmp_path / "home")})
    assert node.returncode == 0, node.stderr
    assert "['klx', 'dcx']" in node.stdout and "(1, 8, 8, 8)" in node.stdout, node.stdout
