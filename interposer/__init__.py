"""Latent Interposer: convert diffusion-model latents between latent spaces without a VAE round trip.

    >>> from interposer import convert, load_interposer
    >>> v1 = convert(xl_latents, "xl", "v1")              # raw VAE latents in, raw latents out
    >>> net = load_interposer("fx", "v3")                  # the released v4.0 network, eval mode

Imports torch, safetensors and huggingface_hub only (never ray or diffusers), so it runs inside ComfyUI.
"""

__version__ = "0.1.0"

from .converter import clear_cache, convert  # noqa: E402
from .model import InterposerModel  # noqa: E402
from .spaces import RELEASED_PAIRS, SPACES, LatentSpace, get_space  # noqa: E402
from .weights import WeightsNotFoundError, load_interposer, save_interposer, save_released  # noqa: E402

__all__ = [
    "__version__", "convert", "clear_cache", "InterposerModel", "LatentSpace", "SPACES", "RELEASED_PAIRS",
    "get_space", "load_interposer", "save_interposer", "save_released", "WeightsNotFoundError",
]  # fmt: skip
