"""The Ray Data driver: `data build` and `data add-space`. The only pipeline module that imports Ray.

    interposer data build --images photos/ --space v1 --space xl --out data/v1-xl
    interposer data add-space --data data/v1-xl --space fx

Stages: list sources -> index (read + sha256 every file, Ray tasks; identical files become one image) ->
for each unfinished shard's images: decode + tile (Ray tasks, CPU) -> encode with every VAE (TileEncoder
on an actor pool, GPUs when the cluster has them) -> the driver writes each shard's files once all its
images are back. Local Ray by default; set RAY_ADDRESS (or use `ray job submit`) for a cluster.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from interposer import __version__
from interposer.spaces import get_space

from .encoder import VAESpec, fingerprint, load_vae, parse_space_arg, resolve_source
from .images import DEFAULT_MAX_PIXELS
from .rows import cut_batch, hash_batch
from .schema import (
    IMAGES_SCHEMA,
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    TILES_SCHEMA,
    Manifest,
    SpaceEntry,
    images_path,
    latent_table,
    latents_path,
    tile_key,
    tiles_path,
)
from .sources import list_sources
from .store import Store


@dataclass
class BuildConfig:
    images: list[str]  # image sources (folders, globs, listing files, URIs)
    spaces: list[str]  # "v1", "xl=REPO[:SUBFOLDER]", "fx=/local/vae"
    out: str  # dataset folder or URI
    tile_size: int = 1024  # tile side in pixels
    max_tiles: int = 6  # tiles per image at most
    min_size: int = 512  # images whose short side is below this are skipped
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs
    shard_size: int = 64  # unique images per shard (the unit of resume)
    batch_size: int = 6  # tiles per VAE forward pass (only tiles of one image share a pass)
    workers: int = 0  # encoder actors; 0 = one per GPU, or 1 without GPUs
    gpus_per_worker: float = -1  # -1 = 1 when the cluster has GPUs, else 0
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    latent: str = "mean"  # "mean" of the encoder distribution, or "sample" (seeded by tile key)
    store_std: bool = False  # also store the encoder distribution's std
    quiet: bool = False

    def __post_init__(self):
        # local sources and outputs are recorded absolute, so a rerun from another folder means the same data
        self.images = [s if "://" in s else os.path.abspath(os.path.expanduser(s)) for s in self.images]
        for name in ("tile_size", "max_tiles", "min_size", "shard_size", "batch_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tile_size % 64:
            raise ValueError(f"--tile-size must be a multiple of 64 (every space's factor), got {self.tile_size}")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 (auto) or more, got {self.workers}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.latent not in ("mean", "sample"):
            raise ValueError(f"--latent must be mean or sample, got {self.latent!r}")


def _say(cfg, msg: str) -> None:
    if not cfg.quiet:
        print(f"[data] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ ray


def start_ray(log_to_driver: bool = False) -> bool:
    """Connect to the cluster RAY_ADDRESS names, or start Ray on this machine; True if this call started it.

    Local Ray runs its workers at this command's own priority: Ray's default renices every worker to 15,
    which starves an encoder or trainer beside any other work on a desktop (and makes `nice` meaningless).
    Set RAY_worker_niceness yourself to keep Ray's default."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning", log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(logging_level="warning", log_to_driver=log_to_driver, include_dashboard=False)
    return True


def _ray():
    import ray

    started = start_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    ctx.print_on_execution_start = False
    return ray, started


# What each stage asks Ray for (cluster.yaml's node types are sized to fit these; a test checks it).
DECODE_CPUS = 0.5  # a decode+tile task: below the encoder's 1 so Ray does not fuse the two stages
ENCODER_CPUS = 1.0  # an encoder actor, plus `gpus_per_worker` GPUs (default 1 on a GPU cluster)


def default_requests(gpus: float = 1.0) -> dict[str, dict[str, float]]:
    """Ray resources of one encoder actor and one decode task with default flags on a GPU cluster."""
    return {"encoder": {"CPU": ENCODER_CPUS, "GPU": gpus}, "decode": {"CPU": DECODE_CPUS}}


