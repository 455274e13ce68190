import pytest
import torch
from safetensors.torch import load_file

from helpers import reference_args, reference_pairs
from interposer.model import InterposerModel


@pytest.mark.parametrize("pair", reference_pairs())
def test_reproduces_reference_outputs(pair, reference, ref_io):
    model = InterposerModel(**reference_args(pair)).eval()
    state = load_file(str(reference / f"{pair}_interposer-v4.0.safetensors"))
    model.load_state_dict(state, strict=True)
    x, expected = ref_io(pair)
    with torch.no_grad():
        y = model(x)
    assert y.shape == expected.shape
    assert (y - expected).abs().max().item() <= 1e-5


def test_reference_files_are_all_tested():
    assert set(reference_pairs()) >= {"xl-to-v1", "fx-to-v1", "v1-to-v3", "ca-to-xl"}


@pytest.mark.parametrize("pair", reference_pairs())
def test_state_dict_layout_matches_v4(pair, layout):
    model = InterposerModel(**layout["config"][pair])
    expected = layout["state_dict_shapes"][pair]
    assert list(model.state_dict()) == list(expected)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_size_and_shapes():
    model = InterposerModel(ch_in=4, ch_out=16, scale=0.5).eval()
    assert 1.3e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    with torch.no_grad():
        assert model(torch.randn(3, 4, 32, 40)).shape == (3, 16, 16, 20)


def test_rejects_wrong_input():
    model = InterposerModel(ch_in=16, ch_out=4)
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 16, H, W\), got \(1, 4, 8, 8\)"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="ch_in must be a positive integer"):
        InterposerModel(ch_in=0)


def test_init_weights_follow_v4_recipe():
    model = InterposerModel()
    model.init_weights(torch.Generator().manual_seed(0))
    conv = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    bn = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("args", [dict(), dict(ch_in=16, scale=0.5, blocks=2), dict(scale=2.0, blocks=0)])
def test_in_place_inference_is_bit_identical_and_leaves_input_alone(args):
    model = InterposerModel(**args).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(2, model.ch_in, 16, 16, requires_grad=True)
    kept = x.detach().clone()
    y_grad = model(x)  # autograd records: the out-of-place path
    y_grad.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        y_nograd = model(x)
    with torch.inference_mode():
        y_inference = model(x.detach())
    assert torch.equal(y_grad.detach(), y_nograd) and torch.equal(y_nograd, y_inference)
    assert torch.equal(x.detach(), kept)
