"""Samples/s through Ray Train (1 worker) vs a bare single-process loop of the same step and batch.

    python bench/train.py                     # v4 network (64 wide, 12 blocks), batch 32 of 32x32 crops, CPU
    python bench/train.py --batch 128 --steps 40

Both run trainer.step.train_step on the same sampler, batch and torch threads: the bare loop in this
process, Ray Train as `interposer train` runs it (1 worker). Each side's rate is the median over windows of
--window steps after the first; for Ray Train these are the steps_per_s it logs (everything in the worker
between two log lines), so actor start-up and data loading, which do not grow with a run, are left out.
Rounds alternate the two and the ratio is the median of the rounds' own ratios. The dataset is written
directly in the pipeline's format with random latents (training speed does not depend on what they hold).
"""

from __future__ import annotations

import argparse
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
from interposer.trainer.data import CropStream, PairReader  # noqa: E402
from interposer.trainer.driver import RunSpec, train  # noqa: E402
from interposer.trainer.step import build_models, build_optim, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch of crops (default 32)")
    parser.add_argument("--crop", type=int, default=32, help="crop side in latent pixels (default 32)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--window", type=int, default=5, help="steps per timed window (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of bare loop then Ray Train (default 2)")
    args = parser.parse_args()
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = work / "data"
        write_synthetic_dataset(data, images=256, tiles_per_image=1, shard_size=256)  # 4x64x64 xl and v1
        cpus = os.cpu_count() or 1
        base = dict(src="xl", dst="v1", batch=args.batch, crop=args.crop, fconst=10**9, val_fraction=0.0,
                    eval_every=10**9, log_every=10**9, workers=1, cpus_per_worker=cpus)

        # the bare loop: the same step function, sampler and batch, in this process
        torch.set_num_threads(cpus)
        cfg = TrainConfig.of(**base, steps=args.steps, checkpoint_every=args.steps)
        sampler = CropStream(PairReader(str(data), "xl", "v1", 0.0), cfg.data.crop, cfg.data.batch, cfg.seed, 0, 1)
        primary, secondary = build_models(cfg)
        optims = [build_optim(cfg, primary)]
        device = torch.device("cpu")
        train_step(cfg, primary, secondary, optims, *sampler.next(0), device)  # warm-up

        # Rounds alternate the bare loop and Ray Train, so a slow minute of this shared machine hits both; Ray
        # runs only during its turn. Each side's rate is the median over windows of --window steps after the
        # first window (warm-up): Ray Train's windows are the steps_per_s it logs to TensorBoard, which count
        # everything in the worker between two log lines; start-up (actors, data loading) is left out.
        windows = args.steps // args.window
        bare, ray_rates, walls = [], [], []
        for r in range(args.repeats):
            rates = []
            for w in range(windows):
                start = time.perf_counter()
                for step in range(w * args.window, (w + 1) * args.window):
                    train_step(cfg, primary, secondary, optims, *sampler.next(step), device, step=step)
                rates.append(args.window / (time.perf_counter() - start))
            bare.append(statistics.median(rates[1:]) * args.batch)

            start_ray()  # as `interposer train` starts it
            run_cfg = TrainConfig.of(**base | dict(log_every=args.window), steps=args.steps,
                                     checkpoint_every=args.steps)
            start = time.perf_counter()
            train(run_cfg, RunSpec(str(data), str(work / "runs"), f"r{r}"))
            walls.append(time.perf_counter() - start)
            ray.shutdown()
            board = EventAccumulator(str(work / "runs" / f"r{r}" / "tensorboard"))
            board.Reload()
            logged = [e.value for e in board.Scalars("steps_per_s")]
            assert len(logged) == windows, (len(logged), windows)
            ray_rates.append(statistics.median(logged[1:]) * args.batch)
            print(f"round {r + 1}/{args.repeats}: bare {bare[-1]:.1f} samples/s, Ray Train {ray_rates[-1]:.1f} "
                  f"({ray_rates[-1] / bare[-1]:.3f}; its whole run {walls[-1]:.1f} s with start-up)", flush=True)

        ratios = [t / b for t, b in zip(ray_rates, bare)]
        print(f"machine     {platform.machine()}, {cpus} CPU cores, torch {torch.__version__}, ray {ray.__version__}")
        print(f"workload    v4 network xl->v1 (p loss), batch {args.batch} of {args.crop}x{args.crop} crops, fp32 CPU, "
              f"{cpus} threads; {args.steps} steps in windows of {args.window}, {args.repeats} rounds")
        print(f"bare loop   {max(bare):8.1f} samples/s   (best round)")
        print(f"Ray Train   {max(ray_rates):8.1f} samples/s   (1 worker; best round)")
        print(f"ratio       {statistics.median(ratios):8.3f}   (goal >= 0.95; median of the rounds' own ratios: "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
