"""Speed and memory of our stage-2 network against diffusers' of the same size: a UNet against
UNet2DConditionModel of matching widths, a DiT (``--preset dit-s|dit-b|dit-l|dit-xl|dit-tiny``)
against DiTTransformer2DModel of the same width, depth, heads and patch.

    python benchmarks/bench_unet.py --preset sd15 --batch 64 --steps 20 --device cuda --dtype bf16 [--compile]
    python benchmarks/bench_unet.py --preset dit-b --batch 256 --steps 20 --device cuda --dtype bf16 [--compile]
    python benchmarks/bench_unet.py --preset tiny --batch 2 --steps 2 --device cpu

Measured per model on random latents (``--latent-size``, 32 = 256 px images): training
images/s of one flow-matching step (MSE to x1 - x0, AdamW, fused on CUDA, autocast in
--dtype), peak GPU memory during training (n/a on CPU), and forward latency without
gradients at batch 1 and at --batch. The diffusers model gets the same block widths,
blocks per level, attention levels, head width, transformer depth, cross-attention width and
the same number of context tokens as ours produces (one for ``--cond class``); with
``--cond none`` ours has no cross-attention while diffusers' still does. diffusers' DiT is always
class-conditional (``--cond none``: it gets the null label) and gives every block its own copy of the
time and class embedders, which ours computes once.

Each training rate is also given in TFLOP/s and as a share of the measured matmul peak: the
FLOPs of one step (forward and backward: convolutions, matmuls, attention) are counted by
``torch.utils.flop_counter`` on the meta device, and the peak is the best of ten
``--gemm-size``-cubed matmuls in --dtype (TF32 for fp32 on CUDA). A second table times our
training loop's own step with the flow and with the shortcut objective (``modules.core.objectives``
with its EMA teacher, ``modules.run.harness.apply_update``, the EMA updates: what train_unet.py runs)
and gives their ratio. Prints markdown tables with ours/diffusers ratios; ``--json OUT`` also
writes the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.config.io import load_config  # noqa: E402
from modules.config.schema import ConfigError, UNetRunConfig  # noqa: E402
from modules.core.attention import attention_backend  # noqa: E402
from modules.core.ema import EMA, teacher  # noqa: E402
from modules.core.networks import build_network  # noqa: E402
from modules.core.networks.denoiser import NetworkInputs, Sizes, count_parameters  # noqa: E402
from modules.core.objectives.base import Draws  # noqa: E402
from modules.run.accelerator import adam  # noqa: E402
from modules.run.harness import apply_update  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NUM_CLASSES = 1000
LATENT_CHANNELS = 4  # the latents of an f8 VAE (kl-f8)
CONTEXT_TOKENS = 1   # what our class conditioning gives cross-attention; diffusers gets as many


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15",
                   help="a configs/unet preset (sd15, seed, tiny, dit-s, dit-b, dit-l, dit-xl, dit-tiny) "
                        "or a JSON file")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed training steps / forward calls")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32 = 256 px through a x8 VAE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto",
                   help="autocast dtype (fp32: none; auto: bf16 on CUDA, fp32 on CPU, where bf16 is slow)")
    p.add_argument("--cond", choices=("class", "none"), default="class",
                   help=f"our conditioning: class ({NUM_CLASSES} labels, one context token) or none")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument("--no-diffusers", action="store_true", help="measure only our model")
    p.add_argument("--gemm-size", type=int, default=None,
                   help="side of the matmul-peak probe (default: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.dtype == "fp16":
        p.error("--dtype fp16 would need loss scaling; use bf16 or fp32")
    if args.gemm_size is None:
        args.gemm_size = 8192 if args.device.startswith("cuda") else 1024
    for name in ("batch", "steps", "latent_size", "gemm_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.cfg = load_config(UNetRunConfig, "unet", args.preset, [f"cond.type={args.cond}"])
    except ConfigError as e:
        p.error(str(e))
    # What the compared network is built for: 4 latent channels (an f8 VAE's), NUM_CLASSES labels, no
    # step-size or guidance input (the objective's own inputs are added in objective_steps).
    args.sizes = Sizes(latent_channels=LATENT_CHANNELS, latent_size=args.latent_size, image_downsample=8,
                       num_classes=NUM_CLASSES if args.cond == "class" else 0, inputs=NetworkInputs())
    m = args.cfg.model
    factor, why = ((m.patch_size, "its patch size") if m.arch == "dit"
                   else (2 ** (len(m.channel_mult) - 1), f"{len(m.channel_mult)} levels"))
    if args.latent_size % factor:
        p.error(f"--latent-size {args.latent_size} is not divisible by {factor} ({why} in preset {args.preset})")
    if m.arch == "dit" and m.mlp_ratio != 4:
        p.error(f"preset {args.preset}: diffusers' DiT has MLP ratio 4, the preset {m.mlp_ratio}")
    return args


class Inputs:
    """Random latents, times and conditions of one batch size, and how each model is called."""

    def __init__(self, args: argparse.Namespace, batch: int, device: Optional[torch.device] = None):
        m, s = args.cfg.model, args.sizes
        device = device or torch.device(args.device)
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (batch, s.latent_channels, args.latent_size, args.latent_size)
        self.x1 = torch.randn(shape, generator=g).to(device)
        self.x0 = torch.randn(shape, generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)
        if args.channels_last:
            self.x1, self.x0 = (v.to(memory_format=torch.channels_last) for v in (self.x1, self.x0))
        self.x_t = (1 - self.t)[:, None, None, None] * self.x0 + self.t[:, None, None, None] * self.x1
        self.level = (torch.randint(0, s.inputs.levels, (batch,), generator=g).to(device)
                      if s.inputs.step == "level" else None)
        self.labels = self.drop = None
        if args.cfg.cond.type == "class":
            self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
            self.drop = (torch.rand(batch, generator=g) < 0.1).to(device)
        self.dit = m.arch == "dit"
        # diffusers' UNet's context tokens (its DiT reads none; our DiT config has no context width)
        self.context = None if self.dit else torch.randn(batch, CONTEXT_TOKENS, m.context_dim, generator=g).to(device)

    def ours(self, model: torch.nn.Module) -> torch.Tensor:
        return model(self.x_t, self.t, level=self.level, cond=self.labels, drop=self.drop)

    def diffusers(self, model: torch.nn.Module) -> torch.Tensor:
        labels = None if self.labels is None else torch.where(self.drop, NUM_CLASSES, self.labels)
        if self.dit and labels is None:
            labels = torch.full_like(self.t, NUM_CLASSES, dtype=torch.long)
        return call_diffusers(model, self.x_t, self.t * 1000, labels, self.context, self.dit)


def call_diffusers(model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: Optional[torch.Tensor],
                   context: Optional[torch.Tensor], dit: bool) -> torch.Tensor:
    """One forward of the diffusers model (timesteps in [0, 1000)); its DiT reads no context tokens."""
    if dit:
        return model(x, timesteps, class_labels=labels).sample
    return model(x, timesteps, encoder_hidden_states=context, class_labels=labels).sample


def build_diffusers(args: argparse.Namespace):
    """UNet2DConditionModel with our preset's widths (DiTTransformer2DModel of the same size for a DiT),
    or None when diffusers is not importable."""
    try:
        from diffusers import DiTTransformer2DModel, UNet2DConditionModel
    except ImportError:
        return None
    m, channels = args.cfg.model, args.sizes.latent_channels
    if m.arch == "dit":
        return DiTTransformer2DModel(
            num_attention_heads=m.num_heads, attention_head_dim=m.hidden_size // m.num_heads,
            in_channels=channels, num_layers=m.depth, sample_size=args.latent_size, patch_size=m.patch_size,
            num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6)
    levels = range(len(m.channel_mult))
    widths = tuple(m.base_channels * mult for mult in m.channel_mult)
    return UNet2DConditionModel(
        sample_size=args.latent_size, in_channels=channels, out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in m.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in m.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        block_out_channels=widths, layers_per_block=m.num_res_blocks, norm_num_groups=m.norm_groups,
        cross_attention_dim=m.context_dim, attention_head_dim=tuple(w // m.head_dim for w in widths),
        transformer_layers_per_block=m.transformer_depth,
        num_class_embeds=NUM_CLASSES + 1 if args.cfg.cond.type == "class" else None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def gemm_peak_tflops(args: argparse.Namespace) -> float:
    """The measured matmul peak: the best of ten ``--gemm-size``-cubed products in --dtype."""
    device, n = torch.device(args.device), args.gemm_size
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[args.dtype]) for _ in range(2))
    return 2 * n ** 3 / min(timed(lambda: a @ b, 10, 3, device)) / 1e12


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of ``step`` (forward and backward) as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def flow_step_flops(build: Callable[[], torch.nn.Module], call: Callable, args: argparse.Namespace) -> int:
    """FLOPs of one flow-matching training step, counted on the meta device: shapes only, no memory,
    and attention as SDPA's matmuls whatever backend the real device uses (xformers is not counted)."""
    meta = torch.device("meta")
    with meta:
        model = build()
    batch = Inputs(args, args.batch, meta)
    return counted_flops(lambda: F.mse_loss(call(batch, model).float(), batch.x1 - batch.x0).backward())


