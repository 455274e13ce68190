"""`interposer train|eval|publish` (and `python -m interposer.trainer ...`): train, evaluate and publish interposers.

    interposer train --data data/xl-v1 --src xl --dst v1 --out runs --name xl-v1 --steps 2000 --batch 32
    interposer train --data data/v1-xl --src v1 --dst xl --config v1-to-xl.yaml --out runs --name v1-xl
    interposer train ... --gpu --workers 8 --out s3://bucket/runs      # on a Ray cluster (RAY_ADDRESS)
    interposer train --data data/five --universal --out runs --name uni  # one network, every pair of the dataset
    interposer train --data data/five-wan --universal --from runs/uni --add-space wan --out runs --name uni-wan

Rerun the same command to resume from the latest checkpoint. A city96 v4 YAML file works as --config.
"""

from __future__ import annotations


def _add_train(sub) -> None:
    from .config import add_train_flags

    p = sub.add_parser(
        "train", help="train an interposer on a dataset with Ray Train (DDP; resumable)",
        description="Train a src -> dst interposer (and its dst -> src partner) on a dataset built by "
        "`interposer data build`, with Ray Train. Flags override --config; defaults are the v4.0 xl -> v1 "
        "recipe. Rerunning the same command resumes from the latest checkpoint.")
    p.add_argument("--data", required=True, help="dataset folder or URI holding both spaces")
    p.add_argument("--src", default=None, help="source latent space (e.g. xl); not with --universal")
    p.add_argument("--dst", default=None, help="target latent space (e.g. v1); not with --universal")
    p.add_argument("--universal", action="store_true",
                   help="train one universal interposer for every ordered pair of the dataset's spaces (or "
                   "--spaces); the same as --arch universal")
    p.add_argument("--from", dest="base", default=None, metavar="RUN",
                   help="with --universal --add-space NEW: the universal run (or export folder) to extend; its "
                   "network is frozen and only NEW's adapters and embedding train")
    p.add_argument("--out", required=True, help="runs folder or URI (s3://...); the run lives in OUT/NAME")
    p.add_argument("--name", required=True, help="run name: rerun with the same name to resume")
    p.add_argument("--config", default=None, help="YAML config (ours, or a city96 v4 file)")
    add_train_flags(p.add_argument_group("settings (each also a --config key; see the README's table)"))
    p.add_argument("--rev", default="v5.0", help="version in the exported released-layout file name (default v5.0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a target VAE that ships its own code run it (needed only with a decoded loss, which "
                   "loads the target decoder); a dataset never grants this by itself")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from pathlib import Path

    from interposer.pipeline.schema import read_manifest, register_manifest_spaces

    from .config import load_config, train_flags_given
    from .driver import RunSpec, train

    register_manifest_spaces(read_manifest(args.data))  # first: --src/--dst may name the dataset's own spaces
    flags = train_flags_given(args)
    if args.universal:
        if flags.get("arch", "universal") != "universal":
            raise ValueError(f"--universal and --arch {flags['arch']} ask for different networks; give one")
        flags["arch"] = "universal"
    universal = flags.get("arch") == "universal"
    if args.base is not None:
        flags["base"] = str(Path(args.base).expanduser().absolute()) if "://" not in args.base else args.base
    if universal and (args.src or args.dst):
        raise ValueError("a universal run trains every pair of its spaces: give --spaces A,B,... instead of "
                         "--src/--dst")
    if not universal and not (args.src and args.dst):
        raise ValueError("give --src and --dst (the pair to train), or --universal (every pair)")
    cfg = load_config(args.config, **({} if universal else dict(src=args.src, dst=args.dst)), **flags)
    train(cfg, RunSpec(data=args.data, out=args.out, name=args.name, rev=args.rev,
                       trust_remote_code=args.trust_remote_code))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="measure an interposer against the VAE round trip and a linear baseline",
        description="Evaluate an interposer on a dataset split against the VAE round trip it replaces, a "
        "least-squares per-pixel affine map and (where channels match) the untouched source; prints a table and "
        "writes eval.json.")
    p.add_argument("--model", required=True, help="a run folder, an export folder, or a released-layout file "
                   "(then give --src and --dst)")
    p.add_argument("--data", required=True, help="dataset folder holding both spaces")
    p.add_argument("--split", choices=("val", "train", "all"), default="val", help="tiles to evaluate (default val)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of images in val (default: the run's own, from the export's config.json; else 0.02)")
    p.add_argument("--limit", type=int, default=64, help="tiles at most (default 64; 0: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--src", default=None, help="source space, for a bare released-layout file, or one pair of a "
                   "universal model (without: every pair the dataset holds, one table)")
    p.add_argument("--dst", default=None, help="target space, for a bare released-layout file or a universal "
                   "model's pair")
    p.add_argument("--vae", action="append", default=[], metavar="CODE=SOURCE",
                   help="use another VAE for a space than the dataset's manifest names (repeatable)")
    p.add_argument("--out", default=None, help="where to write eval.json and eval.png (default: beside the model)")
    p.add_argument("--linear-data", default=None, metavar="DATASET",
                   help="fit the linear baseline on this dataset's tiles (default: --data's train split); for a "
                   "test set of held-out images, give the training dataset")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the dataset's VAEs that ship their own code run it (a dataset never grants this by "
                   "itself); the code must be what the dataset was built with")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .publish import local_model

    with local_model(args.model) as (model, remote):  # a run in s3:// is read through a local copy
        _eval(args, model, remote)
    return 0


