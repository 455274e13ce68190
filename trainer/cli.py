"""`interposer train` (and `python -m trainer`): train an interposer for a pair of spaces in a dataset.

    interposer train --data data/xl-v1 --src xl --dst v1 --out runs --name xl-v1 --steps 2000 --batch 32
    interposer train --data data/v1-xl --src v1 --dst xl --config v1-to-xl.yaml --out runs --name v1-xl
    interposer train ... --gpu --workers 8 --out s3://bucket/runs      # on a Ray cluster (RAY_ADDRESS)

Rerun the same command to resume from the latest checkpoint. A city96 v4 YAML file works as --config.
"""

from __future__ import annotations


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train an interposer on a dataset with Ray Train (DDP; resumable)",
        description="Train a src -> dst interposer (and its dst -> src partner) on a dataset built by "
        "`interposer data build`, with Ray Train. Flags override --config; defaults are the v4.0 xl -> v1 "
        "recipe. Rerunning the same command resumes from the latest checkpoint.")
    p.add_argument("--data", required=True, help="dataset folder or URI holding both spaces")
    p.add_argument("--src", required=True, help="source latent space (e.g. xl)")
    p.add_argument("--dst", required=True, help="target latent space (e.g. v1)")
    p.add_argument("--out", required=True, help="runs folder or URI (s3://...); the run lives in OUT/NAME")
    p.add_argument("--name", required=True, help="run name: rerun with the same name to resume")
    p.add_argument("--config", default=None, help="YAML config (ours, or a city96 v4 file)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50000)")
    p.add_argument("--batch", type=int, default=None, help="global batch of crops (default 128)")
    p.add_argument("--crop", type=int, default=None, help="crop side in source latent pixels (default 32)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers / DDP ranks (default 1)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, bf16 autocast")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 1000)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation L1 (default 1000)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker failures recovered from the latest checkpoint by Ray Train (default 3; -1: always)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (default 0)")
    p.add_argument("--rev", default="v5.0", help="version in the exported released-layout file name (default v5.0)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .config import load_config
    from .driver import RunSpec, train

    cfg = load_config(args.config, src=args.src, dst=args.dst, steps=args.steps, batch=args.batch, crop=args.crop,
                      workers=args.workers, gpu=args.gpu, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, max_failures=args.max_failures, seed=args.seed)
    train(cfg, RunSpec(data=args.data, out=args.out, name=args.name, rev=args.rev))
    return 0


def register(sub) -> None:
    _add_train(sub)


def main(argv: list[str] | None = None) -> int:
    from interposer.cli import run_parser

    return run_parser("python -m trainer", "Train interposers with Ray Train.", [_add_train], argv)
