import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig
from trainer.data import CropSampler, PairData, is_validation
from trainer.step import build_models, build_optim, train_step


def test_validation_split_is_by_image():
    ids = [f"{i:064x}" for i in range(2000)]
    val = [i for i in ids if is_validation(i, 0.1)]
    assert 150 < len(val) < 250
    assert val == [i for i in ids if is_validation(i, 0.1)]  # deterministic


def _coords(n: int, h: int, w: int, factor: int) -> torch.Tensor:
    """(n, 2, h, w): each latent pixel holds the image-pixel coordinates of its corner."""
    y = torch.arange(h).view(1, h, 1).expand(n, h, w) * factor
    x = torch.arange(w).view(1, 1, w).expand(n, h, w) * factor
    return torch.stack([y, x], 1).half()


def test_crops_are_aligned_across_factors():
    # Stable Cascade (4x) -> an 8x space: the target crop covers the same image region at half the size
    data = PairData(_coords(5, 32, 32, 4), _coords(5, 16, 16, 8), ["a"] * 5)
    sampler = CropSampler(data, "ca", "xl", crop=8, batch=4, seed=0, rank=0, world=1)
    for _ in range(5):
        src, dst = sampler.next()
        assert src.shape == (4, 2, 8, 8) and dst.shape == (4, 2, 4, 4)
        assert torch.equal(src[:, :, ::2, ::2], dst)


def test_sampler_is_a_function_of_seed_step_and_rank():
    data = PairData(torch.randn(20, 4, 16, 16).half(), torch.randn(20, 4, 16, 16).half(), ["a"] * 20)
    a = CropSampler(data, "xl", "v1", 8, 8, seed=1, rank=0, world=2)
    b = CropSampler(data, "xl", "v1", 8, 8, seed=1, rank=0, world=2)
    other_rank = CropSampler(data, "xl", "v1", 8, 8, seed=1, rank=1, world=2)
    first = [a.next() for _ in range(5)]
    b.load_state_dict(CropSampler(data, "xl", "v1", 8, 8, 1, 0, 2).state_dict() | {"step": 3})
    assert torch.equal(b.next()[0], first[3][0])  # resumed mid-epoch: the same batch
    assert first[0][0].shape == (4, 4, 8, 8)
    assert not torch.equal(other_rank.next()[0], first[0][0])


def test_checkpoint_save_change_load(tmp_path):
    cfg = TrainConfig(ch_mid=8, blocks=1, batch=4, crop=8, steps=10, b_loss_weight=1.0)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary), "secondary": build_optim(cfg, secondary)}
    src, dst = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for step in range(3):
        train_step(cfg, primary, secondary, list(optims.values()), src, dst, torch.device("cpu"), step=step)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    rngs = [rng_state()]
    save_checkpoint(tmp_path / "ck", primary, secondary, optims, 3, {"step": 3}, rngs, cfg.to_dict(), "sha256:x")
    expected = {k: v.clone() for k, v in primary.state_dict().items()}
    expected_avg = optims["primary"][0].state_dict()["state"][0]["exp_avg"].clone()

    p2, s2 = build_models(TrainConfig(ch_mid=8, blocks=1, batch=4, crop=8, steps=10, b_loss_weight=1.0, seed=9))
    optims2 = {"primary": build_optim(cfg, p2), "secondary": build_optim(cfg, s2)}
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(tmp_path / "ck", p2, s2, optims2)
    set_rng_state(state["rng"][0])
    for k, v in expected.items():
        assert torch.equal(p2.state_dict()[k], v), k
    assert torch.equal(optims2["primary"][0].state_dict()["state"][0]["exp_avg"], expected_avg)
    assert optims2["primary"][1].last_epoch == 3 and state["step"] == 3
    restored = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert restored == (random.random(), np.random.rand(), torch.rand(1).item())


def test_corrupt_checkpoint_names_the_folder(tmp_path):
    cfg = TrainConfig(ch_mid=8, blocks=1, batch=4, crop=8, steps=10)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary)}
    folder = save_checkpoint(tmp_path / "ck", primary, secondary, optims, 1, {"step": 1}, [rng_state()],
                             cfg.to_dict(), "sha256:x")
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {folder} is unreadable"):
        load_checkpoint(folder, primary, secondary, optims)


def test_truncated_latest_checkpoint_falls_back_only_when_asked(tmp_path):
    from trainer.checkpoint import load_with_fallback

    cfg = TrainConfig(ch_mid=8, blocks=1, batch=4, crop=8, steps=10)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary)}
    src, dst = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    saved = {}
    for step, name in ((1, "checkpoint_2026-01-01_00-00-01"), (2, "checkpoint_2026-01-01_00-00-02")):
        train_step(cfg, primary, secondary, list(optims.values()), src, dst, torch.device("cpu"), step=step)
        save_checkpoint(tmp_path / name, primary, secondary, optims, step, {"step": step}, [rng_state()],
                        cfg.to_dict(), "sha256:x")
        saved[step] = {k: v.clone() for k, v in primary.state_dict().items()}
    latest = tmp_path / "checkpoint_2026-01-01_00-00-02"
    data = (latest / "primary.safetensors").read_bytes()
    (latest / "primary.safetensors").write_bytes(data[:100])  # truncated, as a kill mid-upload leaves it
    p2, s2 = build_models(cfg)
    o2 = {"primary": build_optim(cfg, p2)}
    with pytest.raises(ValueError, match=rf"checkpoint {latest} is unreadable.*--fallback-checkpoint"):
        load_with_fallback(latest, p2, s2, o2, fallback=False)
    state, used = load_with_fallback(latest, p2, s2, o2, fallback=True)
    assert used.name == "checkpoint_2026-01-01_00-00-01" and state["step"] == 1
    assert all(torch.equal(p2.state_dict()[k], v) for k, v in saved[1].items())