def _resources(ray, cfg: BuildConfig) -> tuple[int, float, int]:
    """(encoder actors, GPUs per actor, torch threads per actor) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    per = cfg.gpus_per_worker if cfg.gpus_per_worker >= 0 else (1.0 if gpus else 0.0)
    if per > 0 and gpus == 0:
        raise ValueError(f"--gpus-per-worker {per:g}: the Ray cluster has no GPUs; pass --gpus-per-worker 0")
    workers = cfg.workers or (max(1, int(gpus / per)) if per > 0 else 1)
    threads = 1 if per > 0 else max(1, cpus // workers)
    return workers, per, threads


# ------------------------------------------------------------------------------------------- the VAEs


def _specs(cfg: BuildConfig, space_args: list[str], dtype: str) -> list[VAESpec]:
    specs, seen = [], set()
    for arg in space_args:
        code, source, sub = parse_space_arg(arg)
        if code in seen:
            raise ValueError(f"--space {code} is given twice")
        seen.add(code)
        source, sub = resolve_source(get_space(code), source, sub)
        specs.append(VAESpec(code, source, sub, dtype, cfg.latent, cfg.store_std))
    return specs


def _space_entries(cfg: BuildConfig, specs: list[VAESpec]) -> dict[str, SpaceEntry]:
    """Load each VAE once in the driver (fp32, CPU): a wrong source or a VAE of the wrong shape fails here,
    before any work starts, and the weights' fingerprint goes into the manifest."""
    import torch

    from .encoder import encode_raw

    entries = {}
    for spec in specs:
        space = get_space(spec.space)
        vae = load_vae(space, spec.source, spec.subfolder)
        side = 64
        latent, _ = encode_raw(vae, space, torch.zeros(1, 3, side, side))
        expected = (space.channels, side // space.factor, side // space.factor)
        if tuple(latent.shape[1:]) != expected:
            raise ValueError(f"--space {spec.space}: the VAE at {spec.source} makes latents of shape "
                             f"{tuple(latent.shape[1:])} from a {side}px image; {spec.space} needs {expected}")
        h = cfg.tile_size // space.factor
        entries[spec.space] = SpaceEntry(
            vae=spec.source, subfolder=spec.subfolder, vae_class=space.vae_class, dtype=spec.dtype,
            fingerprint=fingerprint(vae), channels=space.channels, factor=space.factor,
            latent_shape=[space.channels, h, h], latent=spec.latent, store_std=spec.store_std)
        del vae
    return entries


# ------------------------------------------------------------------------------------------- the index


def _index(ray, cfg: BuildConfig, store: Store, listing: tuple[list[str], dict] | None) -> pa.Table:
    """index.parquet: every listed URI with its image id and shard; built once, then reused."""
    if store.exists(INDEX):
        return store.read_table(INDEX)
    uris, listing_skips = listing if listing is not None else list_sources(cfg.images)
    _say(cfg, f"indexing {len(uris)} files (reading and hashing each once)")
    hashed = ray.data.from_items([{"uri": u} for u in uris]).map_batches(hash_batch, batch_size=16)
    rows = sorted(hashed.take_all(), key=lambda r: r["uri"])
    first: dict[str, str] = {}
    for r in rows:
        if r["status"] == "ok":
            first.setdefault(r["image_id"], r["uri"])  # duplicates: the first URI in sort order is encoded
    ids = sorted(first)
    shard_of = {image_id: i // cfg.shard_size for i, image_id in enumerate(ids)}
    table = pa.Table.from_pylist(
        [dict(uri=r["uri"], image_id=r["image_id"], bytes=int(r["bytes"]),
              shard=shard_of[r["image_id"]] if r["status"] == "ok" and first[r["image_id"]] == r["uri"] else -1)
         for r in rows], schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({"listing_skipped": json.dumps(listing_skips, sort_keys=True)})
    store.write_table(INDEX, table)
    return table


# -------------------------------------------------------------------------------------- shard writing


@dataclass
class _Progress:
    shards_total: int
    shards_done: int = 0
    images: int = 0
    tiles: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    first_row: tuple[float, int] | None = None  # (time, its tiles) when the first encoded image came back

    def row_received(self, row: dict) -> None:
        if self.first_row is None:
            self.first_row = (time.perf_counter(), len(json.loads(row["kept"])) if row["status"] == "ok" else 0)

    def shard_written(self) -> None:
        self.shards_done += 1

    def stats(self) -> dict:
        """This run's timing (not part of the manifest: it would make rebuilt datasets differ). The steady
        figures start when the first image is back, so they leave out actor start-up and VAE loading."""
        now = time.perf_counter()
        first_t, first_n = self.first_row or (now, self.tiles)
        return dict(tiles=self.tiles, seconds=now - self.start, steady_tiles=self.tiles - first_n,
                    steady_seconds=now - first_t)

    def line(self) -> str:
        rate = self.tiles / max(time.perf_counter() - self.start, 1e-9)
        skipped = sum(self.skipped.values())
        return (f"shard {self.shards_done}/{self.shards_total}: {self.images} images, {self.tiles} tiles, "
                f"{skipped} skipped, {rate:.2f} tiles/s")


def _latents(row: dict, space: str, shape: list[int], n: int, std: bool) -> tuple[np.ndarray, np.ndarray | None]:
    lat = np.frombuffer(row[f"lat_{space}"], np.float16).reshape(n, *shape)
    s = np.frombuffer(row[f"std_{space}"], np.float16).reshape(n, *shape) if std else None
    return lat, s


def _write_shard(store: Store, shard: int, rows: list[dict], spaces: dict[str, SpaceEntry]) -> tuple[int, dict]:
    """Write one shard's latents, tiles and images files; returns (tiles, skipped-by-reason)."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    image_rows, tile_rows, skipped = [], [], {}
    lat_parts: dict[str, list] = {s: [] for s in spaces}
    std_parts: dict[str, list] = {s: [] for s in spaces}
    for r in rows:
        kept = json.loads(r["kept"]) if r["status"] == "ok" else []
        boxes = dict(zip(json.loads(r["indices"]), json.loads(r["boxes"])))
        nonfinite = len(boxes) - len(kept) if r["status"] == "ok" else 0
        if nonfinite:
            skipped["nonfinite_tiles"] = skipped.get("nonfinite_tiles", 0) + nonfinite
        if r["status"] != "ok":
            skipped[r["status"]] = skipped.get(r["status"], 0) + 1
        image_rows.append(dict(image_id=r["image_id"], uri=r["uri"], width=int(r["width"]), height=int(r["height"]),
                               resized_width=int(r["resized_width"]), resized_height=int(r["resized_height"]),
                               tiles=len(kept), nonfinite=nonfinite, status=r["status"]))
        for i in kept:
            tile_rows.append(dict(tile_key=tile_key(r["image_id"], i), image_id=r["image_id"], uri=r["uri"],
                                  tile_index=i, box=boxes[i]))
        for space, entry in spaces.items():
            if kept:
                lat, std = _latents(r, space, entry.latent_shape, len(kept), entry.store_std)
                lat_parts[space].append(lat)
                std_parts[space].append(std)
    keys = [t["tile_key"] for t in tile_rows]
    for space, entry in spaces.items():
        shape = tuple(entry.latent_shape)
        lat = np.concatenate(lat_parts[space]) if lat_parts[space] else np.zeros((0, *shape), np.float16)
        std = (np.concatenate(std_parts[space]) if std_parts[space] else np.zeros((0, *shape), np.float16)) \
            if entry.store_std else None
        store.write_table(latents_path(space, shard), latent_table(keys, lat, std, shape))
    store.write_table(tiles_path(shard), pa.Table.from_pylist(tile_rows, schema=TILES_SCHEMA))
    store.write_table(images_path(shard), pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA))
    return len(tile_rows), skipped


def _shard_done(store: Store, shard: int, spaces) -> bool:
    return all(store.exists(p) for p in [images_path(shard), tiles_path(shard)] +
               [latents_path(s, shard) for s in spaces])


def _run_shards(ray, cfg: BuildConfig, store: Store, specs: list[VAESpec], work: list[dict],
                expected: dict[int, int], on_shard, progress: _Progress) -> None:
    """Cut and encode `work` (image rows), calling on_shard(shard, rows) once all its images are back."""
    workers, gpus, threads = _resources(ray, cfg)
    ds = ray.data.from_items(work, override_num_blocks=max(1, min(len(work), 200)))
    # num_cpus=0.5 keeps decoding a separate stage (Ray fuses stages with identical resources, which would
    # put decoding inside the encoder actor) and lets two decodes share a core while they wait on I/O.
    ds = ds.map_batches(cut_batch, batch_size=1, num_cpus=DECODE_CPUS, fn_kwargs=dict(
        tile_size=cfg.tile_size, max_tiles=cfg.max_tiles, min_size=cfg.min_size, max_pixels=cfg.max_pixels))
    ds = ds.map_batches(
        _ThreadedEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus or None, num_cpus=ENCODER_CPUS,
        fn_constructor_kwargs=dict(specs=specs, batch_size=cfg.batch_size, threads=threads,
                                   device="cuda" if gpus else "cpu"))
    pending: dict[int, list[dict]] = {}
    for row in ds.iter_rows():
        progress.row_received(row)
        shard = int(row["shard"])
        pending.setdefault(shard, []).append(row)
        if len(pending[shard]) == expected[shard]:
            on_shard(shard, pending.pop(shard))
            progress.shard_written()
            _say(cfg, progress.line())
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} came back incomplete; rerun the same command to finish")


class _ThreadedEncoder:
    """TileEncoder with a torch thread count: a Ray actor's torch would otherwise use 1 thread."""

    def __init__(self, specs, batch_size, threads, device):
        import torch

        from .encoder import TileEncoder

        torch.set_num_threads(threads)
        self.encoder = TileEncoder(specs, device=device, batch_size=batch_size)

    def __call__(self, batch):
        return self.encoder(batch)


# ---------------------------------------------------------------------------------------------- build


def _counts(store: Store, index: pa.Table, shards: int) -> dict:
    skipped = json.loads((index.schema.metadata or {}).get(b"listing_skipped", b"{}"))
    status = index.column("image_id").to_pylist()
    skipped_unreadable = sum(1 for s in status if s == "")
    if skipped_unreadable:
        skipped["unreadable"] = skipped.get("unreadable", 0) + skipped_unreadable
    ok = tiles = 0
    for shard in range(shards):
        for r in store.read_table(images_path(shard)).to_pylist():
            if r["status"] == "ok":
                ok += 1
            else:
                skipped[r["status"]] = skipped.get(r["status"], 0) + 1
            if r["nonfinite"]:
                skipped["nonfinite_tiles"] = skipped.get("nonfinite_tiles", 0) + r["nonfinite"]
        tiles += store.read_table(tiles_path(shard)).num_rows
    unique = len({i for i in status if i})
    return dict(listed=index.num_rows, unique_images=unique, duplicates=sum(1 for i in status if i) - unique,
                images_ok=ok, tiles=tiles, skipped=dict(sorted(skipped.items())))


def _identity_diff(old: Manifest, new: Manifest) -> list[str]:
    diffs = [f"{k}: dataset has {v!r}, you asked {new.identity()[k]!r}"
             for k, v in old.identity().items() if new.identity()[k] != v]
    if sorted(old.spaces) != sorted(new.spaces):
        diffs.append(f"spaces: dataset has {', '.join(sorted(old.spaces))}, you asked {', '.join(sorted(new.spaces))}")
    for code in set(old.spaces) & set(new.spaces):
        a, b = old.spaces[code], new.spaces[code]
        for attr in ("vae", "subfolder", "fingerprint", "dtype", "latent", "store_std"):
            if getattr(a, attr) != getattr(b, attr):
                diffs.append(f"{code} {attr}: dataset has {getattr(a, attr)!r}, you asked {getattr(b, attr)!r}")
    return diffs


def build(cfg: BuildConfig) -> Manifest:
    """Build (or finish building) the dataset in cfg.out. Returns its manifest.

    Everything a user can get wrong (spaces, VAEs, sources, the output folder) is checked before Ray starts
    or anything is written."""
    store = Store(cfg.out)
    old = None
    if store.exists(MANIFEST):
        old = Manifest.from_json(store.read_bytes(MANIFEST).decode(), f"{cfg.out}/{MANIFEST}")
    elif not store.is_empty_or_missing():
        raise ValueError(f"--out {cfg.out} holds files but no {MANIFEST}; use an empty or new folder")
    specs = _specs(cfg, cfg.spaces, cfg.dtype)
    if not specs:
        raise ValueError("give at least one --space")
    listing = None if store.exists(INDEX) else list_sources(cfg.images)
    if listing is not None and not listing[0]:
        raise ValueError(f"no images found in {', '.join(cfg.images)} (extensions: jpg, png, webp, ...)")
    entries = _space_entries(cfg, specs)

    ray, started = _ray()
    try:
        workers, gpus, _ = _resources(ray, cfg)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpus else "float32")
        specs = [replace(spec, dtype=dtype) for spec in specs]
        for entry in entries.values():
            entry.dtype = dtype
        manifest = Manifest(tile_size=cfg.tile_size, max_tiles=cfg.max_tiles, min_size=cfg.min_size,
                            max_pixels=cfg.max_pixels, shard_size=cfg.shard_size, sources=list(cfg.images),
                            spaces=entries, package_version=__version__,
                            args={k: v for k, v in asdict(cfg).items() if k not in ("quiet", "out")}
                            | dict(dtype=dtype, workers=workers, gpus_per_worker=gpus))
        if old is not None:
            diffs = _identity_diff(old, manifest)
            if diffs:
                raise ValueError(f"--out {cfg.out} holds a different dataset ({'; '.join(diffs)}); "
                                 "use `interposer data add-space` for a new space, or a new --out")
            if old.complete:
                _say(cfg, f"{cfg.out} is complete ({old.counts.get('tiles', 0)} tiles); nothing to do")
                return old
            _say(cfg, f"resuming {cfg.out}")
        removed = store.remove_temporaries()
        if removed:
            _say(cfg, f"removed {removed} half-written file(s) a stopped run left")
        store.write_bytes(MANIFEST, manifest.to_json().encode())  # complete=False until the end

        index = _index(ray, cfg, store, listing)
        shards = max(index.column("shard").to_pylist(), default=-1) + 1
        todo = [s for s in range(shards) if not _shard_done(store, s, manifest.spaces)]
        rows = [r for r in index.to_pylist() if r["shard"] in set(todo)]
        expected = {s: 0 for s in todo}
        for r in rows:
            expected[r["shard"]] += 1
        _say(cfg, f"{index.num_rows} files, {shards} shards of up to {cfg.shard_size} images; {len(todo)} to do; "
                  f"{workers} encoder(s), {gpus:g} GPU each, {dtype}, spaces {', '.join(manifest.spaces)}")
        progress = _Progress(shards_total=len(todo))

        def on_shard(shard: int, shard_rows: list[dict]) -> None:
            tiles, skipped = _write_shard(store, shard, shard_rows, manifest.spaces)
            progress.images += len(shard_rows)
            progress.tiles += tiles
            for k, v in skipped.items():
                progress.skipped[k] = progress.skipped.get(k, 0) + v

        if todo:
            work = [dict(image_id=r["image_id"], uri=r["uri"], shard=r["shard"]) for r in rows]
            _run_shards(ray, cfg, store, specs, work, expected, on_shard, progress)
        return _finish(cfg, store, manifest, index, shards, progress)
    finally:
        if started:
            ray.shutdown()


def _finish(cfg, store: Store, manifest: Manifest, index: pa.Table, shards: int, progress: _Progress) -> Manifest:
    for code, entry in manifest.spaces.items():
        entry.tiles = sum(store.read_table(latents_path(code, s)).num_rows for s in range(shards))
    manifest.shards = shards
    manifest.counts = _counts(store, index, shards)
    manifest.complete = True
    store.write_bytes(MANIFEST, manifest.to_json().encode())
    manifest.run_stats = progress.stats()
    elapsed = time.perf_counter() - progress.start
    c = manifest.counts
    skipped = ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) or "none"
    _say(cfg, f"done: {c['listed']} files, {c['unique_images']} unique images, {c['images_ok']} used, "
              f"{c['tiles']} tiles; skipped: {skipped}; this run {progress.tiles} tiles in {elapsed:.1f} s "
              f"({progress.tiles / max(elapsed, 1e-9):.2f} tiles/s) -> {store.uri}")
    return manifest


# ------------------------------------------------------------------------------------------ add-space


@dataclass
class AddSpaceConfig:
    data: str  # an existing, complete dataset
    space: str  # "fx" or "fx=REPO[:SUBFOLDER]" or "fx=/local/vae"
    batch_size: int = 6
    workers: int = 0
    gpus_per_worker: float = -1
    dtype: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


def read_manifest(store: Store, where: str) -> Manifest:
    if not store.exists(MANIFEST):
        raise FileNotFoundError(f"{where}: no {MANIFEST}; not a dataset (build one with `interposer data build`)")
    return Manifest.from_json(store.read_bytes(MANIFEST).decode(), f"{where}/{MANIFEST}")


def add_space(cfg: AddSpaceConfig) -> Manifest:
    """Encode one more space for the tiles a dataset already has; existing files are not touched."""
    store = Store(cfg.data)
    manifest = read_manifest(store, cfg.data)
    code = parse_space_arg(cfg.space)[0]
    if not manifest.complete and code not in manifest.spaces:
        raise ValueError(f"{cfg.data} is not finished; rerun its `interposer data build` command first")
    first = next(iter(manifest.spaces.values()))
    build_cfg = BuildConfig(images=manifest.sources, spaces=[cfg.space], out=cfg.data,
                            tile_size=manifest.tile_size, max_tiles=manifest.max_tiles, min_size=manifest.min_size,
                            max_pixels=manifest.max_pixels, shard_size=manifest.shard_size,
                            batch_size=cfg.batch_size, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                            dtype=cfg.dtype, latent=first.latent, store_std=first.store_std, quiet=cfg.quiet)
    specs = _specs(build_cfg, [cfg.space], cfg.dtype)
    entry = _space_entries(build_cfg, specs)[code]
    ray, started = _ray()
    try:
        workers, gpus, _ = _resources(ray, build_cfg)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpus else "float32")
        specs = [replace(spec, dtype=dtype) for spec in specs]
        entry.dtype = dtype
        if code in manifest.spaces:
            old = manifest.spaces[code]
            diffs = [f"{a}: dataset has {getattr(old, a)!r}, you asked {getattr(entry, a)!r}"
                     for a in ("vae", "subfolder", "fingerprint", "dtype") if getattr(old, a) != getattr(entry, a)]
            if diffs:
                raise ValueError(f"{cfg.data} already has {code} from another VAE ({'; '.join(diffs)}); "
                                 "build a new dataset for it")
            if manifest.complete:
                _say(cfg, f"{cfg.data} already has {code} ({old.tiles} tiles); nothing to do")
                return manifest
            entry = old
        store.remove_temporaries()
        manifest.spaces[code] = entry
        manifest.complete = False  # until every shard has the new space
        store.write_bytes(MANIFEST, manifest.to_json().encode())

        todo = [s for s in range(manifest.shards) if not store.exists(latents_path(code, s))]
        tiles_of = {s: store.read_table(tiles_path(s)) for s in todo}
        work, expected = [], {}
        for s in todo:
            for r in store.read_table(images_path(s)).to_pylist():
                if r["status"] == "ok" and r["tiles"]:
                    work.append(dict(image_id=r["image_id"], uri=r["uri"], shard=s))
                    expected[s] = expected.get(s, 0) + 1
        _say(cfg, f"adding {code} to {cfg.data}: {len(todo)} of {manifest.shards} shards to encode, "
                  f"{len(work)} images; {workers} encoder(s), {gpus:g} GPU each, {dtype}")
        progress = _Progress(shards_total=len(todo))
        missing = 0

        def on_shard(shard: int, shard_rows: list[dict]) -> None:
            nonlocal missing
            latents = {}
            for r in shard_rows:
                if r["status"] != "ok":
                    continue
                kept = json.loads(r["kept"])
                lat, std = _latents(r, code, entry.latent_shape, len(kept), entry.store_std)
                for j, i in enumerate(kept):
                    latents[tile_key(r["image_id"], i)] = (lat[j], std[j] if std is not None else None)
            keys = [k for k in tiles_of[shard].column("tile_key").to_pylist() if k in latents]
            missing += tiles_of[shard].num_rows - len(keys)
            shape = tuple(entry.latent_shape)
            lat = np.stack([latents[k][0] for k in keys]) if keys else np.zeros((0, *shape), np.float16)
            std = (np.stack([latents[k][1] for k in keys]) if keys else np.zeros((0, *shape), np.float16)) \
                if entry.store_std else None
            store.write_table(latents_path(code, shard), latent_table(keys, lat, std, shape))
            progress.images += len(shard_rows)
            progress.tiles += len(keys)

        for s in [s for s in todo if s not in expected]:  # shards with no usable image: an empty file
            on_shard(s, [])
            progress.shard_written()
        if work:
            _run_shards(ray, build_cfg, store, specs, work, expected, on_shard, progress)
        if missing:
            _say(cfg, f"warning: {missing} tile(s) have no {code} latent (NaN/inf from its VAE, or a changed "
                      f"source); join spaces on tile_key")
        entry.tiles = sum(store.read_table(latents_path(code, s)).num_rows for s in range(manifest.shards))
        manifest.complete = True
        store.write_bytes(MANIFEST, manifest.to_json().encode())
        _say(cfg, f"done: {code} added, {entry.tiles} of {manifest.counts.get('tiles', 0)} tiles -> {store.uri}")
        return manifest
    finally:
        if started:
            ray.shutdown()


# -------------------------------------------------------------------------------------------- inspect


def inspect_dataset(data: str) -> dict:
    """Manifest summary plus per-space, per-channel latent mean and std (streamed over the shards)."""
    from .schema import read_latents

    store = Store(data)
    manifest = read_manifest(store, data)
    stats = {}
    for code, entry in manifest.spaces.items():
        c = entry.channels
        n, total, total_sq = 0, np.zeros(c), np.zeros(c)
        for name in store.list(f"latents/{code}"):
            lat = read_latents(store.read_table(f"latents/{code}/{name}")).astype(np.float64)  # (N, C, h, w)
            n += lat.shape[0] * lat.shape[2] * lat.shape[3]
            total += lat.sum(axis=(0, 2, 3))
            total_sq += (lat ** 2).sum(axis=(0, 2, 3))
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean ** 2, 0))
        stats[code] = dict(tiles=entry.tiles, mean=mean.round(4).tolist(), std=std.round(4).tolist())
    return dict(path=store.uri, complete=manifest.complete, tile_size=manifest.tile_size, shards=manifest.shards,
                counts=manifest.counts, spaces={k: asdict(v) for k, v in manifest.spaces.items()}, stats=stats,
                fingerprint=manifest.fingerprint())
