"""The function each Ray Train worker runs: load state (before DDP), step, report, checkpoint.

Rank 0 writes checkpoints, validation and TensorBoard; every rank calls ray.train.report the same number of
times and makes the same log/evaluate/checkpoint decision at every step (each one decides a collective).
The arithmetic is trainer.step's, shared with the bare loop in bench/train.py.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass

import torch

from .checkpoint import load_with_fallback, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import CropStream, PairReader, TileReader, TileStream, UniversalStream, step_seed
from .step import build_models, build_optim, train_step, validation_l1


def _decoder(cfg: TrainConfig, data: str, device, trust_remote_code: bool = False):
    """The frozen target-space decoder, for the optional decoded-space loss."""
    from interposer.spaces import get_space
    from interposer.vae import load_vae

    from interposer.pipeline.schema import read_manifest

    entry = read_manifest(data).spaces[cfg.dst]
    vae = load_vae(get_space(cfg.dst), entry.vae, entry.subfolder, torch.float32, device, trust_remote_code,
                   entry.code)
    return lambda z: vae.decode(z.unsqueeze(2) if get_space(cfg.dst).video else z).sample.squeeze(2) \
        if get_space(cfg.dst).video else vae.decode(z).sample


def _quiet_ray_train_reports() -> None:
    """Ray Train logs "Reporting training result ..." at INFO on every report, from a logger named by its module's
    file (so RunConfig's LoggingConfig, which sets the ray.train loggers, misses it): one more console line per
    progress line. Raise that logger to WARNING in this worker; nothing else of Ray's logging changes."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _is_local(checkpoint) -> bool:
    import pyarrow.fs as pafs

    return isinstance(checkpoint.filesystem, pafs.LocalFileSystem)


def _resume(cfg: TrainConfig, primary, secondary, optims: dict, stream: TileStream, rank: int) -> int:
    """Load Ray Train's latest checkpoint, if any, into the models, optimizers, this rank's data position and
    RNGs (before DDP wraps the models); returns the step to go on from (0 for a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        # the real checkpoint folder (local storage) has its siblings beside it, for the fallback
        where = checkpoint.path if _is_local(checkpoint) else folder
        state, _ = load_with_fallback(where, primary, secondary, optims, cfg.checkpoint.fallback_checkpoint)
    if "data" not in state:
        raise ValueError(f"checkpoint {checkpoint.path} was written by an older version (whole-dataset loader); "
                         "its data position cannot be carried over: train under a new --name")
    stream.load_state_dict(state["data"][rank])
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank])
    if rank == 0:
        print(f"[train] resuming from step {int(state['step'])}", flush=True)
    return int(state["step"])


class _Meter:
    """This rank's pace: steps/s since the last log line (everything between included: checkpoints,
    evaluation), and its start-up (from the command's start to its first step)."""

    def __init__(self, start: int, started_at: float | None):
        self.t0, self.last, self.started_at, self.first_step_s = time.perf_counter(), start, started_at, None

    def stepped(self) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.time() - (self.started_at or time.time())

    def rate(self, done: int) -> float:
        now = time.perf_counter()
        rate, self.t0, self.last = (done - self.last) / max(now - self.t0, 1e-9), now, done
        return rate


def _metrics(losses, optims: dict, done: int, start: int, rate: float, first_step_s: float, world: int) -> dict:
    """The log line's numbers: losses (the mean over ranks), lr, pace, and every rank's peak resident memory
    and start-up (MB, s). Collectives: every rank calls it at the same steps."""
    import torch.distributed as dist

    metrics = {f"loss_{k}": v for k, v in losses.parts.items()}
    metrics["loss"] = float(losses.total.detach())
    if world > 1:
        t = torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)
        dist.all_reduce(t)
        metrics = {k: v / world for k, v in zip(sorted(metrics), t.tolist())}
    metrics.update(step=done, lr=optims["primary"][1].get_last_lr()[0], resumed_from=start, steps_per_s=rate)
    mine = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, first_step_s]
    every = [mine] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    for r, (rss, first) in enumerate(every):
        metrics[f"peak_rss_mb/rank{r}"], metrics[f"first_step_s/rank{r}"] = rss, first
    return metrics


