"""Running shards on Ray: starting or joining Ray, deciding where the encoders run (and waiting for an
autoscaler's GPUs), and mapping `ShardWorker` over shard numbers with Ray Data. The only pipeline module
besides index.py that touches Ray.

The driver sends shard numbers and gets back one row of counts per finished shard; latents never pass
through it. Shards are handed out in order, one at a time per encoder actor, so a killed build loses at
most one shard per actor and the first shard is on disk one shard-time after the encoders are up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from interposer.cluster import start_ray

from .options import DECODE_THREADS

# What an encoder actor asks Ray for (cluster.yaml's encode_gpu node type is sized to fit; a test checks it).
ENCODER_CPUS = 1.0  # the actor's own thread: feeding the GPU, writing the shard's files


def ray_for_data():
    """(ray, started): Ray up, with Ray Data's own progress bars off (the build prints its own)."""
    import ray
    from ray.data.context import ShuffleStrategy

    started = start_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "execution finished" INFO lines, one per stage
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a worker's StoreWriteError reaches the driver as itself (unwrap)
    # the index's groupby: sort-based shuffle runs as tasks; the default hash shuffle starts aggregator actors,
    # a fixed ~6 s that a small build feels (measured: 4k files indexed in 0.5 s warm vs 9 s)
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ray, started


