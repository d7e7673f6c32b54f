"""Speed and memory of our AutoencoderKL against diffusers' with the same architecture.

    python benchmarks/bench_vae.py --size 256 --batch 16 --steps 20 --device cuda --dtype bf16
    python benchmarks/bench_vae.py --size 64 --batch 2 --steps 3 --device cpu --channels 64

Both models get the same weights (our state-dict layout is diffusers'), so the run also checks
that they compute the same function. Measured per model: training images/s (L1 + 1e-6 KL,
AdamW, autocast in --dtype), peak GPU memory during training (n/a on CPU), and encode / decode
images/s without gradients. Prints a markdown table with the ours/diffusers ratios;
``--json OUT`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.core.networks.vae import AutoencoderKL, VAEConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KL_WEIGHT = 1e-6


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations before each measurement (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument("--channels", type=int, default=128, help="base channels (kl-f8: 128)")
    p.add_argument("--channel-mult", default="1,2,4,4", help="comma-separated multipliers (kl-f8: 1,2,4,4)")
    p.add_argument("--no-diffusers", action="store_true", help="measure only our model")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.channel_mult = tuple(int(m) for m in args.channel_mult.split(","))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    factor = 2 ** (len(args.channel_mult) - 1)
    if args.size % factor:
        p.error(f"--size {args.size} is not divisible by the downsampling factor {factor}")
    return args


class OursAdapter:
    """Uniform encode/decode/forward over our model."""

    def __init__(self, model: AutoencoderKL):
        self.model = model

    def train_loss(self, x: torch.Tensor) -> torch.Tensor:
        recon, posterior = self.model(x)
        return F.l1_loss(recon.float(), x) + KL_WEIGHT * posterior.kl().mean()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


class DiffusersAdapter(OursAdapter):
    def train_loss(self, x: torch.Tensor) -> torch.Tensor:
        posterior = self.model.encode(x).latent_dist
        recon = self.model.decode(posterior.sample()).sample
        return F.l1_loss(recon.float(), x) + KL_WEIGHT * posterior.kl().float().mean()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


def build_diffusers(cfg: VAEConfig):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    levels = len(cfg.channel_mult)
    return DiffusersAutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(adapter: OursAdapter, args: argparse.Namespace, device: torch.device) -> dict:
    model = adapter.model.to(device)
    dtype = DTYPES[args.dtype]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=gen, device=device) * 2 - 1
    latent = args.size // 2 ** (len(args.channel_mult) - 1)
    z = torch.randn(args.batch, 4, latent, latent, generator=gen, device=device)
    results = {}

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step():
        with autocast:
            loss = adapter.train_loss(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(train_step, args.steps, args.warmup, device)
    results["train_img_s"] = args.batch / seconds
    results["train_peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                     if device.type == "cuda" else None)
    del optimizer
    model.eval()
    with torch.no_grad():
        with autocast:
            results["encode_img_s"] = args.batch / timed(lambda: adapter.encode(x), args.steps, args.warmup, device)
            results["decode_img_s"] = args.batch / timed(lambda: adapter.decode(z), args.steps, args.warmup, device)
    model.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def max_output_difference(ours: AutoencoderKL, theirs, size: int) -> float:
    """Largest |ours - diffusers| over the posterior mean and a decode, float32 on CPU."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        mean_ours, mean_theirs = ours.encode(x).mean, theirs.encode(x).latent_dist.mean
        return max((mean_ours - mean_theirs).abs().max().item(),
                   (ours.decode(mean_ours) - theirs.decode(mean_ours).sample).abs().max().item())


def format_table(results: dict[str, dict], args: argparse.Namespace, device: torch.device) -> str:
    rows = [("train img/s", "train_img_s", "{:.1f}"), ("train peak memory (GiB)", "train_peak_mem_gib", "{:.2f}"),
            ("encode img/s", "encode_img_s", "{:.1f}"), ("decode img/s", "decode_img_s", "{:.1f}")]
    names = list(results)
    header = ["metric"] + names + (["ours / diffusers"] if len(names) == 2 else [])
    lines = [f"AutoencoderKL, {args.size}px, batch {args.batch}, base {args.channels}, mult {args.channel_mult}, "
             f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
             f"autocast {args.dtype}, {args.steps} steps after {args.warmup} warm-up",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key, fmt in rows:
        values = [results[n][key] for n in names]
        cells = [fmt.format(v) if v is not None else "n/a" for v in values]
        if len(names) == 2:
            a, b = values
            cells.append(f"{a / b:.2f}x" if a is not None and b else "n/a")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=args.channels, channel_mult=args.channel_mult)
    ours = AutoencoderKL(cfg)
    adapters = {"ours": OursAdapter(ours)}
    report: dict = {"args": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                             for k, v in vars(args).items()}}
    if not args.no_diffusers:
        try:
            theirs = build_diffusers(cfg)
        except ImportError:
            print("diffusers is not installed: measuring only our model", file=sys.stderr)
        else:
            theirs.load_state_dict(ours.state_dict())
            report["max_abs_output_difference"] = max_output_difference(ours, theirs, 8 * 2 ** len(cfg.channel_mult))
            adapters["diffusers"] = DiffusersAdapter(theirs)
    results = {name: measure(adapter, args, device) for name, adapter in adapters.items()}
    report["results"] = results
    print(format_table(results, args, device))
    if "max_abs_output_difference" in report:
        print(f"\nsame weights, float32 CPU: max |ours - diffusers| = {report['max_abs_output_difference']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
