"""Convert one latent with the interposer vs the VAE round trip it replaces, side by side.

    python bench/convert.py                  # 1024 px: a 1x4x128x128 latent (several minutes on 2 CPU cores)
    python bench/convert.py --size 512       # 512 px: 1x4x64x64
    python bench/convert.py --device cuda --dtype float16

The round trip decodes with one SD-class VAE (diffusers AutoencoderKL, the real SD architecture, random
weights) and encodes with another, as moving a latent between spaces costs without an interposer. It is
timed in both memory layouts and the faster one is reported, so the ratio is not flattered by layout.
The interposer is timed through convert() (what users call) and as the plain reference network.
Figures are the median of --repeats runs after one warm-up. Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.standins import SD_VAE  # noqa: E402
from common import timed  # noqa: E402
from interposer import InterposerModel, convert, save_released  # noqa: E402
from interposer.spaces import default_args  # noqa: E402



def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side = size/8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--skip-layout-check", action="store_true",
                        help="time the round trip in the plain layout only (halves the run time)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    side = args.size // 8
    latent = torch.randn(1, 4, side, side, device=device, dtype=dtype)  # (1, 4, size/8, size/8)

    # --- the interposer: random weights in the released layout, loaded the way users load them
    net = InterposerModel(**default_args("xl", "v1"))
    net.init_weights(torch.Generator().manual_seed(0))
    weights = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-xl-to-v1_interposer-v4.0.safetensors"
    save_released(net.eval(), weights)
    t_convert = timed(lambda: convert(latent, "xl", "v1", weights=weights), device, args.repeats * 3)
    plain = net.to(device, dtype).eval()
    with torch.inference_mode():
        t_plain = timed(lambda: plain(latent), device, args.repeats * 3)

    # --- what it replaces: decode with one SD-class VAE, encode with another
    from diffusers import AutoencoderKL

    dec_vae, enc_vae = (AutoencoderKL(**SD_VAE).to(device).eval() for _ in range(2))
    if dtype != torch.float32:
        dec_vae, enc_vae = dec_vae.to(dtype), enc_vae.to(dtype)

    def round_trip():
        image = dec_vae.decode(latent).sample  # (1, 3, size, size)
        return enc_vae.encode(image).latent_dist.mean  # (1, 4, size/8, size/8)

    layouts = {"contiguous": None} if args.skip_layout_check else {"contiguous": None, "channels_last": None}
    with torch.inference_mode():
        for name in layouts:
            fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
            dec_vae.to(memory_format=fmt)
            enc_vae.to(memory_format=fmt)
            latent = latent.contiguous(memory_format=fmt)
            layouts[name] = timed(round_trip, device, max(1, args.repeats - 1))
    best = min(layouts, key=layouts.get)
    t_trip = layouts[best]

    print(f"machine      {machine(device)}")
    print(f"latent       1x4x{side}x{side} ({args.size} px), {args.dtype}")
    print(f"round trip   {t_trip * 1e3:10.1f} ms   decode + encode, SD-class AutoencoderKL ({best}; "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in layouts.items()) + ")")
    print(f"interposer   {t_plain * 1e3:10.1f} ms   plain reference network   -> {t_trip / t_plain:7.1f}x faster")
    print(f"convert()    {t_convert * 1e3:10.1f} ms   what users call           -> {t_trip / t_convert:7.1f}x faster")


if __name__ == "__main__":
    main()
