"""Interposer weights on disk and on the Hub: our folder format, the released v4.0 layout, and where to look.

Our format is one folder:  model.safetensors  +  config.json  (constructor args, src, dst, version).
The released layout is one file:  {src}-to-{dst}_interposer-v4.0.safetensors  (city96/SD-Latent-Interposer,
Hub subfolder v4.0), whose constructor args follow from the pair (see spaces.default_args).

`load_interposer(src, dst)` looks, in order: the `weights` you pass -> $INTERPOSER_HOME (default
~/.cache/interposer; released files directly in it, under v4.0/, or our folders named {src}-to-{dst}) ->
any extra `search_dirs` -> the Hub (hf_hub_download, which honours HF_HUB_OFFLINE).

    >>> from interposer import load_interposer
    >>> net = load_interposer("xl", "v1")                  # released v4.0 xl -> v1
    >>> net = load_interposer("runs/xl-v1/export")         # a folder in our format (or an ORG/NAME Hub repo)
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_write
from .model import InterposerModel
from .shuffle_model import ShuffleInterposer
from .universal_model import UniversalInterposer, UniversalPair
from .spaces import (
    RELEASE_REPO,
    RELEASE_VERSION,
    default_args,
    get_space,
    is_released,
    register_space,
    release_filename,
    released_pairs_text,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURE = InterposerModel.architecture  # config.json without "architecture" (older exports): v4
ARCHITECTURES: dict[str, type] = {cls.architecture: cls
                                  for cls in (InterposerModel, ShuffleInterposer, UniversalInterposer)}
Interposer = InterposerModel | ShuffleInterposer | UniversalPair  # a network for one pair
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_ARG_NAMES = ("ch_in", "ch_out", "ch_mid", "blocks", "scale")  # every architecture's required arguments


def network_class(architecture: str) -> type:
    """The network class config.json's `architecture` names; ValueError listing the known ones."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}; "
                         "a newer latent-interposer may know it")
    return ARCHITECTURES[architecture]


def is_v4(model) -> bool:
    """Whether a network has city96's v4.0 layout and size (64 wide, 12 blocks): the released file layout."""
    return isinstance(model, InterposerModel) and (model.ch_mid, model.blocks) == (64, 12)


class WeightsNotFoundError(FileNotFoundError):
    """No weights for a pair where we looked; the message says where to put them."""


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub cannot be reached (a machine fault: exit 1); the message says what to download
    where instead."""


HUB_CONNECT_TIMEOUT = 3.0  # seconds to reach the Hub before giving up (its client retries for ~25 s)


def check_hub(what: str, endpoint: str | None = None) -> None:
    """Fail fast, in one line, when the Hub (HF_ENDPOINT) cannot be reached: one TCP connection with a short
    timeout, instead of the Hub client's retries. Offline mode (HF_HUB_OFFLINE) is the client's to report."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise HubUnreachableError(f"cannot reach the Hugging Face Hub at {url.scheme}://{url.netloc} "
                                  f"({e.strerror or type(e).__name__}): {what}") from None


def interposer_home() -> Path:
    """$INTERPOSER_HOME, else $XDG_CACHE_HOME/interposer, else ~/.cache/interposer."""
    if os.environ.get("INTERPOSER_HOME"):
        return Path(os.environ["INTERPOSER_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "interposer"


# ---------------------------------------------------------------------------------------------- saving


def _cpu_state(model: InterposerModel) -> dict[str, torch.Tensor]:
    # fp32 on the CPU whatever the model runs in: the released files are fp32
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in model.state_dict().items()}


def save_interposer(model: InterposerModel | UniversalInterposer, folder: str | Path, src: str | None = None,
                    dst: str | None = None, version: str = "dev", extra: dict | None = None) -> Path:
    """Write our format (model.safetensors + config.json) into `folder`, each file atomically. A pairwise
    network needs its src and dst; a universal one records every space it has (and takes neither)."""
    folder = Path(folder)
    if isinstance(model, UniversalInterposer):
        if src is not None or dst is not None:
            raise ValueError("a universal interposer converts every pair of its spaces: save it without src, dst")
        _check_universal(model, "model")
        spaces = [get_space(c) for c in model.spaces]
        config = dict(architecture=model.architecture, **model.args(), version=version, layout="raw",
                      pairs=[f"{a}->{b}" for a, b in model.pairs()], spaces={s.code: s.to_dict() for s in spaces},
                      **(extra or {}))
        metadata = {"spaces": ",".join(model.spaces)}
    else:
        if src is None or dst is None:
            raise ValueError("a pairwise interposer is saved with the pair it converts (src, dst)")
        _check_pair(model, src, dst, "model")
        s, d = get_space(src), get_space(dst)
        config = dict(architecture=model.architecture, **model.args(), src=s.code, dst=d.code, version=version,
                      layout="raw", spaces={s.code: s.to_dict(), d.code: d.to_dict()}, **(extra or {}))
        metadata = {"pair": f"{s.code}->{d.code}"}
    folder.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(model)
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata))
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def save_released(model: InterposerModel, path: str | Path) -> Path:
    """Write the released v4.0 file layout (state dict only, fp32) to `path`."""
    state = _cpu_state(model)
    atomic_write(Path(path), lambda p: save_file(state, p))
    return Path(path)


