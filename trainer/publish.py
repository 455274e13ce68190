"""`interposer publish`: stage a trained interposer with its model card and eval table, and push it to the
Hugging Face Hub in one commit.

    interposer publish --model runs/xl-v1 --repo me/xl-to-v1-interposer --dry-run     # what would be pushed
    interposer publish --model runs/xl-v1 --repo me/xl-to-v1-interposer --rev v5.0    # HF_TOKEN or `hf auth login`

Staged files: our format (model.safetensors + config.json, what `load_interposer("me/...")` reads), the
released layout `v{rev}/{src}-to-{dst}_interposer-v{rev}.safetensors` for the v4 architecture (so v4.0-style
loaders find it), README.md (the model card) and eval.json when the model was evaluated. The token is never
printed; without one the command stops before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from interposer import load_interposer, save_released
from interposer.weights import is_v4
from interposer.spaces import get_space

if TYPE_CHECKING:
    from interposer.pipeline.schema import DatasetFiles

EVAL_FILE = "eval.json"
GRID_FILE = "eval.png"  # eval's picture beside eval.json
EXPORT = "export"  # a run's export folder (trainer.driver writes it)


MODEL_FILES = ("config.json", "model.safetensors", EVAL_FILE, GRID_FILE)  # an export folder's files
RUN_FILES = ("interposer-run.json", EVAL_FILE, GRID_FILE)  # a run folder's own, beside export/


@contextmanager
def local_model(model: str | Path) -> Iterator[tuple[Path, "DatasetFiles | None"]]:
    """(a local path to `model`, its remote folder or None). A run or export folder in object storage
    (s3://, gs://) is copied to a temporary folder first, laid out as it is there: an export is small (its
    weights and a few JSON files; checkpoints are not copied)."""
    from interposer.pipeline.objectstore import check_uri
    from interposer.pipeline.schema import DatasetFiles

    if "://" not in str(model):
        yield Path(model).expanduser(), None
        return
    check_uri(str(model), "--model")
    remote = DatasetFiles(str(model).rstrip("/"))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / remote.uri.rsplit("/", 1)[-1]
        for rel in (*RUN_FILES, *[f"{EXPORT}/{n}" for n in MODEL_FILES], *MODEL_FILES):
            if remote.exists(rel):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                (local / rel).write_bytes(remote.read_bytes(rel))
        if not local.is_dir():
            raise FileNotFoundError(f"--model {model}: neither a run folder (with {EXPORT}/) nor a model folder "
                                    "(config.json + model.safetensors)")
        yield local, remote


def find_export(model: str | Path) -> tuple[Path, Path | None]:
    """(the export folder, the run folder or None) for a run folder or an export folder."""
    path = Path(model).expanduser()
    if (path / EXPORT / "config.json").is_file():
        return path / EXPORT, path
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "interposer-run.json").is_file() else None
        return path, run
    raise FileNotFoundError(f"--model {model}: neither a run folder (with export/) nor a model folder "
                            "(config.json + model.safetensors)")


def _eval_table(evaluation: dict) -> str:
    rows = evaluation.get("rows", [])
    if not rows:
        return "_Not evaluated._"
    cols = [("latent L1", "latent_l1", ".4f"), ("latent MSE", "latent_mse", ".4f"),
            ("PSNR vs tile (dB)", "psnr_tile", ".2f"), ("SSIM vs tile", "ssim_tile", ".4f"),
            ("PSNR vs target decode (dB)", "psnr_target", ".2f"), ("SSIM vs target decode", "ssim_target", ".4f"),
            ("ΔE (CIEDE2000, means)", "delta_e", ".2f"), ("ms / latent", "ms_per_latent", ".2f")]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "–" for _, k, f in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if "tiles" not in evaluation:
        return "\n".join(lines)
    return "\n".join(lines) + (f"\n\n{evaluation['tiles']} {evaluation['split']} tiles of "
                               f"{evaluation['tile_size']} px, device {evaluation['device']}.")


def _is_local(source: str) -> bool:
    """A VAE source that names a folder on some machine rather than a Hub repo id."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") != 1 or Path(source).exists()


def _public_source(source: str, fingerprint: str | None) -> str:
    return f"a local VAE folder (weights {fingerprint or 'not recorded'})" if _is_local(source) else source


