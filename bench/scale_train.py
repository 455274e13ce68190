"""Training at scale, measured on synthetic data: per-worker memory, step rate and start-up against the
number of tiles, and the streaming loader against the whole-dataset-in-memory loader it replaced.

    python bench/scale_train.py                        # 2k, 8k, 32k tiles of 4x64x64 latents, 2 workers
    python bench/scale_train.py --tiles 2000 8000 --steps 40

Datasets are written straight in the pipeline's format (pipeline.standins.write_synthetic_dataset: random
xl and v1 latents, 6 tiles per image, 64 images per shard; no VAE). For each size, `interposer train` runs
as users run it (Ray Train, --workers, 1 CPU and 1 torch thread each; by default a network lighter than v4,
so that the loader's share of a step is larger and the comparison stricter) and every worker reports its
own peak RSS (getrusage) and its start-up (from the command's start to its first step) to TensorBoard; steps/s is the
median over log windows after the first. Then, in this process and on the smallest set, the same step
function alternates windows fed by the streaming loader and by an in-memory loader (the previous
trainer/data.py, kept here as the baseline): the ratio is their rate, side by side.
Goals (issue 12): peak RSS at the largest N <= 1.1 x at the smallest + 100 MB; steps/s within 10% across N;
streaming >= 0.9 of in-memory; start-up flat in N.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interposer.cluster import start_ray  # noqa: E402
from interposer.pipeline.standins import write_synthetic_dataset  # noqa: E402
from interposer.trainer.config import TrainConfig  # noqa: E402
from interposer.trainer.data import CropStream, PairReader, step_seed  # noqa: E402
from interposer.trainer.driver import RunSpec, train  # noqa: E402
from interposer.trainer.step import build_models, build_optim, train_step  # noqa: E402

TILES_PER_IMAGE, SHARD_IMAGES = 6, 64


class InMemorySampler:
    """The loader this replaces: every tile of the train split in memory (np.stack of all shards), a
    randperm of all N per step, crops as the stream draws them."""

    def __init__(self, reader: PairReader, crop: int, batch: int, seed: int):
        tiles = reader.take("train")
        self.src, self.dst = torch.from_numpy(tiles.src), torch.from_numpy(tiles.dst)
        self.crop, self.batch, self.seed, self.n = crop, batch, seed, len(tiles)
        self.per_epoch = max(1, self.n // batch)

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
        idx = torch.randperm(self.n, generator=g)[pos * self.batch : (pos + 1) * self.batch]
        g = torch.Generator().manual_seed(step_seed(self.seed, step, 0, 1))
        c, side = self.crop, self.src.shape[-1]
        ys = torch.randint(side - c + 1, (len(idx),), generator=g).tolist()
        xs = torch.randint(side - c + 1, (len(idx),), generator=g).tolist()
        src = torch.stack([self.src[i, :, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs)])
        dst = torch.stack([self.dst[i, :, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs)])
        return src.float(), dst.float()


def run_ray(data: Path, runs: Path, name: str, args) -> dict:
    """One `interposer train` run; what its workers logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig.of(src="xl", dst="v1", steps=args.steps, batch=args.batch, crop=args.crop, ch_mid=args.width,
                      blocks=args.blocks, fconst=10**9, val_fraction=0.02, eval_every=10**9, eval_tiles=16,
                      log_every=args.window, checkpoint_every=args.steps, workers=args.workers, cpus_per_worker=1)
    start = time.perf_counter()
    train(cfg, RunSpec(str(data), str(runs), name))
    wall = time.perf_counter() - start
    board = EventAccumulator(str(runs / name / "tensorboard"))
    board.Reload()
    scalar = lambda tag: [e.value for e in board.Scalars(tag)]  # noqa: E731
    return dict(rate=statistics.median(scalar("steps_per_s")[1:]), wall=wall,
                rss=[max(scalar(f"peak_rss_mb/rank{r}")) for r in range(args.workers)],
                first=[scalar(f"first_step_s/rank{r}")[0] for r in range(args.workers)])


