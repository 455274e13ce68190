"""One prepared GPU check (torch + diffusers only, no Ray): the three figures the README's performance
section wants from a machine with one NVIDIA GPU.

    bash bench/gpu.sh                      # on the GPU machine; about 3 minutes on an H100
    python bench/gpu.py --device cpu --quick   # a smoke test of the script itself, anywhere

Prints:
  1. SD-class VAE encode, 1024 px tiles, bf16, channels-last, over a batch-size sweep: tiles/s
     (goal >= 60 on an H100; about 163 is its compute limit at 798 TFLOP/s)
  2. convert() latency of a 1x4x128x128 latent in fp16 (goal <= 1 ms)
  3. v4 bidirectional training (v1->xl recipe: p, r and b losses) at batch 128 of 32x32 crops, bf16
     autocast: steps/s (goal >= 40)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timed  # noqa: E402
from interposer import InterposerModel, convert, save_released  # noqa: E402
from interposer.spaces import default_args  # noqa: E402
from interposer.pipeline.standins import SD_VAE  # noqa: E402
from interposer.trainer.config import TrainConfig  # noqa: E402
from interposer.trainer.step import build_models, build_optim, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py: no CUDA GPU here; pass --device cpu --quick to smoke-test the script")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    print(f"device   {name}, torch {torch.__version__}", flush=True)
    side = 256 if args.quick else 1024
    low = torch.bfloat16

    # 1. VAE encode throughput
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE).to(device, low).eval().to(memory_format=torch.channels_last)
    best = 0.0
    for batch in ((1, 2) if args.quick else (1, 2, 4, 8, 16)):
        x = torch.randn(batch, 3, side, side, device=device, dtype=low).contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                sec = timed(lambda: vae.encode(x).latent_dist.mean, device, 2 if args.quick else 5)
        except torch.OutOfMemoryError:
            print(f"encode   batch {batch:>2}: out of memory", flush=True)
            break
        best = max(best, batch / sec)
        print(f"encode   batch {batch:>2}: {batch / sec:8.1f} tiles/s at {side} px (bf16)", flush=True)
    print(f"encode   best {best:.1f} tiles/s (goal >= 60 on an H100)", flush=True)
    vae = None  # free its memory before the next measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. convert latency, fp16, as users call it
    net = InterposerModel(**default_args("xl", "v1"))
    net.init_weights(torch.Generator().manual_seed(0))
    weights = Path("/tmp/gpu-bench-xl-to-v1_interposer-v4.0.safetensors")
    save_released(net.eval(), weights)
    latent = torch.randn(1, 4, side // 8, side // 8, device=device,
                         dtype=torch.float16 if device.type == "cuda" else torch.float32)
    sec = timed(lambda: convert(latent, "xl", "v1", weights=weights), device, 20 if args.quick else 200, warmup=5)
    print(f"convert  1x4x{side // 8}x{side // 8} {latent.dtype}: {sec * 1e3:.3f} ms (goal <= 1 ms)", flush=True)

    # 3. v4 bidirectional training steps/s (v1 -> xl recipe: p 1.0, r 1.4, b 1.0)
    cfg = TrainConfig.of(src="v1", dst="xl", batch=16 if args.quick else 128, crop=32, r_loss_weight=1.4,
                      b_loss_weight=1.0, gpu=device.type == "cuda")
    primary, secondary = build_models(cfg)
    primary.to(device).to(memory_format=torch.channels_last)
    secondary.to(device).to(memory_format=torch.channels_last)
    optims = [build_optim(cfg, primary), build_optim(cfg, secondary)]
    src = torch.randn(cfg.data.batch, 4, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    dst = torch.randn(cfg.data.batch, 4, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    step = [0]

    def one():
        train_step(cfg, primary, secondary, optims, src, dst, device, step=step[0])
        step[0] += 1

    sec = timed(one, device, 5 if args.quick else 50, warmup=3)
    print(f"train    batch {cfg.data.batch} of 32x32, p+r+b losses: {1 / sec:.1f} steps/s (goal >= 40)", flush=True)


if __name__ == "__main__":
    main()
