"""The resampling (pixel-shuffle) network: a first-class model like v4's: built from config.json, loaded by
load_interposer, convert, the ComfyUI node and publish; information-keeping resampling in both directions."""

import json

import pytest
import torch

from helpers import run
from interposer import convert, load_interposer, save_interposer
from interposer.shuffle_model import ShuffleInterposer
from interposer.weights import is_v4


def _net(ch_in, ch_out, scale, seed=0, stats=True, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    s = dict(in_mean=torch.randn(ch_in, generator=g).tolist(), in_std=(torch.rand(ch_in, generator=g) + 0.5).tolist(),
             out_mean=torch.randn(ch_out, generator=g).tolist(),
             out_std=(torch.rand(ch_out, generator=g) + 0.5).tolist()) if stats else {}
    net = ShuffleInterposer(ch_in, ch_out, 8, 2, scale, **s, **kw)
    net.init_weights(g)
    with torch.no_grad():  # a trained-looking network: the tail is zero at init
        net.tail.weight.normal_(0, 0.1, generator=g)
    return net.eval()


@pytest.mark.parametrize("scale,side,out_side", [(0.25, 16, 4), (0.5, 8, 4), (1.0, 8, 8), (2.0, 4, 8), (4.0, 2, 8)])
def test_shapes_and_every_input_pixel_counts(scale, side, out_side):
    net = _net(3, 5, scale)
    x = torch.randn(2, 3, side, side)
    y = net(x)
    assert y.shape == (2, 5, out_side, out_side)
    if scale < 1:  # unlike nearest resampling, a change at any input pixel reaches the output
        k = int(1 / scale)
        for dy in range(k):
            for dx in range(k):
                x2 = x.clone()
                x2[:, :, dy, dx] += 1.0
                assert not torch.equal(net(x2)[:, :, 0, 0], y[:, :, 0, 0]), (dy, dx)


def test_starts_as_its_linear_path_and_refuses_what_it_cannot_do():
    net = ShuffleInterposer(4, 4, 8, 1, 0.5)
    net.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), net.linear(torch.nn.functional.pixel_unshuffle(x, 2)))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 4, 7, 8))
    with pytest.raises(ValueError, match="scale must be a whole number or its inverse"):
        ShuffleInterposer(4, 4, scale=0.3)
    with pytest.raises(ValueError, match="in_std needs 4 values"):
        ShuffleInterposer(4, 4, in_std=[1.0, 2.0])
    with pytest.raises(ValueError, match="in_std must be positive"):
        ShuffleInterposer(4, 4, in_std=[1.0, 0.0, 1.0, 1.0])


def test_save_load_convert_round_trip(tmp_path, isolated_home):
    net = _net(4, 4, 0.5)  # ca (/4) -> v1 (/8): the registry pair whose factors differ
    save_interposer(net, tmp_path / "ca-v1", "ca", "v1")
    config = json.loads((tmp_path / "ca-v1" / "config.json").read_text())
    assert config["architecture"] == "interposer-shuffle" and config["scale"] == 0.5 and len(config["in_std"]) == 4
    loaded = load_interposer(str(tmp_path / "ca-v1"))
    assert isinstance(loaded, ShuffleInterposer) and loaded.args() == net.args() and not is_v4(loaded)
    state, again = net.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(loaded(x), expected)
    got = convert(x, "ca", "v1", weights=tmp_path / "ca-v1")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # channels-last kernels round differently
    got = convert(x, "ca", "v1", weights=tmp_path / "ca-v1" / "model.safetensors")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiples of 2"):
        convert(torch.randn(1, 4, 9, 9), "ca", "v1", weights=tmp_path / "ca-v1")
    # an unknown architecture is named, not guessed
    (tmp_path / "ca-v1" / "config.json").write_text(json.dumps(dict(config, architecture="interposer-v9")))
    with pytest.raises(ValueError, match="architecture 'interposer-v9' is not one of interposer-v4, interposer-shuffle"):
        load_interposer(str(tmp_path / "ca-v1"))


def test_command_line_and_comfyui_node_take_it(tmp_path):
    from safetensors.torch import load_file, save_file

    home = tmp_path / "home"
    net = _net(4, 4, 0.5, seed=3)
    save_interposer(net, home / "ca-to-v1", "ca", "v1")
    x = torch.randn(1, 4, 16, 16)
    save_file({"samples": x}, str(tmp_path / "in.safetensors"))
    result = run("-m", "interposer", "convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--src", "ca", "--dst", "v1", env={"INTERPOSER_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["samples"], expected, atol=1e-5, rtol=1e-5)
    node = run("-c", "import torch; from safetensors.torch import load_file; from interposer.comfy import "
               "LatentInterposer as N; x = load_file(r'%s')['samples']; "
               "out = N().convert({'samples': x}, 'ca', 'v1')[0]['samples']; "
               "print(float((out - load_file(r'%s')['samples']).abs().max()))"
               % (tmp_path / "in.safetensors", tmp_path / "out.safetensors"), env={"INTERPOSER_HOME": str(home)})
    assert node.returncode == 0, node.stderr
    assert float(node.stdout.strip().splitlines()[-1]) < 1e-5


def test_published_without_the_released_layout(tmp_path):
    from interposer.trainer.publish import stage

    run_dir = tmp_path / "runs" / "ca-v1"
    save_interposer(_net(4, 4, 0.5), run_dir / "export", "ca", "v1", version="v5.0")
    files = stage(run_dir, "me/ca-to-v1", "v5.0", tmp_path / "stage")
    assert [str(f) for f in files] == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "network `interposer-shuffle`: pixel (un)shuffle resampling by 0.5" in card and "_interposer-v5.0" not in card
    assert isinstance(load_interposer(str(tmp_path / "stage")), ShuffleInterposer)
