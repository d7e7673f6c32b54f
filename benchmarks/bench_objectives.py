"""Time per training step of each quality-benchmark variant (flow, shortcut, each iSM switch, all of
them, MeanFlow, iMF), measured side by side.

    python benchmarks/bench_objectives.py --preset cpu --rounds 5 --steps 10       # 2 CPU cores: about 5 min
    python benchmarks/bench_objectives.py --preset cpu --cond class --variants shortcut,shortcut+ot,imf,imf+boundary
    python benchmarks/bench_objectives.py --preset cpu --arch dit --device cuda    # not run here (no GPU)
    python benchmarks/bench_objectives.py --preset gpu --cond class --variants flow,meanflow,imf,imf+boundary \
        --device cuda --dtype bf16 --compile        # iMF's step against flow under bf16 and compile (unmeasured)

One training step as train_unet.py takes it, without data loading: the objective's loss on a batch
of random latents with random masks or class labels (``--cond``; the quality preset's network, batch
and conditioning), the backward pass, gradient clipping, an AdamW step and the EMA updates
(sampling EMA, and the shortcut teacher's); with train.ot_pairing the pool's assignment, once per
pool (within each class: OT rows need ``--cond class``); ``--dtype bf16`` runs the loss under autocast,
``--compile`` through torch.compile (``LDM_COMPILE_BACKEND`` picks the backend, as in training). iMF rows
train the in-context DiT at the
preset's DiT sizes (``quality.network_args``). The variants run round-robin, ``--steps`` steps each
per round, so a change in the machine's load reaches all of them alike; the figure is the median
over rounds of each round's mean step time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import quality  # noqa: E402

from modules.config.io import load_config  # noqa: E402
from modules.config.schema import UNetRunConfig  # noqa: E402
from modules.core.compiling import compile_backend  # noqa: E402
from modules.core.ema import EMA, teacher  # noqa: E402
from modules.core.networks import build_network  # noqa: E402
from modules.core.networks.denoiser import Sizes  # noqa: E402
from modules.core.objectives.base import Draws  # noqa: E402
from modules.core.ot_pairing import PairedPool  # noqa: E402

LATENT_CHANNELS, VAE_FACTOR = 4, 4      # the quality presets' VAE: f4, 4 latent channels
NUM_CLASSES = 3                         # --cond class: the shapes' classes


class Variant:
    """One variant's network, optimizer, EMAs, objective and batches, ready to take training steps."""

    def __init__(self, name: str, preset: quality.Preset, arch: str, device: torch.device, cond: str = "mask",
                 dtype: torch.dtype = torch.float32, compile: bool = False):
        objective, switches = quality.VARIANTS[name]
        network = quality.network_args(preset, arch, objective)
        if cond == "class":
            network = [a for a in network if not a.startswith("cond.")] + ["cond.type=class"]
        overrides = ([f"objective={objective}", f"shortcut.denoise_timesteps={max(preset.steps)}",
                      f"data.image_size={preset.image_size}", f"sample.steps=1,{max(preset.steps)}"]
                     + network + list(switches))
        cfg = load_config(UNetRunConfig, "unet", "tiny", overrides)
        self.sizes = Sizes(latent_channels=LATENT_CHANNELS, latent_size=cfg.data.image_size // VAE_FACTOR,
                           image_downsample=VAE_FACTOR, num_classes=NUM_CLASSES if cond == "class" else 0,
                           inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.net = build_network(cfg.model, cfg.cond, self.sizes).to(device).train()
        self.model = torch.compile(self.net, **compile_backend()) if compile else self.net
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
        self.emas = [EMA(self.net, cfg.ema.decay)]
        if objective == "shortcut":
            self.emas.append(EMA(self.net, cfg.shortcut.teacher_ema_decay, warmup=False))
        self.objective = cfg.build_objective(teacher(self.net, self.net,
                                                     self.emas[-1] if objective == "shortcut" else None))
        self.generator = torch.Generator().manual_seed(1)
        self.pool = (PairedPool(cfg.train.ot_pool, self.batch, lambda m, x1: torch.randn_like(x1),
                                by_class=cond == "class") if cfg.train.ot_pairing else None)
        self.micro = 0

    def batch(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, size = self.cfg.train.batch_size, self.sizes.latent_size
        x1 = torch.randn(b, LATENT_CHANNELS, size, size, generator=self.generator).to(self.device)
        if self.cfg.cond.type == "class":
            return x1, torch.randint(0, NUM_CLASSES, (b,), generator=self.generator).to(self.device)
        mask = (torch.rand(b, 1, self.cfg.data.image_size, self.cfg.data.image_size, generator=self.generator)
                < 0.3).float().to(self.device)
        return x1, mask

    def step(self) -> None:
        if self.pool is None:
            (x1, cond), noise = self.batch(self.micro), None
        else:
            x1, cond, noise = self.pool(self.micro)
        with self.autocast:
            loss, _ = self.objective.loss(self.model, x1, cond, Draws(torch.Generator().manual_seed(self.micro),
                                                                      index=self.micro, noise=noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for ema in self.emas:
            ema.update(self.net)
        self.micro += 1


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(quality.PRESETS), default="cpu")
    p.add_argument("--arch", choices=("unet", "dit"), default="unet")
    p.add_argument("--cond", choices=("mask", "class"), default="mask", help="random masks or class labels")
    p.add_argument("--variants", default="all",
                   help=f"comma-separated, or 'all' (those that fit --cond): {', '.join(quality.VARIANTS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: the loss under autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile each network")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.variants = (tuple(v for v in quality.VARIANTS if quality.variant_problem(v, args.cond) is None)
                     if args.variants == "all" else tuple(args.variants.split(",")))
    unknown = [v for v in args.variants if v not in quality.VARIANTS]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: choose from {', '.join(quality.VARIANTS)} or 'all'")
    problem = next(filter(None, (quality.variant_problem(v, args.cond) for v in args.variants)), None)
    if problem:
        p.error(f"--variants: {problem}")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = quality.PRESETS[args.preset]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    variants = {name: Variant(name, preset, args.arch, device, args.cond, dtype, args.compile)
                for name in args.variants}
    for variant in variants.values():     # warm-up: first calls, allocator, the first OT pool
        variant.step()
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                variant.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rounds[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(times) for name, times in rounds.items()}
    base = median.get("flow")
    batch = next(iter(variants.values())).cfg.train.batch_size
    lines = [f"Training step time, preset `{args.preset}` ({args.arch}, {args.cond}, batch {batch}, {args.dtype}"
             f"{', compiled' if args.compile else ''}), {args.rounds} rounds x {args.steps} steps, {device.type}, "
             f"{args.threads} thread(s), torch {torch.__version__}", "",
             "| variant | ms / step (median of rounds) | rounds' range | / flow |", "| --- | --- | --- | --- |"]
    for name, times in rounds.items():
        ratio = f"{median[name] / base:.2f}" if base else "n/a"
        lines.append(f"| {name} | {1000 * median[name]:.0f} | {1000 * min(times):.0f}-{1000 * max(times):.0f} | "
                     f"{ratio} |")
    print("\n".join(lines))
    report = {"preset": args.preset, "arch": args.arch, "cond": args.cond, "dtype": args.dtype,
              "compile": args.compile, "device": str(device),
              "threads": args.threads,
              "rounds": args.rounds, "steps": args.steps, "seconds_per_step": rounds, "median": median}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
