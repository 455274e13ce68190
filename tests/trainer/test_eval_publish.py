import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fakehub import FakeHub
from helpers import run
from interposer import InterposerModel, save_interposer
from interposer.trainer.evaluate import apply_linear, evaluate, fit_linear, image_metrics, mean_delta_e
from interposer.trainer.publish import publish, stage


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_linear_baseline_is_exact_on_affine_data(scale):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    src = torch.randn(6, 4, 8, 8, generator=g)
    dst = apply_linear(w, b, src, scale)  # (6, 16, 8*scale, 8*scale): truly affine per pixel
    w_fit, b_fit = fit_linear(src, dst, scale)
    torch.testing.assert_close(w_fit, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_fit, b, atol=1e-4, rtol=1e-4)
    assert (apply_linear(w_fit, b_fit, src, scale) - dst).abs().max() < 1e-4


def test_metrics_agree_with_the_library_on_known_images():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    ref = rng.random((32, 32, 3))
    noisy = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    psnr, ssim = image_metrics(noisy, ref)
    assert psnr == pytest.approx(10 * np.log10(1.0 / np.mean((noisy - ref) ** 2)), rel=1e-9)
    assert ssim == pytest.approx(structural_similarity(ref, noisy, data_range=1.0, channel_axis=2), rel=1e-9)
    assert mean_delta_e(ref, ref) == pytest.approx(0.0, abs=1e-9)
    grey = np.full((8, 8, 3), 0.5)
    redder = grey.copy()
    redder[..., 0] = 0.6
    assert mean_delta_e(redder, grey) > 3  # a visible colour shift