def loaders_side_by_side(data: Path, args) -> tuple[float, float]:
    """(streaming, in-memory) steps/s of the bare step in this process, windows alternating."""
    torch.set_num_threads(1)
    cfg = TrainConfig.of(src="xl", dst="v1", steps=10**6, batch=args.batch // args.workers, crop=args.crop,
                      ch_mid=args.width, blocks=args.blocks, fconst=10**9)
    reader = PairReader(str(data), "xl", "v1", 0.02)
    loaders = {"stream": CropStream(reader, cfg.data.crop, cfg.data.batch, 0, 0, 1),
               "memory": InMemorySampler(reader, cfg.data.crop, cfg.data.batch, 0)}
    primary, secondary = build_models(cfg)
    optims = [build_optim(cfg, primary)]
    cpu = torch.device("cpu")
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    step = 0
    for r in range(args.rounds + 1):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in range(args.window):
                train_step(cfg, primary, secondary, optims, *loader.next(step), cpu, step=step)
                step += 1
            if r:  # the first round warms up
                rates[name].append(args.window / (time.perf_counter() - start))
    loaders["stream"].close()
    return statistics.median(rates["stream"]), statistics.median(rates["memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[2000, 8000, 32000], help="dataset sizes in tiles")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--steps", type=int, default=120, help="steps per run (default 120)")
    parser.add_argument("--window", type=int, default=20, help="steps per log window (default 20)")
    parser.add_argument("--size-rounds", type=int, default=2, help="runs of each N, up and down the sizes (2)")
    parser.add_argument("--batch", type=int, default=16, help="global batch of crops (default 16)")
    parser.add_argument("--crop", type=int, default=32, help="crop side (default 32)")
    parser.add_argument("--width", type=int, default=32, help="network width (default 32; v4 is 64)")
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks (default 4; v4 is 12)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the loader comparison")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-scale-train-"))
    try:
        sets, runs = {}, {n: [] for n in args.tiles}
        for n in args.tiles:
            images = math.ceil(n / TILES_PER_IMAGE)
            start = time.perf_counter()
            sets[n] = write_synthetic_dataset(work / f"data-{n}", images, TILES_PER_IMAGE, SHARD_IMAGES, seed=n)
            gib = n * 2 * 4 * 64 * 64 * 2 / 2**30
            print(f"N={n:6d} tiles: {images} images, {math.ceil(images / SHARD_IMAGES)} shards, {gib:.2f} GiB of "
                  f"latents, written in {time.perf_counter() - start:.1f} s", flush=True)
        # rounds go up and down the sizes (2k 8k 32k 32k 8k 2k ...), so a slow minute of this shared machine
        # does not land on one N only
        order = [n for r in range(args.size_rounds) for n in (args.tiles if r % 2 == 0 else args.tiles[::-1])]
        for i, n in enumerate(order):
            start_ray()
            got = run_ray(sets[n], work / "runs", f"n{n}-{i}", args)
            ray.shutdown()
            runs[n].append(got)
            print(f"N={n:6d} run {len(runs[n])}: peak RSS per worker {', '.join(f'{m:.0f}' for m in got['rss'])} MB, "
                  f"{got['rate']:.2f} steps/s, first step after {', '.join(f'{f:.1f}' for f in got['first'])} s, "
                  f"whole run {got['wall']:.1f} s", flush=True)
            shutil.rmtree(work / "runs", ignore_errors=True)
        rows = [(n, dict(rss=[max(r["rss"][w] for r in runs[n]) for w in range(args.workers)],
                         rate=statistics.mean(r["rate"] for r in runs[n]),
                         first=[statistics.mean(r["first"][w] for r in runs[n]) for w in range(args.workers)]))
                for n in args.tiles]
        stream, memory = loaders_side_by_side(sets[min(sets)], args)

        small, large = rows[0][1], rows[-1][1]
        rates = [g["rate"] for _, g in rows]
        print(f"machine      {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"ray {ray.__version__}")
        print(f"workload     {args.workers} workers x 1 thread, network {args.width} wide x {args.blocks} blocks, "
              f"batch {args.batch} of {args.crop}x{args.crop} crops, {args.steps} steps, fp32 CPU, "
              f"{args.size_rounds} runs of each N (RSS: the larger; steps/s and start-up: the mean)")
        limit = 1.1 * max(small["rss"]) + 100
        print(f"memory       peak RSS at N={rows[-1][0]}: {max(large['rss']):.0f} MB vs {max(small['rss']):.0f} MB "
              f"at N={rows[0][0]} (goal <= {limit:.0f}): {'met' if max(large['rss']) <= limit else 'NOT met'}")
        spread = max(rates) / min(rates) - 1
        print(f"steps/s      {', '.join(f'{r:.2f}' for r in rates)} across N: spread {spread:.1%} "
              f"(goal <= 10%): {'met' if spread <= 0.10 else 'NOT met'}")
        verdict = "met" if stream >= 0.9 * memory else "NOT met"
        print(f"loader       streaming {stream:.2f} vs in-memory {memory:.2f} steps/s, one process, windows "
              f"alternating: ratio {stream / memory:.3f} (goal >= 0.9): {verdict}")
        firsts = [max(g["first"]) for _, g in rows]
        print(f"start-up     first step after {', '.join(f'{f:.1f}' for f in firsts)} s across N (flat goal)")
        held = 2 * SHARD_IMAGES * TILES_PER_IMAGE * 2 * 4 * 64 * 64 * 2 / 2**20
        print(f"on paper     a worker holds at most 2 units (one being read): {held:.0f} MB of latents here; the "
              f"in-memory loader held all N: {rows[-1][0] * 2 * 4 * 64 * 64 * 2 / 2**20:.0f} MB at N={rows[-1][0]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
