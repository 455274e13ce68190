"""`data build` and `data add-space`: check everything a user can get wrong, then index (pipeline.index) and
encode the shards that are not on disk yet (pipeline.run), then write the manifest with the counts.

    interposer data build --images photos/ --space v1 --space xl --out data/v1-xl
    interposer data add-space --data data/v1-xl --space fx

Resume is the same for both: one listing of each folder says which shards are on disk; the rest are encoded,
in shard order. Local Ray by default; set RAY_ADDRESS (or use `ray job submit`) for a cluster.

What the driver holds (the data never passes through it): the manifest; per shard to do, a shard number and
Ray Data's block reference for it (~1 KB); the running counts. At 10M images and 64-image shards that is
~160k shards, ~160 MB. Listing, hashing, decoding, encoding and writing all run on the workers.
"""

from __future__ import annotations

from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from interposer import __version__
from interposer.spaces import get_space, is_builtin

from .encoder import VAESpec, load_vae, parse_space_arg, resolve_source, source_fingerprint
from .index import add_counts, build_index
from .objectstore import check_uri
from .options import DECODE_THREADS, AddSpaceConfig, BuildConfig, EncodeOptions  # noqa: F401  (re-exported)
from .inspection import inspect_dataset  # noqa: F401  (re-exported)
from .progress import Progress
from .shards import AddSpaceShard, BuildShard
from .rows import CutParams
from .run import (
    ENCODER_CPUS,
    EncoderPlan,
    check_nodes,
    on_cluster,
    plan_encoders,
    ray_for_data,
    run_shards,
    start_ray,  # noqa: F401  (re-exported: the trainer and the demo start Ray through pipeline.build)
    user_error,
    wait_for_gpus,
)
from .schema import (MANIFEST, Manifest, SpaceEntry, images_path, latents_path, read_manifest, register_manifest_spaces,
                     shard_summary)
from .sources import check_sources
from .store import Store

def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[data] {msg}", flush=True)


def default_requests(gpus: float = 1.0) -> dict[str, dict[str, float]]:
    """Ray resources of one encoder actor with default flags on a GPU cluster (cluster.yaml must fit it)."""
    return {"encoder": {"CPU": ENCODER_CPUS + DECODE_THREADS, "GPU": gpus}}


# ------------------------------------------------------------------------------------------- the VAEs


def _specs(space_args: list[str], latent: str, store_std: bool, trust_remote_code: bool = False) -> list[VAESpec]:
    from interposer.vae import check_trust

    specs, seen = [], set()
    for arg in space_args:
        code, source, sub = parse_space_arg(arg, trust_remote_code)
        if code in seen:
            raise ValueError(f"--space {code} is given twice")
        seen.add(code)
        space = get_space(code)
        source, sub = resolve_source(space, source, sub)
        definition = None if is_builtin(code) else space.to_dict()
        hashes = check_trust(source, sub, trust_remote_code, what=f"--space {code}: the VAE")
        specs.append(VAESpec(code, source, sub, "float32", latent, store_std, definition, trust_remote_code, hashes))
    if not specs:
        raise ValueError("give at least one --space")
    return specs


