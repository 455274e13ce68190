"""Trainer fixtures shared by the training, evaluation and publishing tests (built once per session)."""

from pathlib import Path

import pytest

from interposer.pipeline.build import BuildConfig, build
from interposer.trainer.config import TrainConfig
from interposer.trainer.driver import RunSpec, train

from helpers import TINY_TRAIN as TINY


@pytest.fixture(scope="session")
def dataset(ray_session, photos, vaes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "xl-v1"
    build(BuildConfig(images=[str(photos)], spaces=[f"v1={vaes['v1']}", f"xl={vaes['xl']}"], out=str(out),
                      tile_size=64, max_tiles=6, min_size=64, shard_size=2, quiet=True))
    return out


@pytest.fixture(scope="session")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted run must end equal to."""
    runs = tmp_path_factory.mktemp("runs")
    train(TrainConfig.of(**TINY), RunSpec(str(dataset), str(runs), "ref"))
    return runs / "ref"