def public_config(config: dict, manifest: dict | None) -> dict:
    """The export's config.json as published: no local paths (the dataset named by its manifest fingerprint,
    a VAE loaded from a local folder by its weights' fingerprint)."""
    out = {k: v for k, v in config.items() if k != "data"}
    if manifest is not None:
        from interposer.pipeline.schema import Manifest

        out["dataset_fingerprint"] = Manifest.from_json(json.dumps(manifest)).fingerprint()
    prints = {k: v.get("fingerprint") for k, v in (manifest or {}).get("spaces", {}).items()}
    out["spaces"] = {code: dict(d, vae_repo=_public_source(d["vae_repo"], prints.get(code)))
                     for code, d in config.get("spaces", {}).items()}
    return out


def _training_text(run_record: dict | None) -> str:
    if not run_record:
        return "_Not recorded._"
    return "```json\n" + json.dumps(run_record.get("config", {}), indent=2, sort_keys=True) + "\n```"


def _dataset_text(manifest: dict | None) -> str:
    if not manifest:
        return "_Not recorded._"
    spaces = "\n".join(f"- `{k}`: {v['vae_class']} `{_public_source(v['vae'], v.get('fingerprint'))}`"
                       + (f" ({v['subfolder']})" if v.get("subfolder") else "")
                       + f", {v['dtype']}, weights `{v['fingerprint']}`" for k, v in manifest["spaces"].items())
    c = manifest.get("counts", {})
    return (f"{c.get('tiles', '?')} tiles of {manifest['tile_size']} px from {c.get('images_ok', '?')} images; "
            f"spaces:\n{spaces}")


def _pairs_table(evaluation: dict) -> str:
    """A universal model's evaluation, a row per pair; a one-pair evaluation says which pair it is."""
    from .evaluate import PAIR_COLUMNS

    if not evaluation.get("universal"):
        if not evaluation.get("rows"):
            return "_Not evaluated._"
        return f"One pair evaluated, {evaluation['src']} → {evaluation['dst']}:\n\n" + _eval_table(evaluation)
    lines = ["| " + " | ".join(c[0] for c in PAIR_COLUMNS) + " |", "|---" * len(PAIR_COLUMNS) + "|"]
    for r in evaluation["rows"]:
        lines.append("| " + " | ".join(r[k] if not f else "–" if r[k] is None else format(r[k], f)
                                       for _, k, f in PAIR_COLUMNS) + " |")
    notes = "".join(f"\n\n{n}." for n in evaluation.get("notes", []))
    return "\n".join(lines) + (f"\n\nEach pair on the same {evaluation['tiles']} {evaluation['split']} tiles of "
                               f"{evaluation['tile_size']} px, device {evaluation['device']}.") + notes


def universal_card(config: dict, repo: str, evaluation: dict | None, run_record: dict | None,
                   manifest: dict | None) -> str:
    """README.md for the Hub of a universal model: its spaces, every pair, usage, the per-pair table."""
    spaces = list(config["adapters"])
    tags = ["latent-interposer", "diffusion", "vae", "universal", *[f"latent-space-{c}" for c in spaces]]
    meta = "\n".join(["---", "license: apache-2.0", "library_name: latent-interposer", "tags:",
                      *[f"- {t}" for t in tags], "---"])
    rows = "\n".join(f"| `{c}` | {get_space(c).family} | {get_space(c).channels} | /{get_space(c).factor} |"
                     for c in spaces)
    pairs = ", ".join(f"{a} → {b}" for a, b in ((p.split("->")) for p in config["pairs"]))
    a, b = spaces[0], spaces[1]
    return f"""{meta}

# Universal latent interposer ({", ".join(spaces)})

One network converts **raw** VAE latents between every ordered pair of {len(spaces)} latent spaces
({len(config["pairs"])} pairs) without decoding to pixels: a per-space input and output adapter around a shared
trunk ({config["ch_mid"]} wide, {config["blocks"]} blocks, on a /{config["grid"]} working grid) conditioned on the target
space.

| space | family | channels | factor |
|---|---|---|---|
{rows}

Pairs: {pairs}.

## Use

```python
from interposer import convert, load_interposer
model = load_interposer("{repo}")                      # the whole network: model(x, src, dst), model.pairs()
latents_{b} = convert(latents_{a}, "{a}", "{b}", weights=model.source)   # raw VAE latents, any pair above
```

```sh
pip install latent-interposer
hf download {repo} --local-dir THIS_REPO_FOLDER
interposer convert in.latent out.latent --src {a} --dst {b} --weights THIS_REPO_FOLDER
```

ComfyUI: put this repository's `model.safetensors` and `config.json` into a folder
`ComfyUI/models/interposers/{repo.split("/")[1]}/` and use the **Latent Interposer** node (category `latent`):
its lists offer these spaces.

## Evaluation

{_pairs_table(evaluation or {})}

## Training

{_training_text(run_record)}

## Dataset

{_dataset_text(manifest)}
"""