def _space_entries(specs: list[VAESpec], tile_size: int) -> dict[str, SpaceEntry]:
    """Load each VAE once in the driver (fp32, CPU): a wrong source or a VAE of the wrong shape fails here,
    before Ray starts or anything is written, and the weights' fingerprint goes into the manifest."""
    import torch

    from .encoder import encode_raw

    entries = {}
    for spec in specs:
        space = get_space(spec.space)
        vae = load_vae(space, spec.source, spec.subfolder, trust_remote_code=spec.trust_remote_code, code=spec.code)
        side = 64
        latent, std = encode_raw(vae, space, torch.zeros(1, 3, side, side))
        expected = (space.channels, side // space.factor, side // space.factor)
        if tuple(latent.shape[1:]) != expected:
            raise ValueError(f"--space {spec.space}: the VAE at {spec.source} makes latents of shape "
                             f"{tuple(latent.shape[1:])} from a {side}px image; {space.describe()} needs "
                             f"{expected} (to use this VAE, define a new space from it: --space NEWNAME=...)")
        if spec.store_std and std is None:
            raise ValueError(f"--store-std: the {spec.space} VAE ({space.vae_class}) has no latent distribution; "
                             "build without --store-std")
        h = tile_size // space.factor
        entries[spec.space] = SpaceEntry(
            vae=spec.source, subfolder=spec.subfolder, vae_class=type(vae).__name__, dtype=spec.dtype,
            fingerprint=source_fingerprint(vae, spec.source), channels=space.channels, factor=space.factor,
            latent_shape=[space.channels, h, h], latent=spec.latent, store_std=spec.store_std, space=space.to_dict(),
            code=spec.code)
        del vae
    return entries


def _plan(ray, opts: EncodeOptions) -> tuple[EncoderPlan, str]:
    """The encoders for this cluster and their dtype. On a cluster whose GPU nodes are not up yet this waits
    for the autoscaler first: before anything is written, and before indexing, which needs a worker's CPUs
    too where the head runs no tasks (cluster.yaml)."""
    plan = plan_encoders(opts.workers, opts.gpus_per_worker, ray.cluster_resources(), on_cluster(),
                         opts.decode_threads)
    if plan.wait_for_gpus:
        wait_for_gpus(ray, plan, opts.gpu_wait, lambda m: _say(opts.quiet, m))
    return plan, opts.dtype if opts.dtype != "auto" else ("bfloat16" if plan.gpus else "float32")


# ------------------------------------------------------------------------- encoding what is missing


@dataclass
class _Work:
    """What a command encodes, as data: all that differs between `data build` and `data add-space` once the
    dataset is indexed."""

    worker: type  # the ShardWorker that does one shard: BuildShard or AddSpaceShard
    kwargs: dict  # its arguments
    folders: list[str]  # a shard is done when each of these folders holds its file
    done_file: Callable[[int], str]  # the file of a done shard whose Parquet footer tells its counts
    done_counts: Callable[[Any], dict]  # that footer -> the shard's counts


@contextmanager
def _encoders(opts: EncodeOptions, places: list[tuple[str, str]], specs: list[VAESpec]):
    """Ray (started here unless a cluster's is given), every node checked on a cluster (it reaches `places`
    and the VAEs, or one line names the node that does not), the encoders planned; yields (ray, plan, specs
    at the encoders' dtype)."""
    ray, started = ray_for_data()
    try:
        if on_cluster():
            check_nodes(ray, places, _vae_paths(specs))
        plan, dtype = _plan(ray, opts)
        yield ray, plan, [replace(spec, dtype=dtype) for spec in specs]
    finally:
        if started:
            ray.shutdown()


def _todo(store: Store, shards: int, folders: list[str]) -> list[int]:
    """Shards not on disk yet, from one listing per folder (no existence check per file)."""
    done = set(range(shards))
    for folder in folders:
        done &= store.shards_present(folder)
    return [s for s in range(shards) if s not in done]


def _encode_missing(ray, store: Store, shards: int, plan: EncoderPlan, opts: EncodeOptions,
                    work: _Work) -> tuple[dict, Progress]:
    """Encode the shards not on disk yet; returns the counts of every shard (this run's summed as they land,
    earlier runs' read from their files' footers) and this run's progress record."""
    todo = _todo(store, shards, work.folders)
    _say(opts.quiet, f"{shards} shards, {len(todo)} to encode; {plan.describe()}")
    progress = Progress(shards_total=len(todo), quiet=opts.quiet)
    totals: dict = {}
    try:
        for shard, summary, times in run_shards(ray, todo, plan, work.worker, work.kwargs):
            add_counts(totals, summary)
            progress.landed(shard, summary, times)
    finally:
        progress.close()
    earlier = sorted(set(range(shards)) - set(todo))
    with ThreadPoolExecutor(16) as pool:  # footers only, 16 at a time
        for counts in pool.map(lambda s: work.done_counts(store.read_footer(work.done_file(s))), earlier):
            add_counts(totals, counts)
    return totals, progress


# ---------------------------------------------------------------------------------------------- build


# What makes a space's latents in a dataset the ones a command asks for: the same VAE, run the same way...
SAME_VAE = ("vae", "subfolder", "fingerprint", "code", "dtype")
SAME_LATENTS = SAME_VAE + ("latent", "store_std")  # ...and stored the same way (a build; add-space takes the dataset's)
BEFORE_RAY = tuple(a for a in SAME_LATENTS if a != "dtype")  # the dtype is known once Ray is up (GPU or not)


def _entry_diffs(code: str, old: SpaceEntry, new: SpaceEntry, attrs: tuple[str, ...]) -> list[str]:
    return [f"{code} {a}: dataset has {getattr(old, a)!r}, you asked {getattr(new, a)!r}"
            for a in attrs if getattr(old, a) != getattr(new, a)]


def _identity_diff(old: Manifest, new: Manifest, attrs: tuple[str, ...] = SAME_LATENTS) -> list[str]:
    diffs = [f"{k}: dataset has {v!r}, you asked {new.identity()[k]!r}"
             for k, v in old.identity().items() if new.identity()[k] != v]
    if sorted(old.spaces) != sorted(new.spaces):
        diffs.append(f"spaces: dataset has {', '.join(sorted(old.spaces))}, you asked {', '.join(sorted(new.spaces))}")
    for code in sorted(set(old.spaces) & set(new.spaces)):
        diffs += _entry_diffs(code, old.spaces[code], new.spaces[code], attrs)
    return diffs


def _vae_paths(specs: list[VAESpec]) -> list[tuple[str, str]]:
    """The VAEs loaded from this machine's disk, as (path, the flag that named it): every node needs them."""
    return [(spec.source, f"--space {spec.space}={spec.source}") for spec in specs
            if spec.source and Path(spec.source).is_absolute()]


def build(cfg: BuildConfig) -> Manifest:
    """Build (or finish building) the dataset in cfg.out. Returns its manifest (run_stats: this run's timing).

    Everything a user can get wrong (spaces, VAEs, sources, the output folder) is checked before Ray starts
    or anything is written."""
    check_uri(cfg.out, "--out")
    store = Store(cfg.out)
    if store.local and Path(store.base).exists() and not Path(store.base).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; give a folder (new or empty) for the dataset")
    old = None
    if store.exists(MANIFEST):
        old = read_manifest(cfg.out, "--out")
    elif not store.is_empty_or_missing():
        raise ValueError(f"--out {cfg.out} holds files but no {MANIFEST}; use an empty or new folder")
    specs = _specs(cfg.spaces, cfg.latent, cfg.store_std, cfg.trust_remote_code)
    check_sources(cfg.images)
    entries = _space_entries(specs, cfg.tile_size)
    manifest = Manifest(tile_size=cfg.tile_size, max_tiles=cfg.max_tiles, min_size=cfg.min_size,
                        max_pixels=cfg.max_pixels, shard_size=cfg.shard_size, sources=list(cfg.images),
                        spaces=entries, package_version=__version__)
    if old is not None:
        diffs = _identity_diff(old, manifest, BEFORE_RAY)
        if diffs:
            raise ValueError(f"--out {cfg.out} holds a different dataset ({'; '.join(diffs)}); "
                             "use `interposer data add-space` for a new space, or a new --out")
        if old.complete:
            _say(cfg.quiet, f"{cfg.out} is complete ({old.counts.get('tiles', 0)} tiles); nothing to do")
            return old

    places = [(cfg.out, "--out"), *[(s, "--images") for s in cfg.images]]
    with _encoders(cfg, places, specs) as (ray, plan, specs):
        dtype = specs[0].dtype
        for entry in entries.values():
            entry.dtype = dtype
        manifest.args = {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "out")} | dict(dtype=dtype)
        if old is not None:
            diffs = _identity_diff(old, manifest)
            if diffs:
                raise ValueError(f"--out {cfg.out} holds a different dataset ({'; '.join(diffs)}); use a new --out")
            manifest.shards, manifest.indexed, manifest.index_counts = old.shards, old.indexed, old.index_counts
            _say(cfg.quiet, f"resuming {cfg.out}")
        removed = store.remove_temporaries()
        if removed:
            _say(cfg.quiet, f"removed {removed} half-written file(s) a stopped run left")
        if not manifest.indexed:
            _index(ray, cfg, store, manifest)
        cut = CutParams(cfg.tile_size, cfg.max_tiles, cfg.min_size, cfg.max_pixels)
        shapes = {k: v.latent_shape for k, v in entries.items()}
        work = _Work(BuildShard, dict(root=store.uri, specs=specs, shapes=shapes, cut=cut, store_std=cfg.store_std,
                                      batch_size=cfg.batch_size),
                     folders=["images", "tiles"] + [f"latents/{s}" for s in manifest.spaces], done_file=images_path,
                     done_counts=lambda f: shard_summary(f.schema.to_arrow_schema().metadata))
        totals, progress = _encode_missing(ray, store, manifest.shards, plan, cfg, work)
        manifest = _finish(cfg, store, manifest, totals, progress)
        if not manifest.counts.get("tiles"):
            _refuse_empty(cfg, store, manifest, created=old is None)
        return manifest