def on_cluster() -> bool:
    """True when the build runs against a Ray cluster (RAY_ADDRESS, as `ray job submit` sets it), where GPU
    nodes may still be coming; False for Ray on this machine."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _check_here(uris: list[tuple[str, str]], paths: list[tuple[str, str]], driver_has: list[str]) -> str | None:
    """On one node: the first URI or local path this node cannot use, as its one-line error (None: all fine)."""
    import ray

    from .objectstore import bucket_info, explain

    node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
    for path, what in paths:
        if not os.path.exists(path):
            return (f"{what}: {path} is not on node {node} (a local path must be on every node): put it there at the "
                    "same path (cluster.yaml's file_mounts), or give a Hub repo id")
    for uri, flag in uris:
        try:
            bucket_info(uri, flag)
        except OSError as e:
            known = explain(e, uri, flag, node)
            missing = [k for k in driver_has if not os.environ.get(k)]
            line = str(known or f"{flag} {uri} on node {node}: {e}")
            if missing:
                line += f" (this node has no {', '.join(missing)}; the command that sent the work has)"
            return line
    return None


def check_nodes(ray, uris: list[tuple[str, str]], paths: list[tuple[str, str]] = ()) -> None:
    """On a cluster: every node that is up can reach each object-store URI and sees each local path (a node's
    workers have the node's environment and disk, not the driver's: a node without the S3 settings, or without
    a VAE folder, fails here in one line naming it, instead of deep inside a retried task). One tiny task per
    node; nodes that join later meet the same errors in their work."""
    from .objectstore import is_remote

    uris = [(u, f) for u, f in uris if is_remote(u)]
    paths = [(p, w) for p, w in paths if p and "://" not in p and os.path.isabs(p)]
    if not uris and not paths:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    has = [k for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if os.environ.get(k)]
    probe = ray.remote(num_cpus=0, max_retries=0)(_check_here)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(uris, paths, has)
            for n in nodes]
    for problem in ray.get(refs):
        if problem:
            raise NodeSettingsError(problem)


class NodeSettingsError(ConnectionError):
    """A node of the cluster cannot reach what the command uses (one line, exit 1)."""


class ClusterUnavailable(OSError):
    """The cluster did not provide what the build needs in time (a machine fault: exit 1, one line)."""


@dataclass(frozen=True)
class EncoderPlan:
    """Where and how wide the encoders run."""

    gpus: float  # GPUs per encoder actor (0: CPU)
    cpus: float  # CPUs per encoder actor
    min_workers: int  # actors at start
    max_workers: int | None  # actors at most (None: as many as the autoscaler provides)
    threads: int  # torch threads per actor
    decode_threads: int  # image decode threads per actor
    wait_for_gpus: bool  # the cluster has no GPU yet: ask the autoscaler and wait

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def bundles(self) -> list[dict[str, float]]:
        """What to ask the autoscaler for: one bundle per encoder actor."""
        return [{"CPU": self.cpus, "GPU": self.gpus}] * max(1, self.min_workers)

    def describe(self) -> str:
        n = f"{self.min_workers}" if self.max_workers == self.min_workers else \
            f"{self.min_workers}..{self.max_workers or 'autoscaled'}"
        return f"{n} encoder(s), {self.gpus:g} GPU + {self.cpus:g} CPU each"


def plan_encoders(workers: int, gpus_per_worker: float, cluster: dict[str, float], cluster_mode: bool,
                  decode_threads: int = DECODE_THREADS) -> EncoderPlan:
    """The encoder actors for this cluster. `cluster` is ray.cluster_resources() now.

    gpus_per_worker -1 (auto): GPU actors when the cluster has GPUs or is a cluster (its GPU workers may be
    scaling up from zero: wait for them); CPU when local Ray on this machine has no GPU."""
    gpus_now, cpus_now = float(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
    per = gpus_per_worker if gpus_per_worker >= 0 else (1.0 if gpus_now or cluster_mode else 0.0)
    if per == 0:
        n = workers or 1
        cpus = max(1, cpus_now // n)  # torch's threads in each actor use the CPUs Ray reserved for it
        return EncoderPlan(gpus=0.0, cpus=float(cpus), min_workers=n, max_workers=n, threads=cpus, decode_threads=1,
                           wait_for_gpus=False)
    if gpus_now == 0 and not cluster_mode:
        raise ValueError(f"--gpus-per-worker {per:g}: this machine has no GPU Ray can use; "
                         "pass --gpus-per-worker 0 to encode on CPU")
    cpus = ENCODER_CPUS + decode_threads
    if workers:
        return EncoderPlan(gpus=per, cpus=cpus, min_workers=workers, max_workers=workers, threads=1,
                           decode_threads=decode_threads, wait_for_gpus=gpus_now < per * workers and cluster_mode)
    if cluster_mode:  # one per GPU as GPU nodes join: Ray Data grows the pool, the autoscaler adds nodes
        return EncoderPlan(gpus=per, cpus=cpus, min_workers=1, max_workers=None, threads=1,
                           decode_threads=decode_threads, wait_for_gpus=gpus_now < per)
    n = max(1, int(gpus_now / per))
    return EncoderPlan(gpus=per, cpus=cpus, min_workers=n, max_workers=n, threads=1, decode_threads=decode_threads,
                       wait_for_gpus=False)


def wait_for_gpus(ray, plan: EncoderPlan, timeout: float, say: Callable[[str], None], poll: float = 5.0) -> None:
    """Ask the autoscaler for the encoders' GPUs and wait until the first actor's worth has joined."""
    from ray.autoscaler.sdk import request_resources

    need = plan.gpus * max(1, plan.min_workers if plan.max_workers == plan.min_workers else 1)
    if ray.cluster_resources().get("GPU", 0) >= need:
        return
    request_resources(bundles=plan.bundles())
    say(f"the cluster has no free GPU yet: asked the autoscaler for {len(plan.bundles())} x {plan.bundles()[0]}; "
        f"waiting up to {timeout:.0f} s (--gpu-wait; --gpus-per-worker 0 encodes on CPU)")
    start = last = time.monotonic()
    while ray.cluster_resources().get("GPU", 0) < need:
        now = time.monotonic()
        if now - start >= timeout:
            request_resources(bundles=[])  # withdraw the standing request
            raise ClusterUnavailable(
                f"no GPU joined the Ray cluster within {timeout:.0f} s (asked for {need:g}); check the cluster's GPU "
                "node types, quotas and spot capacity, raise --gpu-wait, or pass --gpus-per-worker 0 to encode on CPU")
        if now - last >= 60:
            say(f"still waiting for GPUs ({now - start:.0f} s)")
            last = now
        time.sleep(min(poll, max(0.0, timeout - (now - start))))
    say(f"{ray.cluster_resources().get('GPU', 0):g} GPU(s) in the cluster after {time.monotonic() - start:.0f} s")


def unwrap(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError, Ray Data's UserCodeException)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    return error


def user_error(error: BaseException) -> BaseException | None:
    """A worker's OSError or ValueError (a full disk, a bad listing file: one line for the user) out of Ray's
    wrappers and detached from their frames; None for anything else (a bug: its traceback is shown).

    Raise it outside the `except` block: a traceback that reaches Ray Data's frames keeps its actors, and
    the CPUs they hold, alive for as long as anyone holds the exception."""
    inner = unwrap(error)
    if inner is error or not isinstance(inner, (OSError, ValueError)):
        return None
    inner.__cause__ = inner.__context__ = None
    return inner.with_traceback(None)


def run_shards(ray, todo: list[int], plan: EncoderPlan, worker: type, worker_kwargs: dict
               ) -> Iterator[tuple[int, dict, tuple]]:
    """Map `worker` (a pipeline.shards.ShardWorker class) over `todo` (in order); yield (shard, its counts,
    (began, ended) wall-clock times) as each shard's files land."""
    if not todo:
        return
    strategy = ray.data.ActorPoolStrategy(min_size=plan.min_workers, max_size=plan.max_workers,
                                          max_tasks_in_flight_per_actor=1)
    # one shard per block: a shard is handed out as soon as an actor is free, and reported as soon as it lands
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(worker, batch_size=1, compute=strategy, num_gpus=plan.gpus or None, num_cpus=plan.cpus,
                        fn_constructor_kwargs=dict(worker_kwargs, device=plan.device, threads=plan.threads,
                                                   decode_threads=plan.decode_threads))
    try:
        for row in ds.iter_rows():
            if row["error_kind"]:
                raise _error(row["error_kind"], row["error"])
            yield int(row["shard"]), json.loads(row["summary"]), (float(row["began"]), float(row["ended"]))
    finally:
        _stop_now(ds)


def _stop_now(ds) -> None:
    """Release a dataset's actors now. A run stopped early (an error row, the caller's exception) keeps its
    actors, and the CPUs/GPUs they hold, until Ray Data's executor is shut down, which otherwise waits for garbage
    collection. Ray Data has no public call for this (Ray 2.60): the executor is its private `_current_executor`,
    reached here and nowhere else; on a Ray without it, garbage collection does it later."""
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        executor.shutdown(force=True)


def _error(kind: str, message: str) -> Exception:
    """The exception a ShardWorker reported as data (see ShardWorker.__call__): its class by name, else OSError."""
    from .store import StoreWriteError

    return {"StoreWriteError": StoreWriteError, "FileNotFoundError": FileNotFoundError}.get(kind, OSError)(message)