def measure(name: str, model: torch.nn.Module, call: Callable, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    params = count_parameters(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if args.compile else model
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = Inputs(args, args.batch)
    target = batch.x1 - batch.x0

    def train_step() -> None:
        with autocast:
            pred = call(batch, runner)
        F.mse_loss(pred.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_times = timed(train_step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    model.eval()
    latencies = {}
    for size in sorted({1, args.batch}):
        inputs = batch if size == args.batch else Inputs(args, size)

        def forward(inputs=inputs) -> None:
            with torch.no_grad(), autocast:
                call(inputs, runner)

        latencies[size] = statistics.median(timed(forward, args.steps, args.warmup, device)) * 1000
    return {"model": name, "params": params, "train_img_s": args.batch * args.steps / sum(train_times),
            "peak_gib": peak, "fwd_ms_b1": latencies[1], "fwd_ms_bB": latencies[args.batch]}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def objective_steps(args: argparse.Namespace, peak: float) -> list[dict]:
    """Our training loop's step with the flow and the shortcut objective, timed on --device.

    Each objective trains its own network (a shortcut model has the step-size embedding) as
    train_unet.py does: the objective's loss (the shortcut teacher is the fast EMA swapped in),
    backward, ``apply_update`` (clipping, the fused AdamW that skips bad steps on the device) and
    the EMA updates (the sampling EMA; the shortcut model's teacher EMA too)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if dtype == torch.float32 else args.dtype)
    rows = []
    for objective in ("flow", "shortcut"):
        cfg = copy.deepcopy(args.cfg)
        cfg.objective = objective
        sizes = dataclasses.replace(args.sizes, inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))
        run_args = argparse.Namespace(**{**vars(args), "cfg": cfg, "sizes": sizes})
        torch.manual_seed(0)
        model = build_network(cfg.model, cfg.cond, sizes).to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        runner = torch.compile(model) if args.compile else model
        optimizer = adam(model.parameters(), cfg.train.lr, cfg.train, device, cfg.train.weight_decay)
        emas = [EMA(model, cfg.ema.decay, cfg.ema.warmup)]
        teacher_decay = cfg.objective_class.teacher_decay(cfg.objective_cfg)
        if teacher_decay > 0:
            emas.append(EMA(model, teacher_decay, warmup=False))
        loss_fn = cfg.build_objective(teacher(runner, model, emas[1] if len(emas) > 1 else None))
        batch, index = Inputs(run_args, args.batch), itertools.count()
        generator = torch.Generator(device).manual_seed(0)

        def train_step() -> None:
            with accelerator.autocast():
                loss, _ = loss_fn.loss(runner, batch.x1, batch.labels, Draws(generator, next(index)))
            accelerator.backward(loss)
            update = apply_update(accelerator, {"unet": (optimizer, model.parameters())}, [loss.detach()],
                                  cfg.train.grad_clip)
            for ema in emas:
                ema.update(model, update.finite)

        model.train()
        seconds = statistics.median(timed(train_step, args.steps, args.warmup, device))
        with torch.device("meta"):
            meta_model = build_network(cfg.model, cfg.cond, sizes)
        meta_batch = Inputs(run_args, args.batch, torch.device("meta"))
        # the online model teaches: the same FLOPs as the EMA teacher
        meta_loss = cfg.build_objective()
        flops = counted_flops(lambda: meta_loss.loss(meta_model, meta_batch.x1, meta_batch.labels,
                                                     Draws(torch.Generator().manual_seed(0), 0))[0].backward())
        rows.append({"objective": objective, "ms": seconds * 1000, "img_s": args.batch / seconds,
                     "tflop_per_step": flops / 1e12, "tflop_s": flops / seconds / 1e12,
                     "peak_share": flops / seconds / 1e12 / peak})
        del model, runner, optimizer, emas, loss_fn
        free(device)
    return rows


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: list[dict], args: argparse.Namespace, header: str) -> str:
    lines = [header, "",
             f"| model | params | train img/s | train TFLOP/s | % of matmul peak | peak GiB | fwd ms (batch 1) "
             f"| fwd ms (batch {args.batch}) |",
             "| --- " * 8 + "|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['train_img_s']:.1f} | {r['train_tflop_s']:.3g} | "
                     f"{100 * r['peak_share']:.1f} | {fmt(r['peak_gib'], '.2f')} | {r['fwd_ms_b1']:.2f} | "
                     f"{r['fwd_ms_bB']:.2f} |")
    if len(results) == 2:
        ours, ref = results
        ratio = {k: (ours[k] / ref[k] if ours[k] is not None and ref[k] else None)
                 for k in ("params", "train_img_s", "train_tflop_s", "peak_share", "peak_gib", "fwd_ms_b1",
                           "fwd_ms_bB")}
        lines.append(f"| ours / diffusers | {ratio['params']:.2f} | {ratio['train_img_s']:.2f} | "
                     f"{ratio['train_tflop_s']:.2f} | {ratio['peak_share']:.2f} | {fmt(ratio['peak_gib'], '.2f')} | "
                     f"{ratio['fwd_ms_b1']:.2f} | {ratio['fwd_ms_bB']:.2f} |")
    return "\n".join(lines)


def objective_table(rows: list[dict]) -> str:
    flow = next(r for r in rows if r["objective"] == "flow")
    lines = ["Ours, the training loop's step by objective (median):", "",
             "| objective | ms / step | img/s | TFLOP / step | TFLOP/s | % of matmul peak | step / flow step |",
             "| --- " * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['ms']:.2f} | {r['img_s']:.1f} | {r['tflop_per_step']:.3g} | "
                     f"{r['tflop_s']:.3g} | {100 * r['peak_share']:.1f} | {r['ms'] / flow['ms']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = gemm_peak_tflops(args)
    builders = [("ours", lambda: build_network(args.cfg.model, args.cfg.cond, args.sizes), Inputs.ours)]
    if not args.no_diffusers and importlib.util.find_spec("diffusers") is not None:
        builders.append(("diffusers", lambda: build_diffusers(args), Inputs.diffusers))
    results = []
    for name, build, call in builders:
        torch.manual_seed(0)
        result = measure(name, build(), call, args)
        flops = flow_step_flops(build, call, args)
        result.update(train_tflop_s=result["train_img_s"] / args.batch * flops / 1e12,
                      tflop_per_step=flops / 1e12)
        result["peak_share"] = result["train_tflop_s"] / peak
        results.append(result)
        free(device)
    objectives = objective_steps(args, peak)
    dtype = DTYPES[args.dtype]
    network = {"unet": "UNet", "dit": "DiT"}[args.cfg.model.arch]
    header = (f"{network} preset `{args.preset}`, cond {args.cfg.cond.type}, "
              f"latents {args.latent_size}x{args.latent_size}x{args.sizes.latent_channels}, batch {args.batch}, {args.steps} steps, {device.type} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {args.dtype}"
              f"{', compiled' if args.compile else ''}{', channels_last' if args.channels_last else ''}, "
              f"attention {attention_backend(device, dtype)}, "
              f"{'' if args.cfg.model.arch == 'dit' else f'diffusers context tokens {CONTEXT_TOKENS}, '}"
              f"matmul peak {peak:.3g} TFLOP/s ({args.gemm_size}^3, {args.dtype}), torch {torch.__version__}")
    print(table(results, args, header) + "\n\n" + objective_table(objectives))
    report = {"preset": args.preset, "cond": args.cfg.cond.type, "batch": args.batch, "steps": args.steps,
              "latent_size": args.latent_size, "device": str(device), "dtype": args.dtype,
              "compile": args.compile, "channels_last": args.channels_last,
              "attention": attention_backend(device, dtype), "gemm_size": args.gemm_size,
              "matmul_peak_tflop_s": peak, "results": results, "objectives": objectives}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