def _eval(args, model, remote) -> None:
    import json
    from pathlib import Path

    from interposer.spaces import get_space

    from .evaluate import evaluate, evaluate_universal, format_pairs_table, format_table
    from .publish import EVAL_FILE, find_export

    from interposer.cli import check_device

    check_device(args.device)
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}: give a number of tiles, or 0 for all")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction}: a share of images in [0, 1), e.g. 0.02")
    root = model
    if model.is_dir():
        model, _ = find_export(model)
        if (args.src is None) != (args.dst is None):
            raise ValueError("give both --src and --dst (one pair), or neither")
    elif (args.src is None) != (args.dst is None) or (model.is_file() and args.src is None):
        raise ValueError("--model is a bare weights file: give both --src and --dst")
    vaes = {}
    for item in args.vae:
        code, _, source = item.partition("=")
        if not source:
            raise ValueError(f"--vae {item!r}: expected CODE=SOURCE")
        vaes[get_space(code).code] = source
    val_fraction = args.val_fraction
    config = model / "config.json" if model.is_dir() else None
    exported = json.loads(config.read_text()) if config and config.is_file() else {}
    if val_fraction is None:  # the share the run held out, so that "val" means the tiles it never trained on
        val_fraction = exported.get("val_fraction")
        if val_fraction is None:
            val_fraction = 0.02
        else:
            print(f"validation share {val_fraction} (the run's own, from "
                  f"{config if remote is None else remote.uri + '/' + config.relative_to(root).as_posix()})")
    out = Path(args.out) if args.out else (model / EVAL_FILE if model.is_dir() else Path(EVAL_FILE))
    trained_on = exported.get("data")
    if args.split != "val" and trained_on and _same_place(trained_on, args.data):
        print(f"note: --split {args.split} on the dataset the model was trained on: its training images are "
              "evaluated too, so the figures are optimistic")
    common = dict(split=args.split, limit=args.limit or None, device=args.device, val_fraction=val_fraction,
                  vaes=vaes, trust_remote_code=args.trust_remote_code, linear_data=args.linear_data)
    if exported.get("architecture") == "interposer-universal" and args.src is None:  # every pair, one table
        result = evaluate_universal(str(model), args.data, **common)
        print(format_pairs_table(result))
    else:
        result = evaluate(str(model), args.data, src=args.src, dst=args.dst, grid=out.with_suffix(".png"), **common)
        print(format_table(result))
    out.write_text(json.dumps(result, indent=2) + "\n")
    written = [out] + ([out.with_suffix(".png")] if result.get("grid") else [])
    if remote is not None and not args.out:  # beside the model in the bucket, where publish looks
        written = [f"{remote.uri}/{p.relative_to(root).as_posix()}" for p in written]
        for p, uri in zip([out, out.with_suffix(".png")], written):
            remote.write_bytes(uri[len(remote.uri) + 1:], p.read_bytes())
    print("wrote " + " and ".join(str(w) for w in written))


def _same_place(a: str, b: str) -> bool:
    """Two dataset locations that name the same folder (URIs compared as written)."""
    from pathlib import Path

    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _add_publish(sub) -> None:
    p = sub.add_parser(
        "publish", help="push a trained interposer with its model card to the Hugging Face Hub",
        description="Stage our format, the released layout (v4 architecture), a generated model card and "
        "eval.json, then create the repo (if needed) and push everything in one commit. The token comes from "
        "HF_TOKEN or `hf auth login` and is never printed.")
    p.add_argument("--model", required=True, help="a run folder (with export/) or an export folder")
    p.add_argument("--repo", required=True, help="Hub repo id, ORG/NAME")
    p.add_argument("--rev", default="v5.0", help="version in the released-layout path (default v5.0)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be pushed (files, sizes, sha256); send nothing")
    p.set_defaults(func=_cmd_publish)


def _cmd_publish(args) -> int:
    from .publish import publish

    publish(args.model, args.repo, rev=args.rev, private=args.private, dry_run=args.dry_run)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole chain offline on local Ray (what `make demo` runs)",
                       description="Stand-in VAEs -> data build -> train (interrupted once, resumed) -> eval -> "
                       "publish --dry-run -> convert, offline on local Ray, in a few minutes on 2 CPU cores.")
    p.add_argument("--out", default="demo-output", help="folder for every artefact (default ./demo-output)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer photos and steps), as the tests use")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def register(sub) -> None:
    _add_train(sub)


def main(argv: list[str] | None = None) -> int:
    from interposer.cli import run_parser

    return run_parser("python -m interposer.trainer", "Train, evaluate and publish interposers.",
                      [_add_train, _add_eval, _add_publish], argv)


def register_eval(sub) -> None:
    _add_eval(sub)


def register_publish(sub) -> None:
    _add_publish(sub)


def register_demo(sub) -> None:
    _add_demo(sub)
