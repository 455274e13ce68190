"""Pipeline fixtures: one real local Ray session, real photographs, stand-in VAEs of the real classes."""

import shutil
from pathlib import Path

import pytest

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Real photographs that scikit-image ships (256-640 px)."""
    import skimage

    folder = tmp_path_factory.mktemp("photos")
    data = Path(skimage.__file__).parent / "data"
    for name in SKIMAGE_PHOTOS:
        shutil.copy(data / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def vaes(tmp_path_factory) -> dict[str, Path]:
    """Stand-in VAEs (real diffusers classes, tiny widths), saved to folders like a downloaded VAE."""
    from pipeline.standins import make_standin_vae

    root = tmp_path_factory.mktemp("vaes")
    return {code: make_standin_vae(code, root / code, seed=i) for i, code in
            enumerate(("v1", "xl", "v3", "fx", "fx2", "wan", "ca"))}