def _index(ray, cfg: BuildConfig, store: Store, manifest: Manifest) -> None:
    """List, read and hash every source file on the workers into index/ (what each shard holds); the manifest
    is written once the listing found images, and again with the shard count and the index counts."""
    _say(cfg.quiet, f"indexing {', '.join(cfg.images)}: listing, reading and hashing every file on the workers")

    def write_manifest(shards: int) -> None:  # the listing found images: from here on files are written
        manifest.shards = shards
        store.write_bytes(MANIFEST, manifest.to_json().encode())

    failure = None
    try:
        shards, counts = build_index(ray, cfg.images, cfg.shard_size, store, write_manifest)
    except Exception as e:
        failure = user_error(e)
        if failure is None:
            raise
    if failure is not None:
        raise failure
    manifest.shards, manifest.indexed, manifest.index_counts = shards, True, counts
    store.write_bytes(MANIFEST, manifest.to_json().encode())  # complete=False until the end
    c = counts
    _say(cfg.quiet, f"indexed {c['listed']} files: {c['unique_images']} unique images, {c['duplicates']} "
                    f"duplicates, skipped {c['skipped'] or 'none'} -> {shards} shards")


def _finish(cfg: BuildConfig, store: Store, manifest: Manifest, totals: dict, progress: Progress) -> Manifest:
    index = manifest.index_counts
    skipped = dict(index.get("skipped", {}))
    add_counts(skipped, totals.get("skipped", {}))
    manifest.counts = dict(listed=index["listed"], unique_images=index["unique_images"],
                           duplicates=index["duplicates"], images_ok=totals.get("images_ok", 0),
                           tiles=totals.get("tiles", 0), skipped=dict(sorted(skipped.items())))
    for entry in manifest.spaces.values():
        entry.tiles = manifest.counts["tiles"]
    manifest.complete = True
    store.write_bytes(MANIFEST, manifest.to_json().encode())
    manifest.run_stats = progress.stats()
    c = manifest.counts
    skipped = ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) or "none"
    _say(cfg.quiet, f"done: {c['listed']} files, {c['unique_images']} unique images, {c['images_ok']} used, "
                    f"{c['tiles']} tiles; skipped: {skipped}; {progress.summary()} -> {store.uri}")
    return manifest


