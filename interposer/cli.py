"""The `interposer` command.

    interposer list                                         # spaces, released pairs, where weights are
    interposer convert in.latent out.latent --src xl --dst v1
    interposer convert in.safetensors out.npy --src sdxl --dst sd15 --layout scaled --device cuda

Mistakes (unknown space, wrong channel count, missing or unreadable file) print one line on stderr and exit
with status 2; nothing is written. `data`, `train`, `eval`, `publish` and `demo` come from pipeline/ and
trainer/ through the `interposer.commands` entry points, so this package never imports them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
import time
from pathlib import Path

from . import __version__
from .spaces import RELEASE_REPO, RELEASE_VERSION, RELEASED_PAIRS, all_spaces, get_space, is_builtin, space_names

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (exit 2), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


def check_device(name: str, flag: str = "--device") -> "torch.device":
    """The torch device a --device flag names, if this machine has it; UsageError (one line) otherwise. Every
    command with a --device flag checks it here, before any work."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: no CUDA GPU is available here (this torch: {torch.__version__}); "
                             f"use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def _space(name: str, flag: str) -> str:
    try:
        return get_space(name).code
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a latent file from one latent space to another",
                       description="Convert a latent file from one latent space to another. Formats by suffix: "
                       ".safetensors (tensor 'samples' or the only tensor), .latent (ComfyUI SaveLatent, raw), .npy.")
    p.add_argument("input", type=Path, help="latent file to read (.safetensors, .latent or .npy)")
    p.add_argument("output", type=Path, help="latent file to write (.safetensors, .latent or .npy); written atomically")
    p.add_argument("--src", required=True, help=f"latent space of the input: {space_names()}, or a space defined "
                   "by its VAE that the --weights folder records")
    p.add_argument("--dst", required=True, help="latent space to convert to (same names)")
    p.add_argument("--weights", type=Path, default=None,
                   help="interposer weights: one of our folders or a released-layout .safetensors file "
                   "(default: $INTERPOSER_HOME, then the Hub)")
    p.add_argument("--layout", choices=("raw", "scaled"), default="raw",
                   help="raw: VAE latents, as ComfyUI .latent files hold (default); scaled: diffusion-pipeline "
                   "model inputs (scale/shift applied)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert latents that hold NaN/inf (refused by default: the output would be NaN too)")
    p.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="compute precision (default auto: the file's dtype; fp16 on the CPU runs in fp32)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    import torch

    from .converter import convert
    from .latent_io import read_latent, write_latent, SUFFIXES
    from .weights import register_spaces_of

    register_spaces_of(args.weights)  # an export of a space defined by its VAE carries its definition
    args.src, args.dst = _space(args.src, "--src"), _space(args.dst, "--dst")

    if args.output.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{args.output}: unknown output type {args.output.suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUFFIXES)}")
    if not args.output.parent.is_dir():
        raise UsageError(f"{args.output.parent}: output folder does not exist")
    if args.output.resolve() == args.input.resolve():
        raise UsageError(f"{args.output}: is the input file; write the result to another path")
    device = check_device(args.device)
    latent = read_latent(args.input)
    if not latent.is_floating_point():
        raise UsageError(f"{args.input}: latents must be floating point, got {latent.dtype}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    start = time.perf_counter()
    out = convert(latent.to(device), args.src, args.dst, layout=args.layout, dtype=dtype, weights=args.weights,
                  allow_nonfinite=args.allow_nonfinite)
    seconds = time.perf_counter() - start
    write_latent(args.output, out)
    print(f"{args.src} -> {args.dst} ({args.layout}): {tuple(latent.shape)} -> {tuple(out.shape)} "
          f"in {seconds:.2f} s; wrote {args.output}")
    return 0


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list latent spaces, released interposers and where their weights are",
                       description="List the latent spaces, the released v4.0 pairs and where each pair's weights "
                       "are found: a local folder ($INTERPOSER_HOME), the Hub cache, or not present.")
    p.set_defaults(func=_cmd_list)


def _adapters(folder: Path) -> list[str]:
    import json

    return list(json.loads((folder / "config.json").read_text()).get("adapters") or {})


