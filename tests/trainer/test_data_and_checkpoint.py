import random

import numpy as np
import pytest
import torch

from interposer.trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from interposer.trainer.config import TrainConfig
from interposer.pipeline.standins import write_synthetic_dataset
from interposer.trainer.data import CropStream, PairReader, is_validation
from interposer.trainer.step import build_models, build_optim, train_step


def test_validation_split_is_by_image():
    ids = [f"{i:064x}" for i in range(2000)]
    val = [i for i in ids if is_validation(i, 0.1)]
    assert 150 < len(val) < 250
    assert val == [i for i in ids if is_validation(i, 0.1)]  # deterministic


def _coords(keys, shape, factor):
    """(n, 2, h, w): each latent pixel holds the image-pixel coordinates of its corner."""
    _, h, w = shape
    y = np.arange(h).reshape(1, h, 1).repeat(w, 2) * factor
    x = np.arange(w).reshape(1, 1, w).repeat(h, 1) * factor
    return np.broadcast_to(np.stack([y, x], 1), (len(keys), 2, h, w)).astype(np.float16)


def _numbered(keys, shape):
    """Each tile's latent spells its name: channels 0 and 1 a number from its image id, 2 its tile index."""
    out = np.zeros((len(keys), *shape), np.float16)
    for i, k in enumerate(keys):
        n = int(k[:8], 16) % 10**6
        out[i, 0], out[i, 1], out[i, 2] = n // 1000, n % 1000, int(k[65:])
    return out


def _numbers(tiles: np.ndarray) -> list[int]:
    return [int(t[0, 0, 0]) * 10**4 + int(t[1, 0, 0]) * 10 + int(t[2, 0, 0]) for t in tiles]


@pytest.fixture
def numbered(tmp_path):
    """9 shards of 40 images x 3 tiles (Poisson-sized), every tile's latent filled with its number."""
    folder = tmp_path / "numbered"
    write_synthetic_dataset(folder, images=40, tiles_per_image=3, shard_size=5,
                            spaces={"xl": (4, 8, 8), "v1": (4, 8, 8)}, fill=lambda c, k, s: _numbered(k, s))
    return folder


def test_crops_are_aligned_across_factors(tmp_path):
    # Stable Cascade (4x) -> an 8x space: the target crop covers the same image region at half the size
    folder = write_synthetic_dataset(tmp_path / "d", images=5, tiles_per_image=1, shard_size=2,
                                     spaces={"ca": (2, 32, 32), "xl": (2, 16, 16)},
                                     fill=lambda c, k, s: _coords(k, s, 4 if c == "ca" else 8))
    stream = CropStream(PairReader(str(folder), "ca", "xl", 0.0), crop=8, batch=4, seed=0, rank=0, world=1)
    for step in range(5):
        src, dst = stream.next(step)
        assert src.shape == (4, 2, 8, 8) and dst.shape == (4, 2, 4, 4)
        assert torch.equal(src[:, :, ::2, ::2], dst)
        assert src.std() > 0  # crops start at different places
    stream.close()


@pytest.mark.parametrize("world", [1, 2, 3, 12])
def test_an_epoch_gives_every_train_tile_once_split_over_the_ranks(numbered, world):
    reader = PairReader(str(numbered), "xl", "v1", 0.2)
    train = sorted(_numbers(reader.take("train").src))
    val = _numbers(reader.take("val").src)
    assert val and not set(val) & set(train) and len(set(train)) + len(val) == 120 == len(train) + len(val)
    seen = []
    for rank in range(world):  # 12 ranks > 9 shards: shards are cut into slices so each rank has a unit
        stream = CropStream(reader, crop=4, batch=world, seed=3, rank=rank, world=world, prefetch=rank % 2 == 0)
        while stream.epoch == 0:
            seen += _numbers(stream.tiles(1)[0])
        stream.close()
    assert sorted(seen) == train