def _refuse_empty(cfg: BuildConfig, store: Store, manifest: Manifest, created: bool, examples: int = 5) -> None:
    """A build that kept no tile made nothing usable: remove what it wrote and say which files were skipped and
    why (a few of them by name). The input was the user's: ValueError (exit 2)."""
    from .schema import index_path

    named = []
    for shard in range(manifest.shards):
        for rel in (index_path(shard), images_path(shard)):
            if len(named) < examples and store.exists(rel):
                rows = store.read_table(rel, columns=["uri", "status"]).to_pylist()
                named += [f"{r['uri']} ({r['status']})" for r in rows
                          if r["status"] not in ("ok", "duplicate")][: examples - len(named)]
    store.fs.delete_dir_contents(store.base, missing_dir_ok=True)
    if created and store.local:
        Path(store.base).rmdir()
    c = manifest.counts
    reasons = ", ".join(f"{k} {v}" for k, v in c.get("skipped", {}).items()) or "none"
    raise ValueError(f"no tiles from {c.get('listed', 0)} listed files (skipped: {reasons}; e.g. {', '.join(named)}); "
                     f"nothing was kept in {cfg.out}: see --min-size and --tile-size, or give other --images")


# ------------------------------------------------------------------------------------------ add-space


def add_space(cfg: AddSpaceConfig) -> Manifest:
    """Encode one more space for the tiles a dataset already has; existing files are not touched."""
    store = Store(cfg.data)
    manifest = register_manifest_spaces(read_manifest(cfg.data))  # first: a new VAE must not take a known name
    code = parse_space_arg(cfg.space, cfg.trust_remote_code)[0]
    if not manifest.complete and code not in manifest.spaces:
        raise ValueError(f"{cfg.data} is not finished; rerun its `interposer data build` command first")
    first = next(iter(manifest.spaces.values()))
    specs = _specs([cfg.space], first.latent, first.store_std, cfg.trust_remote_code)
    entry = _space_entries(specs, manifest.tile_size)[code]
    places = [(cfg.data, "--data"), *[(s, "the dataset's source") for s in manifest.sources]]
    with _encoders(cfg, places, specs) as (ray, plan, specs):
        entry.dtype = specs[0].dtype
        if code in manifest.spaces:
            old = manifest.spaces[code]
            diffs = _entry_diffs(code, old, entry, SAME_VAE)
            if diffs:
                raise ValueError(f"{cfg.data} already has {code} from another VAE ({'; '.join(diffs)}); "
                                 "build a new dataset for it")
            if manifest.complete:
                _say(cfg.quiet, f"{cfg.data} already has {code} ({old.tiles} tiles); nothing to do")
                return manifest
        store.remove_temporaries()
        manifest.spaces[code] = entry
        manifest.complete = False  # until every shard has the new space
        store.write_bytes(MANIFEST, manifest.to_json().encode())

        _say(cfg.quiet, f"adding {code} to {cfg.data}")
        cut = CutParams(manifest.tile_size, manifest.max_tiles, manifest.min_size, manifest.max_pixels)
        work = _Work(AddSpaceShard, dict(root=store.uri, specs=specs, shapes={code: entry.latent_shape}, cut=cut,
                                         store_std=entry.store_std, batch_size=cfg.batch_size),
                     folders=[f"latents/{code}"], done_file=lambda s: latents_path(code, s),
                     done_counts=lambda f: {"tiles": f.num_rows})
        totals, progress = _encode_missing(ray, store, manifest.shards, plan, cfg, work)
        entry.tiles = totals.get("tiles", 0)
        missing = manifest.counts.get("tiles", 0) - entry.tiles
        if missing:
            _say(cfg.quiet, f"warning: {missing} tile(s) have no {code} latent (NaN/inf from its VAE, or a changed "
                            f"source); join spaces on tile_key")
        manifest.complete = True
        store.write_bytes(MANIFEST, manifest.to_json().encode())
        manifest.run_stats = progress.stats()
        _say(cfg.quiet, f"done: {code} added, {entry.tiles} of {manifest.counts.get('tiles', 0)} tiles; "
                        f"{progress.summary()} -> {store.uri}")
        return manifest