def model_card(config: dict, repo: str, rev: str, evaluation: dict | None, run_record: dict | None,
               manifest: dict | None) -> str:
    """README.md for the Hub: YAML metadata, what it converts, usage, eval table, training, dataset."""
    src, dst = config["src"], config["dst"]
    s, d = get_space(src), get_space(dst)
    tags = ["latent-interposer", "diffusion", "vae", f"latent-space-{src}", f"latent-space-{dst}"]
    meta = "\n".join(["---", "license: apache-2.0", "library_name: latent-interposer", "tags:",
                      *[f"- {t}" for t in tags], "---"])
    training, dataset = _training_text(run_record), _dataset_text(manifest)
    released = f"{src}-to-{dst}_interposer-{rev}.safetensors"
    v4 = config.get("architecture", "interposer-v4") == "interposer-v4" and (config["ch_mid"], config["blocks"]) == (64, 12)
    command = (f"interposer convert in.latent out.latent --src {src} --dst {dst} --weights {rev}/{released}" if v4
               else f"interposer convert in.latent out.latent --src {src} --dst {dst} --weights THIS_REPO_FOLDER")
    comfy = (f"ComfyUI: put `{released}` (folder `{rev}/` here) into `ComfyUI/models/interposers/` and use the\n"
             "**Latent Interposer** node (category `latent`), with the node installed from latent-interposer."
             if v4 else
             f"ComfyUI: put this repository's `model.safetensors` and `config.json` into a folder\n"
             f"`ComfyUI/models/interposers/{src}-to-{dst}/` and use the **Latent Interposer** node\n"
             "(category `latent`).")
    return f"""{meta}

# {s.family} → {d.family} latent interposer ({src} → {dst})

Converts **raw** {s.family} VAE latents `(B, {s.channels}, H/{s.factor}, W/{s.factor})` into raw {d.family} latents
`(B, {d.channels}, H/{d.factor}, W/{d.factor})` without decoding to pixels: a small CNN
({config['ch_mid']} wide, {config['blocks']} blocks) instead of a VAE round trip{_network_line(config)}.

## Use

```python
from interposer import convert, load_interposer
model = load_interposer("{repo}")                                       # this repository's weights
latents_{dst} = convert(latents_{src}, "{src}", "{dst}", weights=model.source)                   # raw VAE latents
latents_{dst} = convert(scaled_{src}, "{src}", "{dst}", layout="scaled", weights=model.source)  # pipeline latents
```

```sh
pip install latent-interposer
hf download {repo} --local-dir THIS_REPO_FOLDER
{command}
```

{comfy}

## Evaluation

{_eval_table(evaluation or {})}
{_grid_line(evaluation)}
## Training

{training}

## Dataset

{dataset}
"""


def _network_line(config: dict) -> str:
    if config.get("architecture", "interposer-v4") == "interposer-v4":
        return ""
    return (f"; network `{config['architecture']}`: pixel (un)shuffle resampling by {config['scale']:g}, normalised "
            "per channel, with a linear path")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _network_error(e: BaseException) -> bool:
    """A transport failure of whichever HTTP client huggingface_hub uses (httpx, its forks, requests)."""
    return isinstance(e, OSError) or any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests",
                                                                         "urllib3") for c in type(e).__mro__)


def _grid_line(evaluation: dict | None) -> str:
    if not (evaluation or {}).get("grid"):
        return ""
    return (f"\n![original, VAE, round trip, interposer, linear]({GRID_FILE})\n\nEach row a held-out tile: the "
            "original, then each method's latent decoded by the target VAE.\n")


def stage(model: str | Path, repo: str, rev: str, folder: Path) -> list[Path]:
    """Write every file to push into `folder`; returns them (relative paths) in upload order."""
    with local_model(model) as (local, _):
        return _stage(local, repo, rev, folder)