def test_the_stream_is_a_function_of_seed_and_position(numbered):
    reader = PairReader(str(numbered), "xl", "v1", 0.1)
    def run(rank, world, steps, state=None, first=0):
        stream = CropStream(reader, crop=4, batch=8, seed=1, rank=rank, world=world)
        if state:
            stream.load_state_dict(state)
        out = [stream.next(step) for step in range(first, steps)]
        stream.close()
        return out, stream.state_dict()

    for world in (1, 2):
        for rank in range(world):
            whole, _ = run(rank, world, 30)  # 30 steps: more than one epoch for every rank
            _, at = run(rank, world, 11)
            resumed, _ = run(rank, world, 30, at, first=11)
            assert at["epoch"] >= 0 and len(whole) == 30
            for (a, b), (c, d) in zip(whole[11:], resumed):
                assert torch.equal(a, c) and torch.equal(b, d)
    other, _ = run(1, 2, 1)
    mine, _ = run(0, 2, 1)
    assert not torch.equal(other[0][0], mine[0][0])
    with pytest.raises(ValueError, match="rank 0 of 2"):
        CropStream(reader, 4, 8, 1, 1, 2).load_state_dict(run(0, 2, 1)[1])


def test_validation_reads_only_the_shards_it_uses(numbered):
    reader = PairReader(str(numbered), "xl", "v1", 0.5)
    first = reader.take("val", 2)
    assert len(first) == 2
    shards = {int(k[:16], 16) * reader.shards >> 64 for k in first.rows.column("tile_key").to_pylist()}
    for shard in range(max(shards) + 1, reader.shards):  # what it need not read is gone: it still works
        (numbered / "latents" / "xl" / f"part-{shard:05d}.parquet").unlink()
    again = PairReader(str(numbered), "xl", "v1", 0.5).take("val", 2)
    assert np.array_equal(again.src, first.src)


def test_an_empty_train_split_is_named(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "d", images=2, tiles_per_image=1, shard_size=1,
                                     spaces={"xl": (4, 8, 8), "v1": (4, 8, 8)})
    reader = PairReader(str(folder), "xl", "v1", 0.999999)
    with pytest.raises(ValueError, match="no train tiles"):
        reader.take("train")
    stream = CropStream(reader, 4, 2, 0, 0, 1)
    with pytest.raises(ValueError, match="finds no training tiles"):
        stream.next(0)
    stream.close()


def test_checkpoint_save_change_load(tmp_path):
    cfg = TrainConfig.of(ch_mid=8, blocks=1, batch=4, crop=8, steps=10, b_loss_weight=1.0)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary), "secondary": build_optim(cfg, secondary)}
    src, dst = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for step in range(3):
        train_step(cfg, primary, secondary, list(optims.values()), src, dst, torch.device("cpu"), step=step)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    rngs = [rng_state()]
    save_checkpoint(tmp_path / "ck", primary, secondary, optims, 3, [{"epoch": 0}], rngs, cfg.to_dict(), "sha256:x")
    expected = {k: v.clone() for k, v in primary.state_dict().items()}
    expected_avg = optims["primary"][0].state_dict()["state"][0]["exp_avg"].clone()

    p2, s2 = build_models(TrainConfig.of(ch_mid=8, blocks=1, batch=4, crop=8, steps=10, b_loss_weight=1.0, seed=9))
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
    cfg = TrainConfig.of(ch_mid=8, blocks=1, batch=4, crop=8, steps=10)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary)}
    folder = save_checkpoint(tmp_path / "ck", primary, secondary, optims, 1, [{"epoch": 0}], [rng_state()],
                             cfg.to_dict(), "sha256:x")
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {folder} is unreadable"):
        load_checkpoint(folder, primary, secondary, optims)


def test_truncated_latest_checkpoint_falls_back_only_when_asked(tmp_path):
    from interposer.trainer.checkpoint import load_with_fallback

    cfg = TrainConfig.of(ch_mid=8, blocks=1, batch=4, crop=8, steps=10)
    primary, secondary = build_models(cfg)
    optims = {"primary": build_optim(cfg, primary)}
    src, dst = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    saved = {}
    for step, name in ((1, "checkpoint_2026-01-01_00-00-01"), (2, "checkpoint_2026-01-01_00-00-02")):
        train_step(cfg, primary, secondary, list(optims.values()), src, dst, torch.device("cpu"), step=step)
        save_checkpoint(tmp_path / name, primary, secondary, optims, step, [{"epoch": 0}], [rng_state()],
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
