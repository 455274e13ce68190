"""The ComfyUI node "Latent Interposer": LATENT of one space in, LATENT of another out.

ComfyUI's LATENT holds raw VAE latents (the sampler applies each model's scaling itself), so the node
converts with layout="raw". Node id, input names and category match city96's v4 node, so saved workflows
keep working.

Install: clone this repository into ComfyUI/custom_nodes/ (ComfyUI imports its top-level __init__.py), or
`pip install latent-interposer` and put a file `custom_nodes/latent_interposer.py` holding
`from interposer.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS`.

Weights are looked for in $INTERPOSER_HOME, then `models/` beside this repository, then ComfyUI's
models/interposers folder, then downloaded from the Hub.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .converter import convert
from .spaces import RELEASE_REPO, RELEASE_VERSION, get_space, is_released, release_filename

# city96's v4 node offered these in both lists: saved workflows name them, so they stay (every released pair
# is among them). Other spaces (fx2, wan, ...) are offered once a local model for them is found.
_CODES = ["v1", "xl", "v3", "fx", "ca"]


def model_dirs() -> list[Path]:
    """Local folders the node searches after $INTERPOSER_HOME, in order."""
    dirs = [Path(__file__).resolve().parents[1] / "models"]
    folder_paths = sys.modules.get("folder_paths")  # ComfyUI's module, present only inside ComfyUI
    if folder_paths is None:
        try:
            import folder_paths  # type: ignore[no-redef]
        except ImportError:
            folder_paths = None
    if folder_paths is not None:
        try:
            dirs += [Path(p) for p in folder_paths.get_folder_paths("interposers")]
        except (KeyError, AttributeError):
            pass
        if hasattr(folder_paths, "models_dir"):
            dirs.append(Path(folder_paths.models_dir) / "interposers")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def local_spaces() -> list[str]:
    """Codes of the spaces, beyond city96's five, that local models in $INTERPOSER_HOME and model_dirs()
    convert from or to (spaces defined by their VAE are registered in this process from the model's
    config.json; a model folder with a clashing definition is skipped)."""
    import re

    from .weights import interposer_home, register_spaces_of

    codes = []
    for base in (interposer_home(), *model_dirs()):
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            try:
                found = register_spaces_of(entry) if entry.is_dir() else []
                named = re.match(r"^([a-z0-9]+)-to-([a-z0-9]+)", entry.name.lower())
                if named:
                    found += [get_space(c).code for c in named.groups()]
            except (ValueError, OSError):
                continue
            for c in found:  # one entry a code, however many places name it (config.json and the folder name)
                if c not in _CODES and c not in codes:
                    codes.append(c)
    return codes


def _no_weights(src: str, dst: str) -> str:
    """The node's message when a pair has no weights: where a ComfyUI user puts them."""
    comfy_dir = next((d for d in model_dirs() if d.name == "interposers"), None)
    where = str(comfy_dir) if comfy_dir else "ComfyUI/models/interposers/"
    s, d = get_space(src).code, get_space(dst).code
    if is_released(s, d):
        return (f"no weights for {s} -> {d} here: download {release_filename(s, d)} from huggingface.co/"
                f"{RELEASE_REPO} (folder {RELEASE_VERSION}) into {where}")
    return (f"no interposer for {s} -> {d}: city96 released none for this pair; train one "
            f"(`interposer train`) and put its export folder into {where} as {s}-to-{d}")


def _run_device(latent: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where to run: the latent's device; for CPU latents inside ComfyUI, ComfyUI's torch device.
    Half precision on a GPU (the network is small and well-conditioned in fp16), fp32 on the CPU."""
    device = latent.device
    if device.type == "cpu":
        try:
            from comfy import model_management  # type: ignore[import-not-found]

            device = model_management.get_torch_device()
        except ImportError:
            pass
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class LatentInterposer:
    """LATENT (raw) of latent_src -> LATENT (raw) of latent_dst."""

    @classmethod
    def INPUT_TYPES(cls):
        codes = _CODES + local_spaces()  # the registry, then spaces of local models trained on new VAEs
        return {
            "required": {
                "samples": ("LATENT",),
                "latent_src": (codes, {"default": "xl"}),
                "latent_dst": (codes, {"default": "v1"}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "convert"
    CATEGORY = "latent"
    DESCRIPTION = "Convert latents between latent spaces (e.g. SDXL -> SD1.5) without decoding."

    def convert(self, samples: dict, latent_src: str, latent_dst: str):
        latent = samples["samples"]  # (B, C, H, W) or (B, C, T, H, W), raw
        try:
            get_space(latent_src), get_space(latent_dst)
        except ValueError:
            local_spaces()  # a space defined by its VAE: known from the local model that carries it
        from .weights import WeightsNotFoundError

        device, dtype = _run_device(latent)
        try:
            converted = convert(latent, latent_src, latent_dst, layout="raw", device=device, dtype=dtype,
                                search_dirs=model_dirs())
        except WeightsNotFoundError:
            raise WeightsNotFoundError(_no_weights(latent_src, latent_dst)) from None
        out = {k: v for k, v in samples.items() if k != "samples"}
        if converted.shape[-2:] != latent.shape[-2:]:
            out.pop("noise_mask", None)  # the mask was drawn at the old resolution (e.g. ca -> xl)
        out["samples"] = converted
        return (out,)


NODE_CLASS_MAPPINGS = {"LatentInterposer": LatentInterposer}
NODE_DISPLAY_NAME_MAPPINGS = {"LatentInterposer": "Latent Interposer"}
