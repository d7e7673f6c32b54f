"""Generation speed: noise to decoded images, ours against diffusers' UNet (or DiT) + VAE of the same size, eager and compiled.

    python benchmarks/bench_sample.py --device cuda --batch 1,64 --steps 1,4,128 [--json out.json]
    python benchmarks/bench_sample.py --unet-preset tiny --vae-preset tiny --device cpu --batch 1,2 --steps 1,2 --no-compile

Per (batch, steps): the median wall time of one whole generation, from noise through ``steps``
network evaluations (Euler / shortcut steps, one conditional forward each: guidance scale 1)
to the decoded images, with bf16 weights and compute on CUDA (float32 on CPU). Ours is
``modules.core.generation`` (what sample.py runs); diffusers' is ``UNet2DConditionModel`` (the
preset's widths, as ``bench_unet.py`` builds it; ``DiTTransformer2DModel`` for a DiT preset) and
``AutoencoderKL`` (``bench_vae.py``'s), stepped by the same Euler loop. Each model is timed eagerly, then compiled as ``sample.py
--compile`` compiles (``modules.core.compiling.sampling_options``: mode="reduce-overhead", CUDA graphs
on GPU; the UNet and the VAE decoder) and timed again. Prints one markdown table with the
ours/diffusers and compiled/eager ratios; ``--json OUT`` also writes the numbers. Random
weights: this measures speed, not images.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unet  # noqa: E402
import bench_vae  # noqa: E402

from modules.config.io import load_config  # noqa: E402
from modules.config.schema import ConfigError, UNetRunConfig, VAERunConfig, sizes_problem  # noqa: E402
from modules.core.compiling import sampling_options  # noqa: E402
from modules.core.generation import (  # noqa: E402
    GenerationSpec,
    compiled_for_sampling,
    decode_latents,
    generate_latents,
)
from modules.core.networks import build_network  # noqa: E402
from modules.core.networks.denoiser import Sizes  # noqa: E402
from modules.core.networks.vae import AutoencoderKL  # noqa: E402

NUM_CLASSES = bench_unet.NUM_CLASSES
MODELS = ("ours", "diffusers")
MODES = ("eager", "compiled")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet-preset", default="sd15", help="a configs/unet preset or JSON file")
    p.add_argument("--vae-preset", default="kl-f8", help="a configs/vae preset or JSON file")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--steps", default="1,4,128", help="comma-separated step counts (powers of two)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per (batch, steps)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed generations first (compilation; CUDA graphs are recorded on the second)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true",
                   help="eager only (inductor's compile takes minutes per model on a CPU)")
    p.add_argument("--no-diffusers", action="store_true", help="measure only ours")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.batch = [int(v) for v in args.batch.split(",")]
    args.steps = [int(v) for v in args.steps.split(",")]
    try:
        vae_cfg = load_config(VAERunConfig, "vae", args.vae_preset).model
        args.cfg = load_config(UNetRunConfig, "unet", args.unet_preset,
                               ["cond.type=class", f"shortcut.denoise_timesteps={max(args.steps)}",
                                f"sample.steps={args.steps[0]}"])
    except ConfigError as e:
        p.error(str(e))
    # What our network is built for: the VAE's latents, NUM_CLASSES labels, the objective's inputs.
    cfg = args.cfg
    args.sizes = Sizes(latent_channels=vae_cfg.latent_channels,
                       latent_size=cfg.data.image_size // vae_cfg.downsample_factor,
                       image_downsample=vae_cfg.downsample_factor, num_classes=NUM_CLASSES,
                       inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))
    problem = sizes_problem(cfg, args.sizes)
    if problem:
        p.error(problem)
    args.vae_cfg = vae_cfg
    args.latent_size = args.sizes.latent_size
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


class Ours:
    """Our UNet and VAE, generating as sample.py does."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.unet = build_network(args.cfg.model, args.cfg.cond, args.sizes).to(device, dtype).eval()
        self.vae = AutoencoderKL(args.vae_cfg).to(device, dtype).eval()
        self.network = self.unet
        self.spec = GenerationSpec.of(args.cfg, args.sizes)
        self.device, self.dtype = device, dtype

    def compile(self) -> None:
        self.network = compiled_for_sampling(self.unet, self.vae)

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        labels = (torch.arange(batch) % NUM_CLASSES).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            z = generate_latents(self.network, self.spec, labels, range(batch), steps, device=self.device)
            return decode_latents(self.vae, z, batch)