# --------------------------------------------------------------------------------------------- loading


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: only .safetensors weights are loaded (pickled .pt/.ckpt/.bin files can run code)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a weights file; give an interposer's .safetensors file or its folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def _build(args: dict, state: dict[str, torch.Tensor], where: Path, architecture: str = ARCHITECTURE) -> Interposer:
    model = network_class(architecture)(**args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        first = first if len(first) < 200 else first[:200] + "..."
        raise ValueError(f"{where}: weights do not fit the interposer {args}: {first}") from e
    return model.eval()


def _check_pair(model: InterposerModel, src: str, dst: str, where: str | Path) -> None:
    """The model's channels are the pair's (`where`: the file or folder it came from, or "model")."""
    s, d = get_space(src), get_space(dst)
    if model.ch_in != s.channels or model.ch_out != d.channels:
        raise ValueError(f"{where} maps {model.ch_in} -> {model.ch_out} channels but {s.code} -> {d.code} "
                         f"needs {s.channels} -> {d.channels}")


def _check_universal(model: UniversalInterposer, where: str | Path) -> None:
    """Every space of a universal model is a known space, with its channels and factor."""
    for code, spec in model.spaces.items():
        s = get_space(code)
        if s.code != code or (spec["channels"], spec["factor"]) != (s.channels, s.factor):
            raise ValueError(f"{where} has space {code!r} with {spec['channels']} channels at factor "
                             f"{spec['factor']}, but {s.describe()}")


def register_spaces_of(weights: str | Path | None) -> list[str]:
    """Register the latent spaces an exported model's config.json defines (spaces defined by their VAE
    travel with the models trained on them); returns their codes. Anything else: nothing, no error."""
    if weights is None:
        return []
    path = Path(weights).expanduser()
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config.is_file() or (path.is_file() and path.name != WEIGHTS_NAME):
        return []
    try:
        spaces = json.loads(config.read_text()).get("spaces") or {}
    except (json.JSONDecodeError, AttributeError):
        return []
    return [register_space(d).code for d in spaces.values()]


def _load_folder(folder: Path, src: str | None, dst: str | None) -> InterposerModel:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"{folder}: an interposer folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    register_spaces_of(folder)
    try:
        config = json.loads(cfg_path.read_text())
        architecture = config.get("architecture", ARCHITECTURE)
        try:
            known = inspect.signature(network_class(architecture)).parameters
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        if architecture == UniversalInterposer.architecture:
            return _load_universal(folder, config, {k: config[k] for k in known}, src, dst)
        args = {k: config[k] for k in _ARG_NAMES} | {k: config[k] for k in known if k in config}
        f_src, f_dst = get_space(config["src"]).code, get_space(config["dst"]).code
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: not an interposer config ({e!r}); it needs {', '.join(_ARG_NAMES)}, src, dst")
    if (src and get_space(src).code != f_src) or (dst and get_space(dst).code != f_dst):
        raise ValueError(f"{folder} converts {f_src} -> {f_dst}, not {get_space(src).code} -> {get_space(dst).code}")
    model = _build(args, _read_state(folder / WEIGHTS_NAME), folder, architecture)
    _check_pair(model, f_src, f_dst, f"{folder}:")
    model.src, model.dst, model.version, model.source = f_src, f_dst, str(config.get("version", "")), str(folder)
    return model


def _load_universal(folder: Path, config: dict, args: dict, src: str | None, dst: str | None):
    """A universal model from its folder: the whole model, or (src and dst given) the model bound to that pair."""
    model = _build(args, _read_state(folder / WEIGHTS_NAME), folder, UniversalInterposer.architecture)
    _check_universal(model, f"{folder}:")
    model.version, model.source = str(config.get("version", "")), str(folder)
    if src is None and dst is None:
        return model
    if src is None or dst is None:
        raise ValueError(f"{folder} is a universal interposer: name both src and dst, or neither")
    s, d = get_space(src).code, get_space(dst).code
    if s not in model.spaces or d not in model.spaces:
        raise ValueError(f"{folder} converts between {', '.join(model.spaces)}, not {s} -> {d}")
    return model.pair(s, d)


def universal_folders(base: Path) -> list[Path]:
    """The folders in `base` that hold a universal model (config.json says so), by name."""
    found = []
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            config = json.loads((entry / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("architecture") == UniversalInterposer.architecture:
            found.append(entry)
    return found


def _universal_has(folder: Path, src: str, dst: str) -> bool:
    try:
        adapters = json.loads((folder / CONFIG_NAME).read_text()).get("adapters") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return src in adapters and dst in adapters and src != dst


def released_args(state: dict[str, torch.Tensor], src: str, dst: str, where: Path) -> dict:
    """Constructor arguments of a released-layout state dict: width and blocks read from its tensors (city96's
    v4.0 files are 64 wide with 12 blocks; ours may be other sizes), channels checked against the pair by the
    strict load, the resampling from the pair's factors."""
    head, tail = state.get("head.short.weight"), state.get("tail.weight")
    if head is None or tail is None or head.dim() != 4 or tail.dim() != 4:
        raise ValueError(f"{where}: not an interposer state dict (no head.short.weight / tail.weight)")
    blocks = len({k.split(".")[1] for k in state if k.startswith("core.") and ".long." in k})
    args = default_args(src, dst)
    return dict(args, ch_mid=int(head.shape[0]), blocks=blocks)


def _check_file_name(path: Path, src: str, dst: str) -> None:
    """A file named like a released one for another pair (xl-to-v1_interposer-*.safetensors given for
    v1 -> xl) would run the wrong way without a word: refused."""
    import re

    named = re.match(r"^([a-z0-9]+)-to-([a-z0-9]+)_interposer", path.name.lower())
    if named is None:
        return
    try:
        a, b = get_space(named.group(1)).code, get_space(named.group(2)).code
    except ValueError:
        return  # not a space name we know: the name says nothing
    if (a, b) != (get_space(src).code, get_space(dst).code):
        raise ValueError(f"{path}: its name says {a} -> {b}, but {get_space(src).code} -> {get_space(dst).code} "
                         f"was asked; pass the {get_space(src).code}-to-{get_space(dst).code} file")


def _load_file(path: Path, src: str, dst: str, version: str) -> InterposerModel:
    # A bare released-layout file holds only tensors: channels and resampling come from the pair, width and
    # blocks from the tensors; the strict load checks every key and shape.
    _check_file_name(path, src, dst)
    state = _read_state(path)
    pair = _file_metadata(path).get("pair")  # our model.safetensors files say which pair they convert
    if pair and pair != f"{get_space(src).code}->{get_space(dst).code}":
        raise ValueError(f"{path}: its header says {pair}, not {get_space(src).code} -> {get_space(dst).code}")
    model = _build(released_args(state, src, dst, path), state, path)
    _check_pair(model, src, dst, f"{path}:")
    model.src, model.dst, model.version, model.source = get_space(src).code, get_space(dst).code, version, str(path)
    return model


def load_path(path: str | Path, src: str | None = None, dst: str | None = None) -> InterposerModel:
    """Load a folder in our format, or a released-layout file (then src and dst are required)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_folder(path, src, dst)
    if path.is_file():
        if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
            return _load_folder(path.parent, src, dst)
        if src is None or dst is None:
            raise ValueError(f"{path}: a bare weights file needs the source and target spaces (src, dst)")
        return _load_file(path, src, dst, RELEASE_VERSION)
    raise FileNotFoundError(f"weights not found: {path}")


def _pair_candidates(base: Path, s: str, d: str) -> list[Path]:
    name = release_filename(s, d)
    return [base / f"{s}-to-{d}", base / name, base / RELEASE_VERSION / name]


def find_local(src: str, dst: str, search_dirs=()) -> Path | None:
    """The first local copy of a pair's weights: in each folder of the search a pairwise network first, then a
    universal model that has both spaces."""
    s, d = get_space(src).code, get_space(dst).code
    for base in (interposer_home(), *map(Path, search_dirs)):
        for cand in _pair_candidates(base, s, d):
            if (cand / CONFIG_NAME).is_file() if cand.is_dir() else cand.is_file():
                return cand
        for folder in universal_folders(base):
            if _universal_has(folder, s, d):
                return folder
    return None


def hub_cached(src: str, dst: str) -> Path | None:
    """The Hub cache's copy of a released pair, if it was downloaded before (no network)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(RELEASE_REPO, f"{RELEASE_VERSION}/{release_filename(src, dst)}")
    return Path(hit) if isinstance(hit, str) else None


def _download_released(src: str, dst: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    name = release_filename(src, dst)
    instead = (f"download {name} from huggingface.co/{RELEASE_REPO} (folder {RELEASE_VERSION}) into "
               f"{interposer_home()}, or pass weights=PATH (--weights PATH on the command line)")
    check_hub(instead)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        return Path(hf_hub_download(RELEASE_REPO, name, subfolder=RELEASE_VERSION))
    except LocalEntryNotFoundError as e:  # not cached, and offline by choice (the user's) or by fault (the machine's)
        if not offline:
            raise HubUnreachableError(f"cannot download from the Hugging Face Hub ({type(e).__name__}): {instead}") from e
        raise WeightsNotFoundError(f"no weights for {src} -> {dst} (HF_HUB_OFFLINE is set): {instead}") from e
    except (EntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise WeightsNotFoundError(f"no weights for {src} -> {dst} ({type(e).__name__}): {instead}") from e


def _load_hub_repo(repo_id: str, revision: str | None) -> InterposerModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    check_hub(f"download {CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id} into a folder and load that folder")
    try:
        cfg = hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise WeightsNotFoundError(f"could not fetch {CONFIG_NAME} and {WEIGHTS_NAME} from Hub repo {repo_id!r}: "
                                   f"{type(e).__name__}") from e
    return _load_folder(Path(cfg).parent, None, None)


def load_interposer(src: str, dst: str | None = None, weights: str | Path | None = None, *,
                    search_dirs=(), device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    revision: str | None = None) -> InterposerModel:
    """An interposer in eval mode, with .src, .dst, .version and .source (where it came from) set.

    load_interposer("xl", "v1")                 a pair: weights -> $INTERPOSER_HOME -> search_dirs -> Hub
    load_interposer("xl", "v1", weights=P)      a released-layout file or one of our folders
    load_interposer(P) / ("ORG/NAME")           our format from a folder, or from a Hub repo
    """
    if dst is None:
        path = Path(src).expanduser()
        if path.exists():
            model = load_path(path)
        elif src.count("/") == 1 and not src.startswith((".", "/", "~")) and not Path(src.split("/")[0]).is_dir():
            model = _load_hub_repo(src, revision)  # ORG/NAME, where no local folder ORG exists
        else:
            local = Path(src.split("/")[0]).is_dir()
            raise FileNotFoundError(f"no interposer folder {src!r}" + ("" if local else " and no such Hub repo name")
                                    + "; to name a pair, pass src and dst")
    else:
        register_spaces_of(weights)  # an export of a space defined by its VAE carries its definition
        get_space(src), get_space(dst)  # unknown names fail here, listing the known ones
        if weights is not None:
            model = load_path(weights, src, dst)
        elif (found := find_local(src, dst, search_dirs)) is not None:
            model = load_path(found, src, dst)
        elif not is_released(src, dst):
            raise WeightsNotFoundError(
                f"no released interposer for {get_space(src).code} -> {get_space(dst).code} and none in "
                f"{interposer_home()}; released pairs: {released_pairs_text()}; or pass weights=PATH (--weights PATH on the command line)"
            )
        else:
            model = _load_file(_download_released(src, dst), src, dst, RELEASE_VERSION)
    return model.to(device=device, dtype=dtype)