def test_eval_rows_and_eval_json(reference, dataset, tmp_path):
    result = evaluate(str(reference / "export"), str(dataset), split="all", limit=6)
    assert [r["method"] for r in result["rows"]] == ["interposer", "round trip", "linear", "identity"]
    assert result["tiles"] == 6 and (result["src"], result["dst"]) == ("xl", "v1")
    for r in result["rows"]:
        assert r["latent_l1"] > 0 and r["ms_per_latent"] > 0 and 0 < r["psnr_tile"] < 100
    out = tmp_path / "eval.json"
    cli = run("-m", "interposer", "eval", "--model", str(reference), "--data", str(dataset), "--split", "all",
              "--limit", "4", "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    assert "round trip" in cli.stdout and "linear" in cli.stdout
    assert json.loads(out.read_text())["tiles"] == 4
    # the picture beside eval.json: a row per tile (4), a column each for the original, the target VAE's own
    # decode, the interposer, the round trip and the linear map, 64 px tiles
    from PIL import Image

    assert json.loads(out.read_text())["grid"] == "eval.png" and "eval.png" in cli.stdout
    with Image.open(tmp_path / "eval.png") as grid:
        assert grid.format == "PNG" and grid.size == (5 * 68 + 4, 16 + 4 * 68 + 4)
        cells = np.asarray(grid.convert("RGB"))
    first, linear = cells[20:84, 4:68], cells[20:84, 4 + 4 * 68 : 68 + 4 * 68]  # original tile, linear map's
    assert first.std() > 10 and linear.std() > 1 and not np.array_equal(first, linear)
    # --split val without --val-fraction: the run's own share (0.2 in TINY), recorded in its export
    from interposer.trainer.data import PairReader

    held_out = len(PairReader(str(dataset), "xl", "v1", 0.2).take("val"))
    assert held_out != len(PairReader(str(dataset), "xl", "v1", 0.02).take("all"))
    cli = run("-m", "interposer", "eval", "--model", str(reference), "--data", str(dataset), "--split", "val",
              "--limit", "0", "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    assert "validation share 0.2 (the run's own" in cli.stdout
    assert json.loads(out.read_text())["tiles"] == held_out


def test_a_source_image_gone_since_the_build_is_named_in_one_line(dataset, tmp_path):
    from PIL import Image

    from interposer.pipeline.schema import read_manifest
    from interposer.trainer.evaluate import _original

    manifest, gone = read_manifest(str(dataset)), tmp_path / "moved.png"
    for present in (False, True):  # gone; then another image in its place (its sha256 is not the indexed one)
        if present:
            Image.new("RGB", (64, 64), (200, 30, 30)).save(gone)
        with pytest.raises(FileNotFoundError, match=rf"tile 0 of {gone}: the dataset's source image cannot be re-cut "
                                                    r"\(missing, or not the bytes the build read\).*moved\?"):
            _original(dict(uri=str(gone), image_id="0" * 64, tile_index=0), manifest)


def test_eval_with_a_vae_of_the_wrong_shape_is_one_line(reference, dataset, vaes):
    with pytest.raises(ValueError, match=r"--vae v1=.*: it makes latents of shape \(16, 8, 8\) from a 64px image; "
                                         r"v1: 4 channels.* needs \(4, 8, 8\)"):
        evaluate(str(reference / "export"), str(dataset), split="all", limit=2, vaes={"v1": str(vaes["fx"])})


@pytest.fixture
def v4_run(tmp_path, dataset):
    """A run folder as `interposer train` leaves it, for the v4 architecture, with an eval.json."""
    torch.manual_seed(0)
    run_dir = tmp_path / "runs" / "xl-v1"
    save_interposer(InterposerModel().eval(), run_dir / "export", "xl", "v1", version="v5.0")
    (run_dir / "interposer-run.json").write_text(json.dumps(dict(config={"steps": 123, "lr": 5e-4},
                                                                 data=str(dataset), finished=123)))
    rows = [dict(method=m, latent_l1=0.1 * i, latent_mse=0.2, psnr_tile=25.0, ssim_tile=0.8, psnr_target=30.0,
                 ssim_target=0.9, delta_e=1.5, ms_per_latent=0.5) for i, m in enumerate(["interposer", "linear"], 1)]
    (run_dir / "export" / "eval.json").write_text(json.dumps(dict(rows=rows, tiles=6, split="val", tile_size=64,
                                                                  device="cpu")))
    return run_dir


def test_staging_folder_holds_exactly_what_is_pushed(v4_run, tmp_path):
    folder = tmp_path / "stage"
    files = stage(v4_run, "me/xl-to-v1", "v5.0", folder)
    assert [str(f) for f in files] == ["README.md", "config.json", "eval.json", "model.safetensors",
                                       "v5.0/xl-to-v1_interposer-v5.0.safetensors"]
    assert load_file(str(folder / "v5.0/xl-to-v1_interposer-v5.0.safetensors")).keys() == \
        load_file(str(folder / "model.safetensors")).keys()
    card = (folder / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "latent-interposer"
    assert {"latent-space-xl", "latent-space-v1"} <= set(meta["tags"])
    assert "| interposer | 0.1000 | 0.2000 | 25.00 | 0.8000 | 30.00 | 0.9000 | 1.50 | 0.50 |" in card
    assert "| linear | 0.2000 |" in card
    assert '"steps": 123' in card and "tiles of 64 px" in card and "sha256:" in card
    # the usage loads this repository's weights (weights=None would load city96's)
    assert 'model = load_interposer("me/xl-to-v1")' in card and "weights=None" not in card
    assert "--weights v5.0/xl-to-v1_interposer-v5.0.safetensors" in card
    # no local path in anything staged: the dataset by its fingerprint, local VAEs by their weights
    config = json.loads((folder / "config.json").read_text())
    assert "data" not in config and config["dataset_fingerprint"].startswith("sha256:")
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".md", ".json"):
            text = f.read_text()
            assert str(tmp_path.parent) not in text and "/tmp/" not in text, (f.name, text[:500])
    assert "a local VAE folder (weights sha256:" in card


def test_the_eval_picture_is_published_in_the_card(v4_run, tmp_path):
    from PIL import Image

    export = v4_run / "export"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(export / "eval.png")
    ev = json.loads((export / "eval.json").read_text())
    (export / "eval.json").write_text(json.dumps(dict(ev, grid="eval.png")))
    files = stage(v4_run, "me/xl-to-v1", "v5.0", tmp_path / "stage")
    assert "eval.png" in [str(f) for f in files]
    assert (tmp_path / "stage" / "eval.png").read_bytes() == (export / "eval.png").read_bytes()
    assert "![original, VAE, round trip, interposer, linear](eval.png)" in (tmp_path / "stage" / "README.md").read_text()


def test_a_model_of_another_width_is_published_without_released_layout_claims(dataset, tmp_path):
    run_dir = tmp_path / "runs" / "small"
    save_interposer(InterposerModel(ch_mid=16, blocks=2).eval(), run_dir / "export", "xl", "v1", version="v5.0")
    files = stage(run_dir, "me/small", "v5.0", tmp_path / "stage")
    assert [str(f) for f in files] == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "v5.0/" not in card and "_interposer-v5.0" not in card and "(16 wide, 2 blocks)" in card
    assert "ComfyUI/models/interposers/xl-to-v1/" in card


def test_identical_exports_are_byte_identical(tmp_path):
    code = ("import sys, torch; from interposer import InterposerModel, save_interposer; torch.manual_seed(0); "
            "save_interposer(InterposerModel(ch_mid=8, blocks=1).eval(), sys.argv[1], 'xl', 'v1')")
    for name in ("a", "b"):  # separate processes: a map written in hash order would differ between them
        assert run("-c", code, str(tmp_path / name)).returncode == 0
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_publish_one_commit_to_a_loopback_hub_and_load_it_back(v4_run, monkeypatch, capsys, tmp_path):
    from huggingface_hub import constants

    token = "hf_test_secret_do_not_print"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # for this test only; the endpoint is loopback
    with FakeHub() as hub:
        publish(v4_run, "me/xl-to-v1", rev="v5.0", endpoint=hub.endpoint)
        assert len(hub.commits) == 1
        assert hub.commits[0]["files"] == ["README.md", "config.json", "eval.json", "model.safetensors",
                                           "v5.0/xl-to-v1_interposer-v5.0.safetensors"]
        assert any(h.get("authorization") == f"Bearer {token}" for m, p, h in hub.requests if "commit" in p)
        out = capsys.readouterr()
        assert token not in out.out + out.err
        # the real client, in a fresh process pointed at the loopback Hub, reads what was pushed
        env = hub.client_env(tmp_path / "cache")
        code = ("import torch; from interposer import load_interposer; from safetensors.torch import load_file; "
                f"m = load_interposer('me/xl-to-v1'); w = load_file({str(v4_run / 'export' / 'model.safetensors')!r}); "
                "print(m.src, m.dst, m.version, all(torch.equal(v, m.state_dict()[k]) for k, v in w.items()))")
        result = run("-c", code, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["xl", "v1", "v5.0", "True"]


def test_no_token_stops_before_anything_is_sent(v4_run, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with FakeHub() as hub:
        with pytest.raises(PermissionError, match="no Hugging Face token: set HF_TOKEN"):
            publish(v4_run, "me/xl-to-v1", endpoint=hub.endpoint)
        assert hub.requests == []


def test_dry_run_lists_files_and_sends_nothing(v4_run):
    result = run("-m", "interposer", "publish", "--model", str(v4_run), "--repo", "me/xl-to-v1", "--dry-run",
                 env={"HF_TOKEN": ""})
    assert result.returncode == 0, result.stderr
    assert "would push to me/xl-to-v1" in result.stdout and "v5.0/xl-to-v1_interposer-v5.0.safetensors" in result.stdout
    assert "sha256" in result.stdout
    bad = run("-m", "interposer", "publish", "--model", str(v4_run), "--repo", "not-a-repo", "--dry-run")
    assert bad.returncode == 2 and "expected ORG/NAME" in bad.stderr