class Diffusers:
    """diffusers' UNet2DConditionModel and AutoencoderKL at our widths, stepped by the same Euler loop."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        bench_args = argparse.Namespace(cfg=args.cfg, latent_size=args.latent_size, sizes=args.sizes)
        self.unet = bench_unet.build_diffusers(bench_args).to(device, dtype).eval()
        self.vae = bench_vae.build_diffusers(args.vae_cfg).to(device, dtype).eval()
        self.model, self.latent_size, self.channels = args.cfg.model, args.latent_size, args.sizes.latent_channels
        self.device, self.dtype = device, dtype

    def compile(self) -> None:
        options = sampling_options()
        self.unet = torch.compile(self.unet, **options)
        self.vae.decoder.compile(**options)

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        m, device, dtype = self.model, self.device, self.dtype
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, self.channels, self.latent_size, self.latent_size, generator=g).to(device)
        labels = (torch.arange(batch) % NUM_CLASSES).to(device)
        context = (None if m.arch == "dit"     # diffusers' DiT reads no context tokens (our DiT has no width for them)
                   else torch.zeros(batch, bench_unet.CONTEXT_TOKENS, m.context_dim, device=device, dtype=dtype))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for i in range(steps):
                t = torch.full((batch,), 1000.0 * i / steps, device=device)
                v = bench_unet.call_diffusers(self.unet, x.to(dtype), t, labels, context, m.arch == "dit")
                x = x + v.float() / steps
            return self.vae.decode(x.to(dtype)).sample.float().clamp(-1, 1)


def measure(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every (model, eager/compiled, batch, steps) cell: one model in memory at a time."""
    builders = {"ours": Ours, "diffusers": None if args.no_diffusers else Diffusers}
    rows = []
    for name, build in builders.items():
        if build is None:
            continue
        model = build(args, device, dtype)
        for mode in MODES[:1] if args.no_compile else MODES:
            if mode == "compiled":
                model.compile()
            for batch in args.batch:
                for steps in args.steps:
                    ms = median_ms(lambda: model.generate(batch, steps), args.repeats, args.warmup, device)
                    rows.append({"model": name, "mode": mode, "batch": batch, "steps": steps, "ms": ms,
                                 "img_s": batch / ms * 1000})
        del model
        bench_unet.free(device)
    return rows


def ratios(rows: list[dict], batch: int, steps: int) -> dict:
    """ours / diffusers per mode and compiled / eager per model (None where a cell was not measured)."""
    ms = {(r["model"], r["mode"]): r["ms"] for r in rows if r["batch"] == batch and r["steps"] == steps}

    def ratio(a, b):
        return ms[a] / ms[b] if a in ms and b in ms else None

    out = {"batch": batch, "steps": steps}
    out.update({f"ours_over_diffusers_{mode}": ratio(("ours", mode), ("diffusers", mode)) for mode in MODES})
    out.update({f"compiled_over_eager_{name}": ratio((name, "compiled"), (name, "eager")) for name in MODELS})
    return out


def table(rows: list[dict], cells: list[dict], header: str) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [header, "",
             "| batch | steps | ours eager ms | ours compiled ms | diffusers eager ms | diffusers compiled ms "
             "| ours / diffusers, eager | ours / diffusers, compiled | compiled / eager, ours "
             "| compiled / eager, diffusers |",
             "| --- " * 10 + "|"]
    for cell in cells:
        ms = {(r["model"], r["mode"]): r["ms"] for r in rows
              if r["batch"] == cell["batch"] and r["steps"] == cell["steps"]}
        times = [fmt(ms.get((name, mode)), ".1f") for name in MODELS for mode in MODES]
        shares = [fmt(cell[key], ".2f") for key in ("ours_over_diffusers_eager", "ours_over_diffusers_compiled",
                                                     "compiled_over_eager_ours", "compiled_over_eager_diffusers")]
        lines.append(f"| {cell['batch']} | {cell['steps']} | " + " | ".join(times + shares) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = measure(args, device, dtype)
    cells = [ratios(rows, batch, steps) for batch in args.batch for steps in args.steps]
    compiled = "eager only" if args.no_compile else f"compiled with {sampling_options()}"
    header = (f"Generation, UNet `{args.unet_preset}` + VAE `{args.vae_preset}`, latents {args.latent_size}x"
              f"{args.latent_size}, {device.type} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, {compiled}, "
              f"median of {args.repeats} after {args.warmup} warm-up, torch {torch.__version__}")
    print(table(rows, cells, header))
    report = {"unet_preset": args.unet_preset, "vae_preset": args.vae_preset, "device": str(device),
              "dtype": str(dtype), "compile": None if args.no_compile else sampling_options(), "rows": rows,
              "ratios": cells}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
