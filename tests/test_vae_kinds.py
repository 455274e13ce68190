"""Every kind of VAE a user has: one that ships its own code (diffusers' auto_map + --trust-remote-code),
single-file checkpoints in the original key layout (ComfyUI's models/vae/), and encoder-only VAEs. The code,
the weights and the checkpoints are written here into temp folders; nothing comes from ../shared."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import run
from interposer.spaces import get_space

OWN_CODE = '''
from dataclasses import dataclass

import torch
from torch import nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class EncoderOutput(BaseOutput):
    latents: torch.Tensor


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class OwnVAE(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, latent_channels: int = 4, levels: int = 3, has_decoder: bool = True):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, padding=1)]
        for _ in range(levels):
            layers += [nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)]
        self.encoder = nn.Sequential(*layers, nn.Conv2d(8, latent_channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, 3 * 4 ** levels, 1), nn.PixelShuffle(2 ** levels),
                                     nn.Tanh()) if has_decoder else None

    def encode(self, x, return_dict=True):
        z = self.encoder(x)
        return EncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z, return_dict=True):
        if self.decoder is None:
            raise NotImplementedError("this autoencoder ships an encoder only")
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)
'''


def _own_vae(folder: Path, seed: int, **config) -> Path:
    """A VAE with its own code, as a Hub repo with auto_map has it: own_vae.py + config.json + weights."""
    import importlib.util

    folder.mkdir(parents=True)
    (folder / "own_vae.py").write_text(OWN_CODE)
    spec = importlib.util.spec_from_file_location(f"own_vae_{seed}", folder / "own_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    module.OwnVAE(**config).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoModel": "own_vae.OwnVAE"})))
    return folder


@pytest.fixture(scope="module")
def own_vaes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-vaes")
    return dict(own=_own_vae(root / "own", 1, latent_channels=4, levels=3),  # /8 with a decoder
                enc=_own_vae(root / "enc", 2, latent_channels=8, levels=4, has_decoder=False),  # /16, encoder only
                enc2=_own_vae(root / "enc2", 3, latent_channels=4, levels=3, has_decoder=False))


def _ray(ray_session) -> dict:
    return {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


def test_a_vae_with_its_own_code_is_refused_without_the_flag(own_vaes, photos, tmp_path):
    from interposer.vae import space_from_vae

    with pytest.raises(ValueError, match=r"runs its own code \(OwnVAE in own_vae\.py\).*--trust-remote-code"):
        space_from_vae("ownq", str(own_vaes["own"]))
    out = tmp_path / "data"
    result = run("-m", "interposer", "data", "build", "--images", str(photos), "--space", f"own={own_vaes['own']}",
                 "--out", str(out), "--tile-size", "64", "--gpus-per-worker", "0")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "OwnVAE in own_vae.py" in line[0] and "--trust-remote-code" in line[0], result.stderr
    assert not out.exists()


def test_spaces_are_measured_from_vaes_with_their_own_code(own_vaes):
    from interposer.vae import space_from_vae

    enc = space_from_vae("encm", str(own_vaes["enc"]), trust_remote_code=True)
    own = space_from_vae("ownm", str(own_vaes["own"]), trust_remote_code=True)
    assert (enc.channels, enc.factor, enc.vae_class, enc.decoder) == (8, 16, "OwnVAE", False)
    assert (own.channels, own.factor, own.decoder) == (4, 8, True)
    assert "runs its own code" in own.notes and "encoder only" in enc.notes


@pytest.fixture(scope="module")
def own_dataset(ray_session, photos, own_vaes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own-data") / "own-enc"
    result = run("-m", "interposer", "data", "build", "--images", str(photos), "--space", f"own={own_vaes['own']}",
                 "--space", f"enc={own_vaes['enc']}", "--trust-remote-code", "--out", str(out), "--tile-size", "64",
                 "--max-tiles", "4", "--shard-size", "2", "--gpus-per-worker", "0", env=_ray(ray_session))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def test_build_records_the_code_and_the_decoder(own_dataset, own_vaes):
    import hashlib

    manifest = json.loads((own_dataset / "manifest.json").read_text())
    own, enc = manifest["spaces"]["own"], manifest["spaces"]["enc"]
    digest = "sha256:" + hashlib.sha256((own_vaes["own"] / "own_vae.py").read_bytes()).hexdigest()
    assert own["code"] == {"own_vae.py": digest} and enc["code"] == {"own_vae.py": digest}
    assert own["vae_class"] == "OwnVAE" and (own["latent_shape"], enc["latent_shape"]) == ([4, 8, 8], [8, 4, 4])
    assert own["space"]["decoder"] is True and enc["space"]["decoder"] is False
    assert manifest["counts"]["tiles"] > 0
    listing = run("-m", "interposer", "data", "inspect", str(own_dataset))
    assert "runs its own code (own_vae.py)" in listing.stdout and "encoder only" in listing.stdout, listing.stdout


@pytest.mark.slow
def test_train_and_eval_both_ways_with_an_encoder_only_side(own_dataset, own_vaes, ray_session, tmp_path):
    runs = tmp_path / "runs"
    common = ["--out", str(runs), "--steps", "4", "--batch", "4", "--checkpoint-every", "4", "--val-fraction", "0"]
    # a decoded loss needs the target's decoder: refused before Ray starts
    refused = run("-m", "interposer", "train", "--data", str(own_dataset), "--src", "own", "--dst", "enc", "--name",
                  "x", "--crop", "4", "--decoded-loss-weight", "1", *common, env=_ray(ray_session))
    assert refused.returncode == 2 and "has no decoder" in refused.stderr and not (runs / "x").exists(), refused.stderr
    for src, dst, crop in (("own", "enc", "4"), ("enc", "own", "2")):
        result = run("-m", "interposer", "train", "--data", str(own_dataset), "--src", src, "--dst", dst, "--name",
                     f"{src}-{dst}", "--crop", crop, *common, env=_ray(ray_session))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # Ray Train's per-checkpoint and per-report lines stay in its log files, and so do its PlacementGroupCleaner's
        # once-a-second warnings on a Ray without its dashboard (as here); no colour codes into a pipe.
        said = result.stdout + result.stderr
        assert "Checkpoint successfully created" not in said and "Reporting training result" not in said, said
        assert "Failed to query Ray Train Controller" not in said and "PlacementGroupCleaner" not in said, said
        assert "\x1b[" not in said and "[train] done: step 4" in said, said
        config = json.loads((runs / f"{src}-{dst}" / "export" / "config.json").read_text())
        assert config["architecture"] == "interposer-shuffle"  # factors 8 and 16 differ: the default network
    model = runs / "own-enc"
    # the run held out nothing: eval's default split names the way out
    refused = run("-m", "interposer", "eval", "--model", str(model), "--data", str(own_dataset),
                  "--trust-remote-code")
    assert refused.returncode == 2 and "pass --split all" in refused.stderr, refused.stderr
    # a dataset never grants trust by itself
    refused = run("-m", "interposer", "eval", "--model", str(model), "--data", str(own_dataset), "--split", "all")
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr, refused.stderr
    result = run("-m", "interposer", "eval", "--model", str(model), "--data", str(own_dataset), "--split", "all",
                 "--limit", "8", "--trust-remote-code")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("no pixel metrics") == 1, result.stdout
    ev = json.loads((model / "export" / "eval.json").read_text())
    assert [r["method"] for r in ev["rows"]] == ["interposer", "round trip", "linear"]
    assert all(r["psnr_tile"] is None for r in ev["rows"]) and "grid" not in ev
    assert not (model / "export" / "eval.png").exists()

    model = runs / "enc-own"  # the source cannot decode: no round trip; the target can: pixels and a picture
    result = run("-m", "interposer", "eval", "--model", str(model), "--data", str(own_dataset), "--split", "all",
                 "--limit", "8", "--trust-remote-code")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("round trip left out: the enc VAE has no decoder") == 1, result.stdout
    ev = json.loads((model / "export" / "eval.json").read_text())
    assert [r["method"] for r in ev["rows"]] == ["interposer", "linear"]
    assert all(r["psnr_tile"] is not None for r in ev["rows"]) and ev["grid"] == "eval.png"
    assert ev["target_vae"]["psnr_tile"] > 0 and "own VAE's own round trip of these tiles: PSNR" in result.stdout
    from PIL import Image

    with Image.open(model / "export" / "eval.png") as grid:  # 4 rows of 64 px tiles; original, own VAE, 2 methods
        assert grid.format == "PNG" and grid.size == (4 * (64 + 4) + 4, 16 + 4 * (64 + 4) + 4)
        import numpy as np

        assert len(np.unique(np.asarray(grid.convert("L")))) > 16  # pictures, not a blank canvas


def test_eval_with_no_decoder_on_either_side_is_refused(own_dataset, own_vaes, tmp_path):
    from interposer.pipeline.build import AddSpaceConfig, add_space
    from interposer.pipeline.schema import read_manifest, register_manifest_spaces
    from interposer.shuffle_model import ShuffleInterposer
    from interposer.trainer.evaluate import evaluate
    from interposer.weights import save_interposer

    add_space(AddSpaceConfig(data=str(own_dataset), space=f"enc2={own_vaes['enc2']}", gpus_per_worker=0,
                             quiet=True, trust_remote_code=True))
    register_manifest_spaces(read_manifest(str(own_dataset)))
    save_interposer(ShuffleInterposer(8, 4, 8, 1, 2.0), tmp_path / "m", "enc", "enc2")
    with pytest.raises(ValueError, match="neither the enc nor the enc2 VAE has a decoder"):
        evaluate(str(tmp_path / "m"), str(own_dataset), split="all", trust_remote_code=True)


def test_changed_code_is_refused_naming_the_file(own_dataset, own_vaes, tmp_path):
    code = own_vaes["own"] / "own_vae.py"
    original = code.read_text()
    runs = tmp_path / "runs"
    try:
        code.write_text(original + "\n# changed\n")
        result = run("-m", "interposer", "data", "build", "--images", "x", "--space", f"own={own_vaes['own']}",
                     "--space", f"enc={own_vaes['enc']}", "--trust-remote-code", "--out", str(own_dataset),
                     "--tile-size", "64", "--max-tiles", "4", "--shard-size", "2")
        assert result.returncode == 2 and "own code" not in result.stdout, result.stderr
        from interposer.pipeline.schema import read_manifest
        from interposer.vae import load_vae

        entry = read_manifest(str(own_dataset)).spaces["own"]
        with pytest.raises(ValueError, match=r"its code file own_vae\.py is not the one the dataset was built with"):
            load_vae(get_space("own"), entry.vae, None, trust_remote_code=True, code=entry.code)
    finally:
        code.write_text(original)
    assert not runs.exists()


# ------------------------------------------------------------------------------- single-file checkpoints


def _to_original_layout(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the original (LDM / A1111 / ComfyUI) layout: the inverse of diffusers'
    conversion, written out here so that the test checks it from the other side."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{levels - 1 - int(m[1])}.upsample", k)
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for new, old in attn.items():
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        if ".attn_1." in k and k.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # 1x1 convolutions in the original layout
        out[k] = value.contiguous()
    return out


@pytest.mark.parametrize("code", ["v1", "xl", "v3", "fx"])
def test_single_file_checkpoint_in_the_original_layout(code, tmp_path):
    from diffusers import AutoencoderKL

    from interposer.pipeline.encoder import source_fingerprint
    from interposer.vae import encode_raw, file_sha256, load_vae

    space = get_space(code)
    quant = space.channels == 4  # SD1/SDXL VAEs have quant convs; SD3/Flux ones do not
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=space.channels, norm_num_groups=8,
                        layers_per_block=1, use_quant_conv=quant, use_post_quant_conv=quant).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.1)
    state = _to_original_layout(vae.state_dict(), 4)
    assert "encoder.down.0.block.0.conv1.weight" in state and "decoder.up.0.upsample.conv.weight" not in state
    if code == "xl":  # a whole-model checkpoint's VAE part carries the first_stage_model. prefix
        state = {f"first_stage_model.{k}": v for k, v in state.items()}
    path = tmp_path / f"{code}-vae.safetensors"
    save_file(state, str(path))
    loaded = load_vae(space, str(path), None)
    assert type(loaded).__name__ == "AutoencoderKL" and loaded.config.scaling_factor == space.scale
    mine, theirs = loaded.state_dict(), vae.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(encode_raw(loaded, space, pixels)[0], encode_raw(vae, space, pixels)[0])
    assert source_fingerprint(loaded, str(path)) == file_sha256(path)


def test_single_file_for_a_class_diffusers_cannot_read_is_refused(tmp_path):
    from interposer.vae import load_vae

    path = tmp_path / "cascade.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="diffusers cannot read a single-file PaellaVQModel"):
        load_vae(get_space("ca"), str(path), None)
    pickled = tmp_path / "vae.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors VAE files are loaded"):
        load_vae(get_space("v1"), str(pickled), None)


def test_single_file_through_add_space(own_dataset, tmp_path, ray_session):
    """A single-file checkpoint goes through the Ray encoder workers too; its fingerprint is the file's."""
    from diffusers import AutoencoderKL

    from interposer.vae import file_sha256

    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    path = tmp_path / "sd15-vae.safetensors"
    save_file(_to_original_layout(vae.state_dict(), 4), str(path))
    data = tmp_path / "data"
    shutil.copytree(own_dataset, data)
    result = run("-m", "interposer", "data", "add-space", "--data", str(data), "--space", f"v1={path}",
                 "--gpus-per-worker", "0", "--trust-remote-code", env=_ray(ray_session))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    manifest = json.loads((data / "manifest.json").read_text())
    v1 = manifest["spaces"]["v1"]
    assert v1["fingerprint"] == file_sha256(path) and v1["tiles"] == manifest["counts"]["tiles"] and v1["code"] is None
