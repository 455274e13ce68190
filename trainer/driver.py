"""The Ray Train driver: `interposer train`. The only trainer module that imports Ray.

    interposer train --data data/xl-v1 --src xl --dst v1 --out runs --name xl-v1            # CPU, 1 worker
    interposer train --data s3://b/data --src xl --dst v1 --out s3://b/runs --name xl-v1 --gpu --workers 8

Rerunning the same command resumes from the run's latest checkpoint (Ray Train keeps the run's state under
OUT/NAME); a worker lost mid-run is replaced and the run goes on from the latest checkpoint by itself
(--max-failures). Every random draw is seeded by (seed, step, rank), so a resumed run ends with the same
weights as one that never stopped (on the CPU; GPU kernels are not bit-reproducible).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from interposer import save_interposer, save_released
from interposer.files import absolute
from interposer.spaces import release_filename
from interposer.weights import is_v4
from interposer.pipeline.schema import DatasetFiles, images_path, read_manifest, register_manifest_spaces

from .checkpoint import load_final
from .config import RESUMABLE, TrainConfig
from .data import check_pair, check_spaces, crop_sides
from .publish import EXPORT
from .universal import STATS_TILES  # train tiles a normalising network's statistics are measured on

RUN_RECORD = "interposer-run.json"


def worker_request(cfg: TrainConfig, cluster_cpus: int = 1) -> dict[str, float]:
    """Ray resources of one training worker (cluster.yaml's train nodes are sized to fit these)."""
    cpus = cfg.resources.cpus_per_worker or (1 if cfg.resources.gpu else max(1, cluster_cpus // cfg.resources.workers))
    return {"CPU": cpus, "GPU": 1} if cfg.resources.gpu else {"CPU": cpus}


def pair_fingerprint(manifest, src: str, dst: str) -> str:
    """What the pair's latents depend on: tiling, sources and both spaces' VAEs."""
    ident = dict(manifest.identity(), src=(src, manifest.spaces[src].fingerprint, manifest.spaces[src].dtype),
                 dst=(dst, manifest.spaces[dst].fingerprint, manifest.spaces[dst].dtype), tiles=manifest.counts)
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def spaces_fingerprint(manifest, spaces: list[str], base: str | None = None) -> str:
    """What a universal run depends on: tiling, sources and every space's VAE (and with --add-space the sha256
    of the --from network's weights)."""
    ident = dict(manifest.identity(), tiles=manifest.counts,
                 spaces=[(c, manifest.spaces[c].fingerprint, manifest.spaces[c].dtype) for c in spaces])
    if base:
        ident["base"] = base
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass
class RunSpec:
    data: str
    out: str
    name: str
    rev: str = "v5.0"  # version in the exported released-layout file name
    trust_remote_code: bool = False  # a decoded loss may load a target VAE that runs its own code

    def __post_init__(self):
        name = self.name
        if not name or name != name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            raise ValueError(f"--name {name!r}: a run name is a name, not a path: no '/', no leading '.', not empty "
                             "(the run lives in --out/NAME)")
        self.data = absolute(self.data)  # workers run elsewhere (another folder, another node)


def _local(out: str) -> bool:
    return "://" not in out


def _run_dir(spec: RunSpec) -> str:
    return f"{absolute(spec.out).rstrip('/')}/{spec.name}"


def _store(spec: RunSpec) -> DatasetFiles:
    """OUT/NAME, local or a pyarrow filesystem URI; files written whole."""
    return DatasetFiles(_run_dir(spec))


def _check_out(spec: RunSpec) -> None:
    """The runs folder: reachable (an object store's bucket exists), and not inside the dataset it reads (a run's
    files there would sit among the dataset's, and a rebuild would find a folder it did not make)."""
    from interposer.pipeline.objectstore import check_uri

    check_uri(spec.out, "--out")
    run, data = _run_dir(spec).rstrip("/") + "/", spec.data.rstrip("/") + "/"
    if run.startswith(data):
        raise ValueError(f"--out {spec.out} is inside the dataset --data {spec.data}; keep runs beside datasets "
                         f"(e.g. --out {spec.data.rstrip('/').rsplit('/', 1)[0]}/runs)")


def _check_resume(cfg: TrainConfig, spec: RunSpec, fingerprint: str) -> dict | None:
    """The run's record, if any; refuses a resume whose data or config differ, naming the difference."""
    store = _store(spec)
    if not store.exists(RUN_RECORD):
        return None
    record = json.loads(store.read_bytes(RUN_RECORD))
    diffs = []
    if record["dataset_fingerprint"] != fingerprint:
        diffs.append(f"--data: the run was trained on {record['data']} ({record['dataset_fingerprint'][:19]}...), "
                     f"this is {spec.data} ({fingerprint[:19]}...)")
    new, recorded = cfg.flat(), record["config"]
    if any(isinstance(v, dict) for v in recorded.values()):  # grouped (flat in records of older versions)
        recorded = {k: v for key, value in recorded.items()
                    for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}
    recorded.setdefault("arch", "v4")  # records from before the shuffle network trained v4 for every pair
    for key, old in recorded.items():
        if key not in RESUMABLE and new.get(key) != old:
            diffs.append(f"{key}: the run has {old!r}, you asked {new.get(key)!r}")
    if diffs:
        raise ValueError(f"run {_run_dir(spec)} exists with different settings ({'; '.join(diffs)}); "
                         "pass the same ones to resume, or a new --name")
    return record


def _check_data(cfg: TrainConfig, data: str, manifest) -> bool:
    """Settings this dataset makes impossible, refused before Ray starts (Ray Train would retry them as worker
    failures); returns whether the validation split holds an image. Reads images files only until both
    splits have one (usually the first shard)."""
    from .data import is_validation

    if cfg.is_universal:
        crop_sides(cfg.space_list(), cfg.data.crop, cfg.universal.grid)  # whole latent pixels in every space
        if cfg.data.crop * cfg.universal.grid > manifest.tile_size:
            raise ValueError(f"--crop {cfg.data.crop} (working-grid pixels of {cfg.universal.grid} px) is larger than "
                             f"the {manifest.tile_size} px tiles of {data}; pass --crop "
                             f"{manifest.tile_size // cfg.universal.grid} or less")
    else:
        side = manifest.spaces[cfg.src].latent_shape[1:]
        if cfg.data.crop > min(side):
            raise ValueError(f"--crop {cfg.data.crop} is larger than the {cfg.src} latents of {data} ({side[0]}x"
                             f"{side[1]}, from {manifest.tile_size} px tiles); pass --crop {min(side)} or less")
    store, found, images = DatasetFiles(data), {True: False, False: False}, 0
    for shard in range(manifest.shards):
        for r in store.read_table(images_path(shard), columns=["image_id", "status", "tiles"]).to_pylist():
            if r["status"] == "ok" and r["tiles"]:
                images += 1
                found[is_validation(r["image_id"], cfg.data.val_fraction)] = True
        if all(found.values()):
            break
    if not images:
        raise ValueError(f"--data {data} holds no tiles (its build kept no image); rebuild it from other images")
    if not found[False]:
        raise ValueError(f"--val-fraction {cfg.data.val_fraction} holds out every image of {data} ({images}); "
                         "pass a smaller --val-fraction")
    if cfg.data.val_fraction and not found[True]:
        warnings.warn(f"--val-fraction {cfg.data.val_fraction}: no image of {data} ({images} images) falls in the "
                      "validation share; training without validation (a larger --val-fraction holds some out)",
                      stacklevel=2)
    return found[True]


def train_stats(cfg: TrainConfig, data: str) -> dict | None:
    """Per-channel latent statistics of the first STATS_TILES train tiles, for networks that normalise (the
    same numbers on every rank and on every resume: they depend on the dataset and the split only)."""
    if cfg.is_universal:  # with --add-space only the new space's: the others come with the base network
        from .data import TileReader
        from .universal import universal_stats

        spaces = [cfg.universal.add_space] if cfg.universal.add_space else cfg.space_list()
        return universal_stats(TileReader(data, spaces, cfg.data.val_fraction), cfg)
    if cfg.model.arch == "v4":
        return None
    from .data import PairReader
    from .step import latent_stats

    tiles = PairReader(data, cfg.src, cfg.dst, cfg.data.val_fraction).take("train", STATS_TILES)
    return latent_stats(torch.from_numpy(tiles.src), torch.from_numpy(tiles.dst))


def _check_decoder(cfg: TrainConfig, spec: RunSpec, manifest) -> None:
    """A decoded loss needs the target's decoder, and trust where that VAE runs its own code: refused here,
    before Ray starts (in the workers it would be retried as a worker failure)."""
    from interposer.spaces import get_space
    from interposer.vae import check_trust

    entry = manifest.spaces[cfg.dst]
    if not get_space(cfg.dst).decoder:
        raise ValueError(f"decoded_loss_weight: the {cfg.dst} VAE ({entry.vae}) has no decoder (encoder only); "
                         "set decoded_loss_weight to 0")
    check_trust(entry.vae, entry.subfolder, spec.trust_remote_code, entry.code, f"the {cfg.dst} VAE")


def train(cfg: TrainConfig, spec: RunSpec) -> Path | str:
    """Train (or resume, or find finished) the run OUT/NAME; returns the export folder."""
    begun = time.time()
    base = base_sha = None  # --add-space: the --from network ({args, state}) and its weights' sha256
    manifest = register_manifest_spaces(read_manifest(spec.data))
    _check_out(spec)
    if cfg.is_universal:
        from .universal import pair_draws, run_spaces

        if cfg.universal.add_space:
            base, base_sha = load_base(cfg.universal.base)
            cfg, spaces = add_space_config(cfg, base, manifest, spec.data)
        else:
            spaces = run_spaces(cfg, manifest)
        cfg = dataclasses.replace(cfg, universal=dataclasses.replace(cfg.universal, spaces=",".join(spaces)))
        check_spaces(manifest, spec.data, spaces)
        pair_draws(cfg, spaces)  # --pair-weights' mistakes, before Ray starts
        fingerprint = spaces_fingerprint(manifest, spaces, base_sha)
    else:
        check_pair(manifest, spec.data, cfg.src, cfg.dst)
        fingerprint = pair_fingerprint(manifest, cfg.src, cfg.dst)
    has_val = _check_data(cfg, spec.data, manifest)
    if cfg.loss.decoded_loss_weight:
        _check_decoder(cfg, spec, manifest)
    stats = train_stats(cfg, spec.data)
    record = _check_resume(cfg, spec, fingerprint)
    store = _store(spec)
    export = f"{_run_dir(spec)}/{EXPORT}"
    if record and record.get("finished"):
        print(f"[train] {spec.name} already finished at step {record['finished']}; nothing to do. Export: {export}")
        return Path(export) if _local(spec.out) else export

    def write_record(finished: int | None) -> None:  # the run's settings; `finished`: its last step, once done
        record = dict(config=cfg.to_dict(), data=spec.data, dataset_fingerprint=fingerprint, finished=finished)
        store.write_bytes(RUN_RECORD, json.dumps(record, indent=2).encode())

    write_record(None)
    print(f"[train] {_what(cfg)} on {spec.data}: {cfg.schedule.steps} steps, batch {cfg.data.batch} of "
          f"{cfg.data.crop}px crops, {cfg.resources.workers} worker(s){' on GPU' if cfg.resources.gpu else ''}; "
          f"run {_run_dir(spec)}"
          + (" (resuming)" if record else ""), flush=True)

    # Ray Train v2 otherwise also routes every worker print through a logger: each progress line twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from interposer.cluster import start_ray

    from .loop import WorkerJob, train_loop_per_worker

    started = start_ray(log_to_driver=True)
    try:
        if os.environ.get("RAY_ADDRESS"):  # a cluster: every node reaches the bucket, or one line names the node
            from interposer.pipeline.run import check_nodes

            vae = manifest.spaces[cfg.dst].vae if cfg.loss.decoded_loss_weight else None  # loaded on every rank
            check_nodes(ray, [(spec.data, "--data"), (spec.out, "--out")],
                        [(vae, f"the {cfg.dst} VAE of {spec.data}")] if vae and os.path.isabs(vae) else [])
        storage = absolute(spec.out)
        request = worker_request(cfg, int(ray.cluster_resources().get("CPU", 1)))
        cpus = int(request["CPU"])
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dict(job=WorkerJob(
                cfg, spec.data, fingerprint, threads=cpus, trust_remote_code=spec.trust_remote_code, stats=stats,
                has_val=has_val, started_at=begun, base=base,
                tensorboard=f"{_run_dir(spec)}/tensorboard" if _local(spec.out) else None)),
            scaling_config=ScalingConfig(num_workers=cfg.resources.workers, use_gpu=cfg.resources.gpu,
                                         resources_per_worker=request),
            run_config=RunConfig(name=spec.name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                                 # Ray Train's own lines (each checkpoint, each report, state-API retries every
                                 # second) stay in its log files; our progress and errors still print
                                 logging_config=LoggingConfig(log_level="ERROR")),
        )
        start = time.perf_counter()
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {spec.name} ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            primary, step = load_final(folder, cfg, _universal(cfg, stats, base) if cfg.is_universal else None)
            _export(primary, cfg, spec)
        write_record(step)
        resumed = int((result.metrics or {}).get("resumed_from", 0))
        print(f"[train] done: step {step} in {time.perf_counter() - start:.1f} s"
              + (f" (resumed from step {resumed})" if resumed else "") + f"; export: {export}")
        return Path(export) if _local(spec.out) else export
    finally:
        if started:
            ray.shutdown()


def _what(cfg: TrainConfig) -> str:
    """What the run trains, for its first line."""
    if not cfg.is_universal:
        return f"{cfg.src} -> {cfg.dst}"
    spaces, new = cfg.space_list(), cfg.universal.add_space
    if new:
        return (f"space {new} added to {cfg.universal.base} (its {2 * (len(spaces) - 1)} pairs with "
                f"{', '.join(c for c in spaces if c != new)}; the rest frozen)")
    return f"universal over {cfg.universal.spaces} ({len(spaces) * (len(spaces) - 1)} pairs)"


def _universal(cfg: TrainConfig, stats: dict, base: dict | None):
    from .universal import universal_network

    return universal_network(cfg, cfg.space_list(), stats, base)


def load_base(folder: str) -> tuple[dict, str]:
    """--from: a universal run or export folder, as ({"args", "state"} of its network, sha256 of its weights)."""
    from interposer import load_interposer
    from interposer.universal_model import UniversalInterposer
    from interposer.weights import WEIGHTS_NAME

    from .publish import find_export

    if "://" in folder:
        raise ValueError(f"--from {folder}: give a local run or export folder (copy it from object storage first)")
    try:
        export, _ = find_export(folder)
    except FileNotFoundError:
        raise ValueError(f"--from {folder}: neither a run folder (with {EXPORT}/) nor a model folder "
                         "(config.json + model.safetensors)") from None
    net = load_interposer(str(export))
    if not isinstance(net, UniversalInterposer):
        raise ValueError(f"--from {folder}: a {net.src} -> {net.dst} network; --add-space extends a universal "
                         "interposer (one trained with --universal)")
    sha = hashlib.sha256((export / WEIGHTS_NAME).read_bytes()).hexdigest()
    return dict(args=net.args(), state=net.state_dict()), "sha256:" + sha


def add_space_config(cfg: TrainConfig, base: dict, manifest, data: str) -> tuple[TrainConfig, list[str]]:
    """--add-space NEW: (cfg with the --from network's sizes, the run's spaces: NEW then every space of the
    dataset (or --spaces) the base network knows); refuses a NEW the base has, or a dataset without NEW or
    without a known space."""
    new, known = cfg.universal.add_space, list(base["args"]["adapters"])
    if new in known:
        raise ValueError(f"--add-space {new}: {cfg.universal.base} already converts {new} (its spaces: "
                         f"{', '.join(known)}); add a space it does not have")
    if new not in manifest.spaces:
        raise ValueError(f"--add-space {new}: --data {data} has no {new} latents (it has {', '.join(manifest.spaces)}); "
                         f"add them with `interposer data add-space --data {data} --space {new}`")
    given = cfg.space_list()
    if given and new not in given:
        raise ValueError(f"--spaces {cfg.universal.spaces}: leave out --spaces or name {new} in it")
    unknown = [c for c in given if c != new and c not in known]
    if unknown:
        raise ValueError(f"--spaces names {', '.join(unknown)}, not a space of {cfg.universal.base} "
                         f"({', '.join(known)}); the base network's spaces are frozen, not trained")
    others = [c for c in (given or manifest.spaces) if c != new and c in known]
    if not others:
        raise ValueError(f"--data {data} holds none of the spaces {cfg.universal.base} knows ({', '.join(known)}): "
                         f"a new space learns from pairs with a known one; build the dataset with one of them too")
    a = base["args"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ch_mid=a["ch_mid"], blocks=a["blocks"]),
                              universal=dataclasses.replace(cfg.universal, grid=a["grid"], emb=a["emb"]))
    return cfg, [new, *others]


def _export(primary, cfg: TrainConfig, spec: RunSpec) -> None:
    """RUNS/NAME/export/: our format (model.safetensors + config.json) and the released layout file."""
    with tempfile.TemporaryDirectory() as tmp:
        pair = () if cfg.is_universal else (cfg.src, cfg.dst)
        save_interposer(primary, tmp, *pair, version=spec.rev,
                        extra=dict(trained_steps=cfg.schedule.steps, data=spec.data,
                                   val_fraction=cfg.data.val_fraction, seed=cfg.seed))
        if is_v4(primary):  # the v4 architecture at v4's size: also the layout v4 loaders know
            save_released(primary, Path(tmp) / release_filename(cfg.src, cfg.dst, spec.rev))
        store = _store(spec)
        for p in sorted(Path(tmp).iterdir()):
            store.write_bytes(f"{EXPORT}/{p.name}", p.read_bytes())
