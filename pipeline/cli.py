"""`interposer data ...` (and `python -m interposer.pipeline ...`): build, grow and inspect latent datasets.

    interposer data build --images photos/ more.txt s3://bucket/imgs/ --space v1 --space xl --out data/v1-xl
    interposer data build --images photos/ --space v1=cache/my-vae --space xl=madebyollin/sdxl-vae-fp16-fix \\
        --out s3://bucket/datasets/v1-xl --workers 8          # on a cluster: RAY_ADDRESS=... or `ray job submit`
    interposer data add-space --data data/v1-xl --space fx
    interposer data inspect data/v1-xl

Ray is imported only when a command runs, so `interposer --help` stays fast and `interposer` stays light.
"""

from __future__ import annotations

import json


def _add_build(sub) -> None:
    from .options import BuildConfig
    from interposer.settings import add_flags

    p = sub.add_parser(
        "build", help="encode image tiles with several VAEs into an aligned Parquet dataset",
        description="Read images, cut up to --max-tiles tiles of --tile-size px from each, encode every tile with "
        "each --space's VAE (Ray Data; GPUs when the cluster has them) and write Parquet shards plus "
        "manifest.json to --out. Rerunning the same command finishes what is missing.")
    p.add_argument("--images", nargs="+", required=True, metavar="SRC",
                   help="image sources: folders (recursive), globs, listing files (.txt one per line, .csv/.parquet "
                   "with a uri column), s3:// or gs:// prefixes")
    p.add_argument("--space", action="append", required=True, metavar="CODE[=VAE]",
                   help="a latent space to encode, repeatable; VAE overrides the registry's default: a local diffusers "
                   "folder, a Hub repo id with an optional :subfolder (e.g. xl=madebyollin/sdxl-vae-fp16-fix), or a "
                   "single-file .safetensors checkpoint (v1=/models/vae/vae-ft-mse.safetensors); a CODE the registry "
                   "does not know defines a new space from its VAE")
    p.add_argument("--out", required=True, help="dataset folder or URI (s3://...)")
    add_flags(p, BuildConfig)
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from .build import BuildConfig, build
    from interposer.settings import given

    build(BuildConfig(images=args.images, spaces=args.space, out=args.out, **given(args, BuildConfig)))
    return 0


def _add_add_space(sub) -> None:
    from .options import AddSpaceConfig
    from interposer.settings import add_flags

    p = sub.add_parser(
        "add-space", help="encode one more latent space for the tiles a dataset already has",
        description="Re-derive the dataset's tiles from their sources and recorded boxes and encode only the new "
        "space; existing files stay byte-identical. Rerun the same command to finish after a stop.")
    p.add_argument("--data", required=True, help="an existing dataset folder or URI")
    p.add_argument("--space", required=True, metavar="CODE[=VAE]", help="the space to add, as in `data build`")
    add_flags(p, AddSpaceConfig)
    p.set_defaults(func=_cmd_add_space)


def _cmd_add_space(args) -> int:
    from .build import AddSpaceConfig, add_space
    from interposer.settings import given

    add_space(AddSpaceConfig(data=args.data, space=args.space, **given(args, AddSpaceConfig)))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a dataset: counts, VAEs, per-channel latent statistics",
                       description="Print a dataset's manifest summary, tile counts, skip reasons and, per space, "
                       "the per-channel mean and std of its latents.")
    p.add_argument("data", help="dataset folder or URI")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from .build import inspect_dataset

    info = inspect_dataset(args.data)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["counts"]
    print(f"{info['path']}  ({'complete' if info['complete'] else 'INCOMPLETE: rerun its build command'})")
    print(f"  {c.get('listed', 0)} files, {c.get('unique_images', 0)} unique images, {c.get('images_ok', 0)} used, "
          f"{c.get('tiles', 0)} tiles of {info['tile_size']} px in {info['shards']} shards")
    skipped = ", ".join(f"{k} {v}" for k, v in c.get("skipped", {}).items()) or "none"
    print(f"  skipped: {skipped}")
    print(f"  fingerprint: {info['fingerprint']}")
    for code, s in info["spaces"].items():
        st = info["stats"][code]
        sub = f":{s['subfolder']}" if s["subfolder"] else ""
        own = f", runs its own code ({', '.join(s['code'])})" if s.get("code") else ""
        enc = ", encoder only" if s.get("space") and not s["space"].get("decoder", True) else ""
        print(f"  {code}: {s['tiles']} latents {tuple(s['latent_shape'])} from {s['vae_class']} {s['vae']}{sub} "
              f"({s['dtype']}, {s['latent']}{own}{enc}), weights {s['fingerprint'][:19]}...")
        print(f"      mean {' '.join(f'{v:+.3f}' for v in st['mean'])}")
        print(f"      std  {' '.join(f'{v:.3f}' for v in st['std'])}")
    return 0


def register(sub) -> None:
    """Add `data` (build, add-space, inspect) to the `interposer` command's subcommands."""
    p = sub.add_parser("data", help="build, grow and inspect latent datasets (Ray Data)",
                       description="Build, grow and inspect paired latent datasets.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for add in (_add_build, _add_add_space, _add_inspect):
        add(data_sub)


def main(argv: list[str] | None = None) -> int:
    """`python -m interposer.pipeline build|add-space|inspect ...`"""
    from interposer.cli import run_parser

    return run_parser("python -m interposer.pipeline", "Build, grow and inspect paired latent datasets.",
                      [_add_build, _add_add_space, _add_inspect], argv)