def _positions(stream: TileStream, world: int) -> tuple[list, list]:
    """(every rank's RNG states, every rank's data position), for a checkpoint: a collective."""
    import torch.distributed as dist

    if world == 1:
        return [rng_state()], [stream.state_dict()]
    rngs, cursors = [None] * world, [None] * world
    dist.all_gather_object(rngs, rng_state())
    dist.all_gather_object(cursors, stream.state_dict())
    return rngs, cursors


def _log(cfg: TrainConfig, metrics: dict, done: int, rate: float, preempted: bool, writer) -> None:
    """Rank 0's progress line and TensorBoard scalars."""
    eta = (cfg.schedule.steps - done) / max(rate, 1e-9)
    extra = f", val L1 {metrics['val_l1']:.4f}" if "val_l1" in metrics else ""
    notice = "  (preemption notice: checkpoint)" if preempted else ""
    print(f"[train] step {done}/{cfg.schedule.steps}  {rate:.2f} steps/s  loss {metrics['loss']:.4f}{extra}  "
          f"lr {metrics['lr']:.2e}  ETA {eta / 60:.1f} min{notice}", flush=True)
    if writer is not None:
        for k, v in metrics.items():
            if k != "step":
                writer.add_scalar(k, v, done)
        writer.flush()


def _report_checkpoint(metrics: dict, models: tuple, optims: dict, done: int, positions: tuple, cfg: TrainConfig,
                       fingerprint: str, last: bool) -> None:
    """Rank 0: write a checkpoint and report it. A routine one uploads on Ray Train's thread while training goes
    on (to S3 it is seconds of round trips); the last one, and one made on a preemption notice, are in storage
    before we go on."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    rngs, cursors = positions
    folder = tempfile.mkdtemp(prefix="interposer-checkpoint-")  # Ray Train removes it once uploaded
    save_checkpoint(folder, *models, optims, done, cursors, rngs, cfg.to_dict(), fingerprint)
    upload = CheckpointUploadMode.SYNC if last else CheckpointUploadMode.ASYNC
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_upload_mode=upload,
                     delete_local_checkpoint_after_upload=True)


@dataclass(frozen=True)
class WorkerJob:
    """What the driver tells every training worker (Ray hands it over pickled, in train_loop_config["job"])."""

    cfg: TrainConfig
    data: str  # the dataset: an absolute folder or a URI
    fingerprint: str  # what the pair's latents depend on (driver.pair_fingerprint), kept in every checkpoint
    threads: int = 1  # torch threads: the CPUs Ray gave the worker
    trust_remote_code: bool = False  # a decoded loss may load a target VAE that runs its own code
    stats: dict | None = None  # per-channel latent statistics the shuffle network normalises with
    has_val: bool = True  # whether the validation split holds an image (decided once, by the driver)
    started_at: float | None = None  # the command's start (time.time()): each rank reports its time to a first step
    tensorboard: str | None = None  # rank 0's TensorBoard folder; None: none (runs in object storage)
    base: dict | None = None  # universal --add-space: the --from network's constructor args and state dict


class _PairTask:
    """A pairwise run on one rank: primary src -> dst and its dst -> src partner, their optimizers, the stream."""

    def __init__(self, job: WorkerJob, rank: int, world: int, device):
        cfg = self.cfg = job.cfg
        self.device = device
        self.reader = PairReader(job.data, cfg.src, cfg.dst, cfg.data.val_fraction)
        self.stream = CropStream(self.reader, cfg.data.crop, cfg.data.batch, cfg.seed, rank, world)
        self.primary, self.secondary = build_models(cfg, job.stats)
        self.optims = {"primary": build_optim(cfg, self.primary)}
        if cfg.uses_secondary:
            self.optims["secondary"] = build_optim(cfg, self.secondary)
        self.decoder = _decoder(cfg, job.data, device, job.trust_remote_code) if cfg.loss.decoded_loss_weight else None

    def checkpointed(self) -> tuple:
        """(primary, secondary) as a checkpoint holds them (unwrapped from DDP)."""
        unwrap = lambda m: getattr(m, "module", m)  # noqa: E731
        return unwrap(self.primary), unwrap(self.secondary)

    def prepare(self, on_device) -> None:
        """After the resume: onto the device, DDP-wrapped where there are several ranks."""
        self.primary = on_device(self.primary)
        self.secondary = on_device(self.secondary) if self.cfg.uses_secondary else self.secondary.to(self.device)

    def load_val(self, tiles: int) -> None:  # the first `tiles` validation tiles, and only their row groups
        val = self.reader.take("val", tiles)
        self.val = torch.from_numpy(val.src), torch.from_numpy(val.dst)

    def step(self, step: int):
        return train_step(self.cfg, self.primary, self.secondary, list(self.optims.values()), *self.stream.next(step),
                          self.device, self.decoder, step)

    def validate(self) -> dict[str, float]:
        return {"val_l1": validation_l1(self.checkpointed()[0], *self.val, self.device)}


class _UniversalTask:
    """A universal run on one rank: the one network over every pair of its spaces, its optimizer, the stream."""

    def __init__(self, job: WorkerJob, rank: int, world: int, device):
        from .universal import PairsForward, pair_draws, universal_network

        cfg = self.cfg = job.cfg
        self.device = device
        spaces = cfg.space_list()  # the driver filled it in
        self.pairs, weights = pair_draws(cfg, spaces)
        self.reader = TileReader(job.data, spaces, cfg.data.val_fraction)
        self.stream = UniversalStream(self.reader, self.pairs, weights, cfg.data.crop, cfg.universal.grid,
                                      cfg.data.batch, cfg.seed, rank, world)
        self.net = universal_network(cfg, spaces, job.stats or {}, job.base)
        self.model = PairsForward(self.net)
        self.optims = {"primary": build_optim(cfg, self.net)}

    def checkpointed(self) -> tuple:
        return self.net, None

    def prepare(self, on_device) -> None:
        self.model = on_device(self.model)

    def load_val(self, tiles: int) -> None:
        self.val = {c: torch.from_numpy(x) for c, x in zip(self.reader.spaces, self.reader.take_all("val", tiles))}

    def step(self, step: int):
        from .universal import universal_step

        return universal_step(self.cfg, self.model, list(self.optims.values()), self.stream.next(step), self.device)

    def validate(self) -> dict[str, float]:
        from .universal import validate_pairs

        return validate_pairs(self.net, self.val, self.pairs, self.device)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from interposer.pipeline.schema import read_manifest, register_manifest_spaces

    _quiet_ray_train_reports()
    job: WorkerJob = config["job"]
    register_manifest_spaces(read_manifest(job.data))  # this worker process: the dataset's own spaces
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.gpu else torch.device("cpu")
    torch.set_num_threads(job.threads)

    task = (_UniversalTask if cfg.is_universal else _PairTask)(job, rank, world, device)  # this rank's share, streamed
    start = _resume(cfg, *task.checkpointed(), task.optims, task.stream, rank)  # before wrapping in DDP
    # the universal network's adapters for spaces a rank did not draw take no part in its step
    ddp = dict(parallel_strategy_kwargs=dict(find_unused_parameters=True)) if cfg.is_universal else {}
    task.prepare(lambda m: ray.train.torch.prepare_model(m, move_to_device=device, **ddp) if world > 1
                 else m.to(device))

    # whether a step evaluates must be decided the same on every rank: it decides a collective below
    has_val = job.has_val
    if rank == 0 and has_val:
        task.load_val(cfg.log.eval_tiles)
    writer = None
    if rank == 0 and job.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(job.tensorboard, purge_step=start)

    meter = _Meter(start, job.started_at)
    for step in range(start, cfg.schedule.steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank, 2))  # dropout: a function of (seed, step, rank)
        losses = task.step(step)
        done = step + 1
        meter.stepped()

        preempted = False
        if world > 1 and done % cfg.checkpoint.preemption_check_every == 0:
            preempted = ray.train.get_preemption_info() is not None  # a barrier: every rank asks
        save = done % cfg.checkpoint.checkpoint_every == 0 or done == cfg.schedule.steps or preempted
        log = done % cfg.log.log_every == 0 or save
        evaluate = (done % cfg.log.eval_every == 0 or done == cfg.schedule.steps) and has_val  # the same on every rank
        if not (log or evaluate):
            continue

        rate = meter.rate(done)
        metrics = _metrics(losses, task.optims, done, start, rate, meter.first_step_s, world)
        if evaluate and rank == 0:
            metrics.update(task.validate())
        positions = _positions(task.stream, world) if save else None
        if rank == 0:
            _log(cfg, metrics, done, rate, preempted, writer)
        if save and rank == 0:
            _report_checkpoint(metrics, task.checkpointed(), task.optims, done, positions, cfg,
                               job.fingerprint, last=done == cfg.schedule.steps or preempted)
        else:
            ray.train.report(metrics)
    task.stream.close()
    if writer is not None:
        writer.close()