def _cmd_list(args) -> int:
    from .weights import find_local, hub_cached, interposer_home, universal_folders

    from .weights import register_spaces_of

    home, local_models = interposer_home(), []
    for folder in sorted(home.iterdir()) if home.is_dir() else []:  # spaces defined by their VAE travel in exports
        try:
            if register_spaces_of(folder):
                local_models.append(folder)
        except ValueError as e:  # a name clash: say so, list the rest
            print(f"warning: {folder}: {e}")
    print("Latent spaces (interposers map raw VAE latents; * = defined by its VAE, from a model in "
          f"{home}):")
    print(f"  {'code':<5} {'ch':>3} {'f':>2}  {'scaled layout':<28} {'default VAE':<66} aliases")
    for s in all_spaces():
        scaled = {"factor": (f"(x - {s.shift:g})" if s.shift else "x") + f" * {s.scale:.6g}",
                  "per_channel": "(x - mean[c]) / std[c]", "vae_batchnorm": "VAE batch-norm stats"}[s.scaling]
        vae = f"{s.vae_class} {s.vae_repo}" + (f" ({s.vae_subfolder})" if s.vae_subfolder else "")
        code = s.code if is_builtin(s.code) else f"{s.code}*"
        print(f"  {code:<5} {s.channels:>3} {s.factor:>2}  {scaled:<28} {vae:<66} {', '.join(s.aliases)}")
    print(f"\nReleased {RELEASE_VERSION} interposers ({RELEASE_REPO}); local folder: {interposer_home()}")
    for src, dst in RELEASED_PAIRS:
        if (local := find_local(src, dst)) is not None:
            where = f"local: {local}"
        elif (cached := hub_cached(src, dst)) is not None:
            where = f"hub cache: {cached}"
        else:
            where = "not present (downloaded from the Hub on first use)"
        print(f"  {src:>3} -> {dst:<3} {where}")
    universal = set(universal_folders(home))
    for folder in local_models:
        kind = f" (universal: {', '.join(_adapters(folder))})" if folder in universal else ""
        print(f"  local model {folder.name}{kind}: {folder}")
    return 0


def _plugins(sub) -> None:
    """Subcommands other packages of this distribution add (`data` from pipeline/, `train` from trainer/),
    declared as entry points so that this package never imports them."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="interposer.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # the extra that command needs is not installed
            p = sub.add_parser(ep.name, help="(needs: pip install 'latent-interposer[all]')")
            p.set_defaults(func=lambda args, e=e: _missing(ep.name, e))
            continue
        register(sub)


def _missing(name: str, error: ImportError) -> int:
    raise UsageError(f"`interposer {name}` needs packages that are not installed ({error.name}): "
                     "pip install 'latent-interposer[all]'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="interposer",
        description="Convert diffusion-model latents between latent spaces (SD1, SDXL, SD3, Flux, Cascade, ...) "
        "without a VAE round trip.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_list(sub)
    _plugins(sub)
    return parser


# The distribution's own packages: a ValueError/TypeError raised by a `raise` in them is a deliberate
# message about the user's input; raised anywhere else (torch, pyarrow, ...) it is a bug and keeps its traceback.
def _our_folders() -> tuple[str, ...]:
    """Where this distribution's modules live: interposer/, and pipeline/ and trainer/ wherever they are
    installed (inside interposer/ from a wheel, beside it in an editable checkout); nothing is imported."""
    import importlib.util

    folders = [Path(__file__).resolve().parent]
    for name in ("interposer.pipeline", "interposer.trainer"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        folders += [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    return tuple(f"{f}{os.sep}" for f in folders)


def _raised_by_us(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_our_folders())


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run. One error taxonomy for every command: a user mistake is one line on stderr and exit
    status 2; a machine fault (disk, network, memory, a missing package) one line and exit 1; anything
    else is a bug in our code and shows its traceback."""
    from .weights import WeightsNotFoundError

    args = parser.parse_args(argv)  # argparse itself exits 2 with one line on a bad flag
    warnings.formatwarning = lambda message, *_a, **_k: f"{parser.prog}: warning: {message}\n"
    where = _where(parser, args)
    _keep_ctrl_c()
    try:
        rc = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is handled below
        return rc
    except KeyboardInterrupt:  # Ctrl-C: every file is written whole (atomically), and the finally blocks end Ray
        print(f"\n{where}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away: end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for `ls | head -1`'s ls
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            WeightsNotFoundError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        if not _raised_by_us(e):
            raise  # a bug: its traceback says where
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency is missing
        print(f"{where}: error: the package {e.name!r} is not installed: pip install 'latent-interposer[all]'",
              file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{where}: error: out of memory; use a smaller batch or a machine with more memory", file=sys.stderr)
        return 1
    except OSError as e:  # the machine, not the user's input: a full disk, a failed write, the network
        print(f"{where}: error: {e}", file=sys.stderr)
        return 1


def _keep_ctrl_c() -> None:
    """Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the main thread is; when that is a
    finalizer (a weakref callback in Ray's or Arrow's code), the exception is reported as "Exception ignored"
    and dropped, and the command ran on to the end (seen under load). Such a dropped interrupt is sent again."""
    previous = sys.unraisablehook
    if getattr(previous, "interposer", False):
        return

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            import signal
            import threading

            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()  # raised again, elsewhere
            return
        previous(unraisable)

    hook.interposer = True
    sys.unraisablehook = hook


def _where(parser: argparse.ArgumentParser, args) -> str:
    command = " ".join(str(getattr(args, k)) for k in ("command", "data_command") if getattr(args, k, None))
    return f"{parser.prog} {command}".strip()


def run_parser(prog: str, description: str, adders, argv: list[str] | None = None) -> int:
    """A stand-alone command (e.g. `python -m interposer.pipeline`) made of the given subcommand adders."""
    parser = _Parser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in adders:
        add(sub)
    return run(parser, argv)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
