import shutil

import pytest
import torch

import interposer.converter as convert_module
from interposer import convert, get_space


@pytest.fixture
def home_with(isolated_home, reference):
    """Put released-layout reference files into $INTERPOSER_HOME, as a user would."""

    def put(*pairs: str):
        for pair in pairs:
            shutil.copy(reference / f"{pair}_interposer-v4.0.safetensors", isolated_home)

    return put


@pytest.mark.parametrize("pair", ["xl-to-v1", "fx-to-v1", "v1-to-v3", "ca-to-xl"])
def test_matches_reference(pair, home_with, ref_io):
    home_with(pair)
    src, dst = pair.split("-to-")
    x, expected = ref_io(pair)
    y = convert(x, src, dst)
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert (y - expected).abs().max().item() <= 1e-5


def test_same_space_is_unchanged():
    x = torch.randn(1, 4, 8, 8)
    assert convert(x, "sdxl", "xl") is x


def test_channel_mismatch_names_both():
    with pytest.raises(ValueError, match=r"fx latents have 16 channels, but these have 4"):
        convert(torch.randn(1, 4, 8, 8), "fx", "v1")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, T, H, W\)"):
        convert(torch.randn(4, 8, 8), "xl", "v1")


def test_unreleased_pair_lists_pairs():
    with pytest.raises(FileNotFoundError, match=r"released pairs: v1->xl"):
        convert(torch.randn(1, 4, 8, 8), "v1", "ca")


def test_video_is_converted_frame_by_frame(home_with):
    home_with("xl-to-v1")
    video = torch.randn(2, 4, 3, 16, 24)  # (B, C, T, H, W)
    y = convert(video, "xl", "v1")
    assert y.shape == (2, 4, 3, 16, 24)
    for t in range(3):
        assert torch.equal(y[:, :, t], convert(video[:, :, t].contiguous(), "xl", "v1"))


def test_chunking_gives_the_same_result(home_with, monkeypatch):
    home_with("xl-to-v1")
    x = torch.randn(7, 4, 16, 24)
    full = convert(x, "xl", "v1")
    # the same up to float rounding: oneDNN may pick another convolution kernel for another batch size
    torch.testing.assert_close(full, convert(x, "xl", "v1", chunk_size=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, convert(x, "xl", "v1", chunk_size=3), atol=1e-5, rtol=1e-5)
    # the default bound on pixels per pass splits a large batch the same way
    monkeypatch.setattr(convert_module, "MAX_PIXELS_PER_CHUNK", 2 * 16 * 24)
    calls = []
    model = convert_module._model("xl", "v1", None, (), torch.device("cpu"), torch.float32)
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    torch.testing.assert_close(full, convert(x, "xl", "v1"), atol=1e-5, rtol=1e-5)
    handle.remove()
    assert calls == [2, 2, 2, 1]


def test_scaled_layout(home_with, ref_io):
    home_with("fx-to-v1")
    raw, expected = ref_io("fx-to-v1")
    scaled_in = (raw - 0.1159) * 0.3611  # what a Flux pipeline feeds its transformer (unpacked)
    y = convert(scaled_in, "flux", "sd15", layout="scaled")
    torch.testing.assert_close(y, expected * 0.18215, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout must be 'raw' or 'scaled'"):
        convert(scaled_in, "fx", "v1", layout="pipeline")


def test_dtypes_and_no_autograd(home_with, ref_io):
    home_with("xl-to-v1")
    x, expected = ref_io("xl-to-v1")
    y16 = convert(x.half(), "xl", "v1")  # CPU: computed in fp32, returned in fp16
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), expected, atol=2e-2, rtol=2e-2)
    ybf = convert(x.bfloat16(), "xl", "v1")
    assert ybf.dtype == torch.bfloat16
    torch.testing.assert_close(ybf.float(), expected, atol=0.1, rtol=0.1)
    y = convert(x.clone().requires_grad_(True), "xl", "v1")
    assert not y.requires_grad and y.device == x.device
    with pytest.raises(TypeError, match="floating point"):
        convert(torch.zeros(1, 4, 8, 8, dtype=torch.int64), "xl", "v1")


def test_model_is_loaded_once(home_with):
    home_with("xl-to-v1")
    before = convert_module._loads
    x = torch.randn(1, 4, 8, 8)
    for _ in range(3):
        convert(x, "xl", "v1")
    convert(x, "sdxl", "sd1")  # aliases share the cached model
    assert convert_module._loads - before == 1


def test_cascade_halves_resolution(home_with):
    home_with("ca-to-xl")
    assert get_space("ca").factor == 4
    assert convert(torch.randn(1, 4, 64, 48), "cascade", "xl").shape == (1, 4, 32, 24)


def test_empty_and_nonfinite_batches_are_refused_before_any_weights_load():
    with pytest.raises(ValueError, match=r"latents are empty \(shape \(0, 4, 8, 8\)\)"):
        convert(torch.zeros(0, 4, 8, 8), "xl", "v1")
    x = torch.zeros(2, 4, 8, 8)
    x[1, 2, 3, 4] = float("-inf")
    with pytest.raises(ValueError, match=r"latents hold 1 NaN/inf value\(s\) of 512"):
        convert(x, "xl", "v1")
