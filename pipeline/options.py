"""The options of `data build` and `data add-space`: one field per setting, its flag, default, help and check
(interposer.settings). Stdlib only, so that `interposer --help` builds the flags without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from interposer.files import absolute
from interposer.settings import at_least, check_settings, flag_name, not_negative, setting

DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODE_THREADS = 3  # image decode + tile threads inside each GPU actor, each a CPU the actor also asks for
DEFAULT_GPU_WAIT = 900.0  # seconds to wait for an autoscaler's first GPU node (spot nodes take minutes)
DEFAULT_MAX_PIXELS = 1 << 28  # 268 MP: above this an image is treated as a decompression bomb


def _gpus(v) -> str | None:
    return None if v == -1 or not_negative(v) is None else "must be -1 (auto), 0 (CPU) or a share of GPUs"


@dataclass
class EncodeOptions:
    """How the encoders run (shared by build and add-space; not part of the dataset's identity)."""

    batch_size: int = setting(6, "tiles per VAE forward pass; only one image's tiles share a pass", at_least(1))
    workers: int = setting(0, "encoder actors; 0: one per GPU, growing as a cluster's GPU nodes join; 1 without "
                           "GPUs", at_least(0))
    gpus_per_worker: float = setting(-1, "GPUs per encoder actor; 0 encodes on CPU (default -1: 1 on a machine "
                                     "with a GPU or on a cluster (RAY_ADDRESS), where the build waits for the "
                                     "autoscaler's GPU nodes; else 0)", _gpus)
    gpu_wait: float = setting(DEFAULT_GPU_WAIT, "on a cluster with no GPU up yet, seconds to wait for the "
                              "autoscaler", not_negative, metavar="SECONDS")
    decode_threads: int = setting(DECODE_THREADS, "image decode threads in each GPU encoder actor; it asks Ray for "
                                  "1 CPU more than this", at_least(1))
    dtype: Literal[DTYPES] = setting("auto", "encoder precision (default auto: bfloat16 on GPU, float32 on CPU); "
                                     "NaN/inf tiles are retried in float32")
    trust_remote_code: bool = setting(False, "let VAEs that ship their own modelling code (config.json auto_map) "
                                      "run it, here and on every Ray worker; read that code first. Needed on every "
                                      "command that loads such a VAE")
    quiet: bool = setting(False, "print nothing but errors")

    def __post_init__(self):
        check_settings(self, flag_name)


@dataclass
class BuildConfig(EncodeOptions):
    images: list[str] = setting(None, "image sources (folders, globs, listing files, URIs)", flag=False)
    spaces: list[str] = setting(None, '"v1", "xl=REPO[:SUBFOLDER]", "fx=/local/vae"', flag=False)
    out: str = setting("", "dataset folder or URI", flag=False)
    tile_size: int = setting(1024, "tile side in pixels, a multiple of 64", at_least(1))
    max_tiles: int = setting(6, "tiles per image at most", at_least(1))
    min_size: int | None = setting(None, "skip images whose short side is below this; smaller than --tile-size "
                                   "ones are enlarged (default: half of --tile-size, 512 for 1024 px tiles)",
                                   at_least(1))
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "skip images with more pixels as decompression bombs",
                              at_least(1))
    shard_size: int = setting(64, "listed files per shard on average: the unit of work, of resume and of the files "
                              "a trainer rank reads", at_least(1))
    latent: Literal["mean", "sample"] = setting("mean", "store the encoder distribution's mean or a sample seeded "
                                                "by tile key")
    store_std: bool = setting(False, "also store the encoder distribution's std")

    def __post_init__(self):
        super().__post_init__()
        if self.min_size is None:  # small trials: 64 px tiles take images from 32 px, as 1024 px ones from 512
            self.min_size = max(1, self.tile_size // 2)
        if not self.images or not self.out:
            raise ValueError("give --images and --out")
        # local sources and outputs are recorded absolute, so a rerun from another folder means the same data
        self.images = [absolute(s) for s in self.images]
        if self.tile_size % 64:
            raise ValueError(f"--tile-size must be a multiple of 64 (every space's factor), got {self.tile_size}")


@dataclass
class AddSpaceConfig(EncodeOptions):
    data: str = setting("", "an existing, complete dataset", flag=False)
    space: str = setting("", '"fx" or "fx=REPO[:SUBFOLDER]" or "fx=/local/vae"', flag=False)