def _stage(model: Path, repo: str, rev: str, folder: Path) -> list[Path]:
    from interposer.pipeline.schema import DatasetFiles

    export, run = find_export(model)
    config = json.loads((export / "config.json").read_text())
    net = load_interposer(str(export))  # also checks the weights load
    universal = getattr(net, "src", None) is None
    folder.mkdir(parents=True, exist_ok=True)
    record_file = run / "interposer-run.json" if run else None
    record = json.loads(record_file.read_text()) if record_file and record_file.is_file() else None
    manifest = None
    data = (record or {}).get("data") or config.get("data")
    if data and DatasetFiles(data).exists("manifest.json"):  # a local folder or an s3:// dataset
        manifest = json.loads(DatasetFiles(data).read_bytes("manifest.json"))
    shutil.copy(export / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(public_config(config, manifest), indent=2) + "\n")
    if not universal and is_v4(net):  # city96's v4.0 loaders assume this network and size: only then this layout
        (folder / rev).mkdir(exist_ok=True)
        save_released(net, folder / rev / f"{config['src']}-to-{config['dst']}_interposer-{rev}.safetensors")
    evaluation = None
    for candidate in (export / EVAL_FILE, run / EVAL_FILE if run else None):
        if candidate is not None and candidate.is_file():
            evaluation = json.loads(candidate.read_text())
            public = {k: v for k, v in evaluation.items() if k not in ("model", "data")}  # local paths
            if "pairs" in public:  # a universal evaluation: each pair's too
                public["pairs"] = [{k: v for k, v in r.items() if k not in ("model", "data")} for r in public["pairs"]]
            (folder / EVAL_FILE).write_text(json.dumps(public, indent=2) + "\n")
            picture = candidate.with_name(GRID_FILE)
            if evaluation.get("grid") and picture.is_file():  # the picture people judge colour shift by
                shutil.copy(picture, folder / GRID_FILE)
            break
    card = (universal_card(config, repo, evaluation, record, manifest) if universal
            else model_card(config, repo, rev, evaluation, record, manifest))
    (folder / "README.md").write_text(card)
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _token() -> str:
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again")
    return token


def publish(model: str | Path, repo: str, rev: str = "v5.0", private: bool = False, dry_run: bool = False,
            endpoint: str | None = None, stage_dir: Path | None = None) -> list[dict]:
    """Stage and push in one commit (or, with dry_run, only list). Returns [{path, size, sha256}]."""
    import tempfile

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"--repo {repo!r}: expected ORG/NAME")
    token = None if dry_run else _token()  # before any work: no token, nothing sent
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage_dir or Path(tmp)
        files = stage(model, repo, rev, folder)
        listing = [dict(path=str(p), size=(folder / p).stat().st_size,
                        sha256=hashlib.sha256((folder / p).read_bytes()).hexdigest()) for p in files]
        print(f"[publish] {'would push' if dry_run else 'pushing'} to {repo} ({'private' if private else 'public'}):")
        for f in listing:
            print(f"  {f['path']:<50} {f['size']:>12,d} B  sha256 {f['sha256']}")
        if dry_run:
            return listing
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.errors import HfHubHTTPError

        from interposer.weights import HubUnreachableError, check_hub

        check_hub(f"nothing was pushed; publish again when {repo} can be reached", endpoint)
        api = HfApi(endpoint=endpoint, token=token)
        ops = [CommitOperationAdd(path_in_repo=str(p), path_or_fileobj=str(folder / p)) for p in files]
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.create_commit(repo, operations=ops, commit_message=f"Publish {repo} {rev} (latent-interposer)")
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            first = _first_line(e)
            if status in (401, 403):
                raise PermissionError(f"the Hub refused the token for {repo} ({status}): check HF_TOKEN or "
                                      "`hf auth login`, and that it may write to this repo") from None
            raise HubUnreachableError(f"the Hub answered {status} for {repo}: {first}; nothing was committed") from None
        except Exception as e:
            if not _network_error(e):
                raise
            # the network, mid-way: a machine fault, one line
            raise HubUnreachableError(f"lost the Hugging Face Hub while pushing to {repo} ({type(e).__name__}); "
                                      "nothing was committed: publish again") from None
        print(f"[publish] one commit {getattr(info, 'oid', '')}: {getattr(info, 'commit_url', repo)}")
        return listing
