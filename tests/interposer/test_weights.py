import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from interposer import InterposerModel, WeightsNotFoundError, load_interposer, save_interposer, save_released
from interposer.spaces import get_space
from interposer.weights import find_local, hub_cached


def _released(reference, pair="xl-to-v1"):
    return reference / f"{pair}_interposer-v4.0.safetensors"


def _seeded(**args) -> InterposerModel:
    torch.manual_seed(0)
    model = InterposerModel(**args)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_our_format_round_trip(tmp_path):
    model = _seeded(ch_in=4, ch_out=16)
    folder = save_interposer(model, tmp_path / "run", "xl", "sd3", version="v5.0")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    spaces = config.pop("spaces")  # both definitions travel with the model
    assert spaces == {"xl": get_space("xl").to_dict(), "v3": get_space("v3").to_dict()}
    assert config == dict(architecture="interposer-v4", ch_in=4, ch_out=16, ch_mid=64, blocks=12, scale=1.0,
                          src="xl", dst="v3", version="v5.0", layout="raw")
    loaded = load_interposer(str(folder))
    assert (loaded.src, loaded.dst, loaded.version, loaded.training) == ("xl", "v3", "v5.0", False)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the same folder through the pair API, and its weights file alone
    assert load_interposer("xl", "v3", weights=folder).source == str(folder)
    assert load_interposer("xl", "v3", weights=folder / "model.safetensors").dst == "v3"


def test_save_released_layout_loads_as_released(tmp_path, reference, ref_io):
    model = load_interposer("xl", "v1", weights=_released(reference))
    out = save_released(model, tmp_path / "xl-to-v1_interposer-v5.0.safetensors")
    assert list(load_file(str(out))) == list(load_file(str(_released(reference))))
    x, expected = ref_io("xl-to-v1")
    with torch.no_grad():
        assert (load_interposer("xl", "v1", weights=out)(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("where", ["direct", "v4.0", "ours"])
def test_found_in_interposer_home(where, isolated_home, reference, ref_io):
    if where == "direct":
        shutil.copy(_released(reference), isolated_home)
    elif where == "v4.0":
        (isolated_home / "v4.0").mkdir()
        shutil.copy(_released(reference), isolated_home / "v4.0")
    else:
        model = load_interposer("xl", "v1", weights=_released(reference))
        save_interposer(model, isolated_home / "xl-to-v1", "xl", "v1")
    model = load_interposer("sdxl", "sd15")
    assert model.source.startswith(str(isolated_home))
    x, expected = ref_io("xl-to-v1")
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5


def test_search_dirs_after_home(tmp_path, isolated_home, reference):
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(_released(reference), extra)
    assert load_interposer("xl", "v1", search_dirs=[extra]).source == str(extra / _released(reference).name)
    shutil.copy(_released(reference), isolated_home)
    assert find_local("xl", "v1", [extra]) == isolated_home / _released(reference).name


def test_hub_cache_is_used_offline(tmp_path, reference, ref_io):
    # Lay out the Hub cache exactly as huggingface_hub does; offline, hf_hub_download must serve it.
    from huggingface_hub import constants

    repo = tmp_path / "hf-cache" / "models--city96--SD-Latent-Interposer"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "v4.0").mkdir(parents=True)
    shutil.copy(_released(reference), repo / "snapshots" / commit / "v4.0")
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf-cache")
    assert hub_cached("xl", "v1") is not None
    model = load_interposer("xl", "v1")
    assert "models--city96--SD-Latent-Interposer" in model.source
    x, expected = ref_io("xl-to-v1")
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5


def test_missing_offline_names_file_and_folder(isolated_home):
    expected = rf"HF_HUB_OFFLINE is set.*xl-to-v1_interposer-v4.0.safetensors.*{isolated_home}"
    with pytest.raises(WeightsNotFoundError, match=expected):
        load_interposer("xl", "v1")


def test_unreleased_pair_lists_released_ones():
    expected = r"no released interposer for v1 -> wan.*released pairs: v1->xl, xl->v1"
    with pytest.raises(WeightsNotFoundError, match=expected):
        load_interposer("v1", "wan")


def test_unknown_space():
    with pytest.raises(ValueError, match="unknown latent space 'sdxxl'"):
        load_interposer("sdxxl", "v1")


def test_bad_files_are_refused(tmp_path, reference):
    pickle = tmp_path / "xl-to-v1.pt"
    torch.save({}, pickle)
    with pytest.raises(ValueError, match=r"only \.safetensors weights are loaded"):
        load_interposer("xl", "v1", weights=pickle)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_interposer("xl", "v1", weights=garbage)
    # a released file for another pair: its name says so (v1 -> xl would run xl -> v1 without a word)
    with pytest.raises(ValueError, match=r"its name says xl -> v1, but v1 -> xl was asked"):
        load_interposer("v1", "xl", weights=_released(reference))
    with pytest.raises(ValueError, match=r"its name says fx -> v1, but xl -> v1 was asked"):
        load_interposer("xl", "v1", weights=_released(reference, "fx-to-v1"))
    # renamed: fx -> v1 weights (16 input channels) offered as xl -> v1 (4): the strict load names the mismatch
    renamed = tmp_path / "weights.safetensors"
    shutil.copy(_released(reference, "fx-to-v1"), renamed)
    with pytest.raises(ValueError, match=r"weights do not fit the interposer.*head\.short\.weight"):
        load_interposer("xl", "v1", weights=renamed)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(_released(reference).read_bytes()[:-1000])  # cut short, as a broken download
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_interposer("xl", "v1", weights=truncated)
    partial = tmp_path / "partial.safetensors"
    state = load_file(str(_released(reference)))
    state.pop("tail.bias")
    save_file(state, str(partial))
    with pytest.raises(ValueError, match="Missing key.*tail.bias"):
        load_interposer("xl", "v1", weights=partial)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_interposer("xl", "v1", weights=tmp_path / "nope.safetensors")


def test_folder_for_another_pair_is_refused(tmp_path):
    folder = save_interposer(_seeded(), tmp_path / "run", "xl", "v1")
    with pytest.raises(ValueError, match=r"converts xl -> v1, not v1 -> xl"):
        load_interposer("v1", "xl", weights=folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not an interposer config"):
        load_interposer(str(folder))


def test_save_refuses_wrong_channels(tmp_path):
    with pytest.raises(ValueError, match=r"model maps 4 -> 4 channels but fx -> v1 needs 16 -> 4"):
        save_interposer(_seeded(), tmp_path / "x", "fx", "v1")


def test_dtype_is_applied(reference):
    model = load_interposer("xl", "v1", weights=_released(reference), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
