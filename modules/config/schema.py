"""Typed run configurations: every field, the rules it obeys, and the cross-field rules.

A run's configuration is a tree of dataclasses. Each field is declared with its own rules
(``setting(default, rule, ...)``) and each section may add cross-field rules in ``check``;
:func:`modules.config_io.validate` applies them all, naming the offending key. It runs where a
config is built (the command line, or a saved file read back), and only there: networks,
objectives and samplers trust a validated config. A field without rules has none: nothing is
inherited from its name. Reading, overriding and saving configs is in :mod:`modules.config_io`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from modules.core.settings import (at_least, at_most, each, fail, fraction, non_empty, non_negative, one_of, positive,
                                  power_of_two, scale_range, setting, time_interval)
from modules.errors import ConfigError  # noqa: F401  (callers catch config errors from here)
from modules.config.sampling import DEFAULT_SAMPLER, guidance_problem, sampling_problem


# ----------------------------------------------------------------------------- shared sections

SIZE_LIMIT = 16384          # pixels per side
WIDTH_LIMIT = 8192          # channels
OT_POOL_LIMIT = 2048        # rows of one train.ot_pairing assignment (O(n^3): about 17 s on a CPU core)


@dataclass
class DataConfig:
    path: str = ""                      # image folder, save_to_disk folder or hub name
    split: str = "train"
    image_size: int = setting(256, positive, at_most(SIZE_LIMIT))
    random_crop_scale: float = setting(1.0, fraction(low_open=True))   # < 1: random resized crop, min area
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    masks: bool = False                 # load paired masks (cond.type=mask sets this)
    num_val_images: int = setting(8, non_negative)   # held out for validation PSNR / sample grids
    num_workers: int = setting(2, non_negative, at_most(256))


@dataclass
class TrainConfig:
    batch_size: int = setting(8, positive, at_most(1 << 16))   # per process, per micro-step
    grad_accum: int = setting(1, positive)
    max_steps: int = setting(100_000, positive)              # optimizer steps
    lr: float = setting(1e-4, positive)
    lr_warmup_steps: int = setting(0, non_negative)
    lr_schedule: str = setting("constant", one_of("constant", "cosine", "linear"))
    weight_decay: float = setting(0.0, non_negative)
    adam_beta1: float = setting(0.9, fraction(high_open=True))
    adam_beta2: float = setting(0.999, fraction(high_open=True))
    grad_clip: float = setting(1.0, non_negative)            # 0 disables
    mixed_precision: str = setting("auto", one_of("auto", "no", "fp16", "bf16"))   # auto: the accelerate config's
    seed: int = setting(0, non_negative)
    checkpoint_every: int = setting(1000, positive)
    keep_checkpoints: int = setting(3, positive)
    log_every: int = setting(10, positive)
    image_log_every: int = setting(1000, positive)
    val_every: int = setting(1000, positive)
    max_bad_steps: int = setting(20, positive)               # consecutive non-finite steps before aborting
    process_timeout_s: int = setting(1800, positive)         # collective-op timeout: a dead peer ends the run
    # Speed and memory (README "Fast on GPUs"): compile the network's training forward and backward,
    # recompute block activations in the backward pass (stage 2), channels_last tensors, TF32
    # matmuls and convolutions on CUDA, the fused AdamW kernel (CUDA and CPU; it skips bad steps on the device).
    compile: bool = False
    gradient_checkpointing: bool = False
    channels_last: bool = False
    tf32: bool = True
    fused_optimizer: bool = True
    # Stage 2 (iSM's scaling OT): pair noise with data by one assignment minimising the summed squared
    # distance over ot_pool consecutive micro-batches of a process (modules/ot_pairing.py).
    ot_pairing: bool = False
    ot_pool: int = setting(1, positive, at_most(64))


def _check_widths(prefix: str, base: int, mult: tuple[int, ...], groups: int) -> None:
    for m in mult:
        if (base * m) % groups:
            raise fail(f"{prefix}base_channels", f"{base} x {m} is not divisible by {prefix}norm_groups={groups}")


# ----------------------------------------------------------------------------- stage 1

@dataclass
class VAEModelConfig:
    in_channels: int = setting(3, positive, at_most(64))
    base_channels: int = setting(128, positive, at_most(WIDTH_LIMIT))
    channel_mult: tuple[int, ...] = setting((1, 2, 4, 4), non_empty, each(positive, at_most(64)))
    num_res_blocks: int = setting(2, positive, at_most(64))
    latent_channels: int = setting(4, positive, at_most(1024))
    norm_groups: int = setting(32, positive)
    mid_attention: bool = True
    resample: str = setting("conv", one_of("conv", "wavelet"))
    scale_factor: float = setting(1.0, positive)       # latent scale, measured after stage 1 (1 / std)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def check(self, prefix: str) -> None:
        _check_widths(prefix, self.base_channels, self.channel_mult, self.norm_groups)


@dataclass
class VAELossConfig:
    kl_weight: float = setting(1e-6, non_negative)
    perceptual_weight: float = setting(1.0, non_negative)
    perceptual_weights: Optional[str] = None           # local VGG16/LPIPS weights; None disables
    disc_start: int = setting(50_001, non_negative)
    disc_weight: float = setting(0.5, non_negative)
    disc_layers: int = setting(3, positive, at_most(8))
    disc_channels: int = setting(64, positive, at_most(WIDTH_LIMIT))
    disc_lr: float = setting(4.5e-6, positive)


@dataclass
class VAERunConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=4.5e-6, adam_beta1=0.5, adam_beta2=0.9))
    scale_samples: int = setting(256, positive)        # images used to measure the latent scale factor

    def check(self, prefix: str) -> None:
        for switch in ("gradient_checkpointing", "ot_pairing"):
            if getattr(self.train, switch):
                raise fail(f"{prefix}train.{switch}", "is a stage-2 (UNet) switch; the VAE has none")
        f = self.model.downsample_factor
        if self.data.image_size % f:
            raise fail(f"{prefix}data.image_size", f"{self.data.image_size} is not divisible by the VAE's "
                       f"downsampling factor {f} (len(model.channel_mult) - 1 halvings)")


# ----------------------------------------------------------------------------- stage 2

@dataclass
class UNetModelConfig:
    """The stage-2 network. ``arch=unet`` reads in_channels .. resample; ``arch=dit`` reads
    in_channels and patch_size .. time_freq_shift (README "DiT"); both read num_step_levels, step_input
    and guidance_input."""
    in_channels: int = setting(4, positive, at_most(1024))        # set from the VAE's latent channels
    base_channels: int = setting(192, positive, at_most(WIDTH_LIMIT))
    channel_mult: tuple[int, ...] = setting((1, 2, 2, 4, 4, 4), non_empty, each(positive, at_most(64)))
    num_res_blocks: int = setting(2, positive, at_most(64))
    attention_levels: tuple[int, ...] = setting((4, 5), each(non_negative))   # indices into channel_mult
    head_dim: int = setting(32, positive)
    transformer_depth: int = setting(1, positive, at_most(64))
    context_dim: int = setting(256, positive, at_most(WIDTH_LIMIT))   # width of cross-attention tokens
    norm_groups: int = setting(32, positive)
    dropout: float = setting(0.0, fraction(high_open=True))
    resample: str = setting("conv", one_of("conv", "wavelet"))
    num_step_levels: int = setting(0, non_negative, at_most(64))   # shortcut: log2 M + 1 (derived); 0: none
    # The second time input (derived from the objective): "level", the shortcut's integer step level
    # through a table of num_step_levels entries (0: no such input); "interval", MeanFlow's interval
    # length h = s - t in [0, 1], embedded like t (sinusoid of h * 1000, MLP).
    step_input: str = setting("level", one_of("level", "interval"))
    guidance_input: bool = False        # iSM intrinsic guidance: the guidance scale w is an input (derived)
    arch: str = setting("unet", one_of("unet", "dit"))
    # DiT (Peebles & Xie 2023); the defaults are DiT-B/2, the shortcut paper's network.
    patch_size: int = setting(2, one_of(1, 2, 4, 8))              # latent pixels per token side
    hidden_size: int = setting(768, positive, at_most(WIDTH_LIMIT))
    depth: int = setting(12, positive, at_most(256))              # transformer blocks
    num_heads: int = setting(12, positive, at_most(1024))
    mlp_ratio: float = setting(4.0, positive, at_most(64))
    # Time sinusoid spacing: 0 as the DiT code (and the UNet); 1 as diffusers' DiTTransformer2DModel.
    time_freq_shift: int = setting(0, one_of(0, 1))

    def check(self, prefix: str) -> None:
        if self.arch == "dit":
            # The UNet's fields are not read, so they are not checked either.
            if self.hidden_size % self.num_heads:
                raise fail(f"{prefix}num_heads", f"{self.num_heads} does not divide {prefix}hidden_size="
                           f"{self.hidden_size}")
            if self.hidden_size % 4:
                raise fail(f"{prefix}hidden_size", f"must be a multiple of 4 (2-D sine-cosine positions: sin and "
                           f"cos of rows and columns), got {self.hidden_size}")
            if int(self.hidden_size * self.mlp_ratio) < 1:
                raise fail(f"{prefix}mlp_ratio", f"{self.mlp_ratio} x {prefix}hidden_size={self.hidden_size} "
                           "leaves the MLP no hidden unit")
            return
        _check_widths(prefix, self.base_channels, self.channel_mult, self.norm_groups)
        for m in self.channel_mult:
            if (self.base_channels * m) % self.head_dim:
                raise fail(f"{prefix}head_dim", f"{self.head_dim} does not divide the level width "
                           f"{self.base_channels} x {m} ({prefix}base_channels x {prefix}channel_mult)")
        missing = [lvl for lvl in self.attention_levels if lvl >= len(self.channel_mult)]
        if missing:
            raise fail(f"{prefix}attention_levels", f"level(s) {missing} do not exist "
                       f"({prefix}channel_mult has {len(self.channel_mult)} levels)")


@dataclass
class CondConfig:
    type: str = setting("none", one_of("none", "class", "mask", "text"))
    num_classes: int = setting(0, non_negative, at_most(1 << 20))     # set from the data's class folders
    drop: float = setting(0.1, fraction())                            # whole-sample dropout (CFG)
    mask_mode: str = setting("crossattn", one_of("crossattn", "concat", "both"))
    mask_channels: int = setting(64, positive, at_most(WIDTH_LIMIT))  # width of the mask encoder
    image_downsample: int = setting(8, power_of_two, at_most(256))    # image px per latent px; from the VAE
    # Text prompts (README "Text prompts"): a frozen local CLIP text encoder (an SD folder with
    # text_encoder/ + tokenizer/, or one folder holding both); its token embeddings are cached.
    text_encoder: str = ""
    text_layer: str = setting("last", one_of("last", "penultimate"))   # penultimate: SD 2's layer
    text_mode: str = setting("crossattn", one_of("crossattn", "pooled"))   # tokens to cross-attention, or their mean
    caption_column: str = setting("text", non_empty)                  # metadata.jsonl/csv or datasets column
    allow_empty_caption: bool = False                                 # no caption: the empty prompt, not an error
    text_tokens: int = setting(0, non_negative, at_most(4096))        # tokens per caption; from the encoder


@dataclass
class ShortcutConfig:
    # The flow part uses the finest level log2 M. The paper calls it d = 0, the official code
    # d = 1/M: the same embedding index, queried by the finest bootstrap level's teacher and by
    # M-step sampling either way, so there is nothing to switch.
    denoise_timesteps: int = setting(128, power_of_two, at_most(1 << 16))   # M: finest step is 1/M
    bootstrap_fraction: float = setting(0.25, fraction(low_open=True, high_open=True))
    teacher_ema_decay: float = setting(0.95, fraction(high_open=True))      # 0: the online model teaches
    bootstrap_cfg: bool = False
    cfg_scale: float = setting(1.5, non_negative)       # training guidance scale used with bootstrap_cfg
    # iSM (arXiv 2510.21250) intrinsic guidance: the guidance scale w is a network input, drawn per row
    # uniformly from guidance_range; flow targets are guided, w (x1 - x0) + (1 - w) v_uncond, for t in
    # guidance_interval and plain outside it; bootstrap targets ask the teacher at the row's w.
    intrinsic_guidance: bool = False
    guidance_range: tuple[float, float] = setting((1.0, 3.0), scale_range)
    guidance_interval: tuple[float, float] = setting((0.25, 1.0), time_interval)

    @property
    def num_levels(self) -> int:
        """log2 M: bootstrap levels are 0 .. log2 M - 1, the flow rows use level log2 M."""
        return self.denoise_timesteps.bit_length() - 1


@dataclass
class FlowConfig:
    time_sampling: str = setting("uniform", one_of("uniform", "logit_normal"))


@dataclass
class MeanFlowConfig:
    """MeanFlow (Geng et al., arXiv 2505.13447) in this project's time, t = 0 noise, t = 1 data: the
    network learns the average velocity over [t, s], s >= t. The paper's (t, r) are 1 - s, 1 - t here."""
    # t and s: the lower and the higher of two logit-normal draws; the paper's logit-normal(-0.4, 1.0)
    # over its reversed time is logit-normal(+0.4, 1.0) over ours.
    time_mean: float = setting(0.4, at_least(-10), at_most(10))
    time_std: float = setting(1.0, positive, at_most(10))
    equal_fraction: float = setting(0.75, fraction())      # rows with s = t (flow matching); the paper's best
    # Adaptive loss weight 1 / (||delta||^2 + c)^p on each row's squared error summed over its elements.
    loss_power: float = setting(1.0, non_negative, at_most(4))     # p; 0: the plain summed squared error
    loss_eps: float = setting(0.01, positive)                 # c: the official JAX code's (its CIFAR code: 1e-3)
    # Guidance folded into the target (the paper's appendix): v_g = omega v + kappa u(z, t, t | c)
    # + (1 - omega - kappa) u(z, t, t | null) for t in guidance_interval (our time: the paper's [a, b] is
    # [1 - b, 1 - a] here), v elsewhere and on dropped rows.
    omega: float = setting(1.0, non_negative, at_most(100))     # 1 with kappa 0: no guidance
    kappa: float = setting(0.0, fraction(high_open=True))
    guidance_interval: tuple[float, float] = setting((0.0, 1.0), time_interval)

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0


@dataclass
class LatentLossConfig:
    # objective=shortcut: iSM's multi-level Haar wavelet loss on the prediction error, every sub-band
    # weighted equally (modules/wavelet.py: wavelet_loss); 0: the plain mean squared error.
    wavelet_levels: int = setting(0, non_negative, at_most(8))


@dataclass
class DDPMConfig:
    num_timesteps: int = setting(1000, positive, at_most(100_000))
    beta_start: float = setting(0.00085, fraction(low_open=True, high_open=True))
    beta_end: float = setting(0.012, fraction(low_open=True, high_open=True))

    def check(self, prefix: str) -> None:
        if self.beta_start > self.beta_end:
            raise fail(f"{prefix}beta_start", f"{self.beta_start} is above {prefix}beta_end={self.beta_end}")


@dataclass
class EMAConfig:
    decay: float = setting(0.9999, fraction(high_open=True))
    warmup: bool = True                 # decay ramps as min(decay, (1 + n) / (10 + n))


@dataclass
class SampleLogConfig:
    steps: tuple[int, ...] = setting((1, 4, 128), non_empty, each(positive))
    num_images: int = setting(16, positive, at_most(1024))
    cfg_scale: float = setting(1.0, non_negative)


@dataclass
class EvalConfig:
    """Scores during training (README "Evaluation during training")."""
    every: int = setting(5000, non_negative)       # steps between evaluations; 0: never
    reference: str = ""                            # statistics .npz of the real images (evaluate.py stats); "": no FID
    inception: str = ""                            # local inception-2015-12-05.pt
    inception_sha256: str = ""                     # its SHA-256 (a TorchScript file runs code when loaded)
    num_samples: int = setting(2000, positive, at_most(1_000_000))    # generated per step count, over all processes
    steps: tuple[int, ...] = setting((), each(positive))              # (): 1, 4 and the finest the model has
    batch_size: int = setting(64, positive)
    image_size: int = setting(299, positive, at_most(1024))          # what the extractor sees
    val_images: int = setting(0, non_negative)     # latents held out of training for the validation loss; 0: none

    def check(self, prefix: str) -> None:
        if self.reference and not (self.inception and self.inception_sha256):
            raise fail(f"{prefix}inception", "FID during training (eval.reference set) needs eval.inception and "
                       "eval.inception_sha256 (the SHA-256 of that file: it runs code when loaded)")
        if self.every and self.reference and self.num_samples < 2:
            raise fail(f"{prefix}num_samples", f"must be >= 2 for FID (a covariance), got {self.num_samples}")


@dataclass
class UNetRunConfig:
    objective: str = setting("shortcut", one_of("shortcut", "flow", "ddpm", "meanflow"))
    vae: str = ""                       # exported VAE folder or train_vae output dir
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    loss: LatentLossConfig = field(default_factory=LatentLossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=0.1))
    sample: SampleLogConfig = field(default_factory=SampleLogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache_dir: str = ""                 # latent cache; default: <output-dir>/../latent_cache
    init_from: str = ""                 # model.arch=dit: start from a diffusers DiTTransformer2DModel (safetensors)

    @property
    def latent_size(self) -> int:
        return self.data.image_size // self.cond.image_downsample

    @property
    def num_step_levels(self) -> int:
        """Entries of the step-size embedding: levels 0 .. log2 M for shortcut models, none otherwise."""
        return self.shortcut.num_levels + 1 if self.objective == "shortcut" else 0

    @property
    def step_input(self) -> str:
        return "interval" if self.objective == "meanflow" else "level"

    @property
    def guidance_input(self) -> bool:
        return self.objective == "shortcut" and self.shortcut.intrinsic_guidance

    def check(self, prefix: str) -> None:
        self._check_objective_switches(prefix)
        if self.model.arch == "dit" and self.cond.type == "mask" and self.cond.mask_mode != "concat":
            raise fail(f"{prefix}cond.mask_mode", f"model.arch=dit has no cross-attention: it reads masks as "
                       f"concatenated input channels only (cond.mask_mode=concat), got {self.cond.mask_mode}")
        if self.cond.type == "text" and not self.cond.text_encoder:
            raise fail(f"{prefix}cond.text_encoder", "cond.type=text needs a local CLIP text encoder folder (a Stable "
                       "Diffusion folder with text_encoder/ and tokenizer/, or one folder holding both)")
        if self.init_from and self.model.arch != "dit":
            raise fail(f"{prefix}init_from", "loads a diffusers DiT (DiTTransformer2DModel): it needs model.arch=dit")
        if self.cond.type == "mask" and self.cond.mask_mode != "concat" and self.model.context_dim % 4:
            raise fail(f"{prefix}model.context_dim", "mask tokens need a multiple of 4 (2-D sine-cosine "
                       f"positions), got {self.model.context_dim}")
        if self.model.num_step_levels not in (0, self.num_step_levels):
            raise fail(f"{prefix}model.num_step_levels", f"{self.model.num_step_levels} does not fit "
                       f"objective={self.objective} with shortcut.denoise_timesteps={self.shortcut.denoise_timesteps} "
                       f"(expected {self.num_step_levels})")
        # Derived fields: their defaults, or what the objective derives.
        if self.model.step_input not in ("level", self.step_input):
            raise fail(f"{prefix}model.step_input", f"{self.model.step_input} does not fit objective={self.objective} "
                       f"(a continuous interval input is MeanFlow's)")
        if self.model.guidance_input and not self.guidance_input:
            raise fail(f"{prefix}model.guidance_input", "a guidance-scale input needs objective=shortcut with "
                       "shortcut.intrinsic_guidance=true")
        pool_rows = self.train.ot_pool * self.train.batch_size
        if self.train.ot_pairing and pool_rows > OT_POOL_LIMIT:
            raise fail(f"{prefix}train.ot_pool", f"{self.train.ot_pool} micro-batches of train.batch_size="
                       f"{self.train.batch_size} make {pool_rows} rows; one exact assignment is limited to "
                       f"{OT_POOL_LIMIT} (its cost grows as rows^3)")
        problem = guidance_problem(self, self.sample.cfg_scale)
        if problem:
            raise fail(f"{prefix}sample.cfg_scale", problem)
        for key, steps_list in (("sample.steps", self.sample.steps), ("eval.steps", self.eval.steps)):
            for steps in steps_list:
                problem = sampling_problem(self.objective, DEFAULT_SAMPLER[self.objective], steps,
                                           self.shortcut.denoise_timesteps, self.ddpm.num_timesteps)
                if problem:
                    raise fail(f"{prefix}{key}", problem)

    def _check_objective_switches(self, prefix: str) -> None:
        """The MeanFlow and iSM switches against the objective, the condition and the training switches."""
        conditional = self.cond.type != "none"
        if self.objective == "meanflow":
            if self.train.gradient_checkpointing:
                raise fail(f"{prefix}train.gradient_checkpointing", "cannot be used with objective=meanflow: "
                           "torch's checkpointing does not recompute the forward-mode (JVP) tangents")
            if self.train.channels_last and self.model.arch == "unet":
                raise fail(f"{prefix}train.channels_last", "cannot be used with objective=meanflow on the UNet: "
                           "torch's forward-mode (JVP) GroupNorm refuses channels_last tensors")
            if self.meanflow.guided and not conditional:
                raise fail(f"{prefix}meanflow.omega", "guidance (meanflow.omega != 1 or meanflow.kappa != 0) needs "
                           "a conditional model (cond.type=class, mask or text)")
        for key, on in (("shortcut.intrinsic_guidance", self.shortcut.intrinsic_guidance),
                        ("loss.wavelet_levels", self.loss.wavelet_levels > 0)):
            if on and self.objective != "shortcut":
                raise fail(f"{prefix}{key}", f"is a switch of objective=shortcut, got objective={self.objective}")
        if self.shortcut.intrinsic_guidance and self.objective == "shortcut":
            if not conditional:
                raise fail(f"{prefix}shortcut.intrinsic_guidance", "needs a conditional model (cond.type=class, "
                           "mask or text): guidance mixes conditional and unconditional velocities")
            low, high = self.shortcut.guidance_range
            if not low <= 1 <= high:
                raise fail(f"{prefix}shortcut.guidance_range", f"must include 1 (no guidance: what dropped rows, "
                           f"evaluation and the default --cfg-scale use), got {self.shortcut.guidance_range}")
            if self.shortcut.bootstrap_cfg:
                raise fail(f"{prefix}shortcut.bootstrap_cfg", "and shortcut.intrinsic_guidance are two ways to "
                           "train guidance in; choose one")
        guided = {"meanflow": self.meanflow.guided, "shortcut": self.shortcut.intrinsic_guidance
                  or (self.shortcut.bootstrap_cfg and self.shortcut.cfg_scale != 1)}.get(self.objective, False)
        if guided and conditional and self.cond.drop == 0:
            raise fail(f"{prefix}cond.drop", f"must be above 0 for the guidance objective={self.objective} trains "
                       "in: its targets use the unconditional velocity, which only condition dropout trains")

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The step counts FID is measured at: eval.steps, or 1, 4 and the finest the model has."""
        if self.eval.steps:
            return self.eval.steps
        finest = self.shortcut.denoise_timesteps if self.objective == "shortcut" else 128 \
            if self.objective in ("flow", "meanflow") else min(self.ddpm.num_timesteps, 250)
        return tuple(sorted({1, min(4, finest), finest}))


def check_trained(cfg: UNetRunConfig) -> None:
    """Rules for the fields a training run derives from the VAE and the data (``train_unet.derive_fields``):
    checked once they are derived (before training starts) and when a trained model's config is read
    back (exports). The latent size is known only here: the VAE sets ``cond.image_downsample``."""
    if cfg.model.arch == "dit" and cfg.latent_size % cfg.model.patch_size:
        raise fail("model.patch_size", f"{cfg.model.patch_size} does not divide the latent size {cfg.latent_size} "
                   f"(data.image_size={cfg.data.image_size} / the VAE's downsampling factor "
                   f"{cfg.cond.image_downsample})")
    if cfg.cond.type == "text" and cfg.cond.text_tokens < 1:
        raise fail("cond.text_tokens", "a text-conditioned model needs the encoder's token count, got 0")
    if cfg.cond.type == "class" and cfg.cond.num_classes < 1:
        raise fail("cond.num_classes", "a class-conditional model needs at least one class, got 0")
    if cfg.model.num_step_levels != cfg.num_step_levels:
        raise fail("model.num_step_levels", f"{cfg.model.num_step_levels} does not fit objective={cfg.objective} "
                   f"with shortcut.denoise_timesteps={cfg.shortcut.denoise_timesteps} (expected {cfg.num_step_levels})")
    for key, have, expected in (("model.step_input", cfg.model.step_input, cfg.step_input),
                                ("model.guidance_input", cfg.model.guidance_input, cfg.guidance_input)):
        if have != expected:
            raise fail(key, f"{have} does not fit objective={cfg.objective} (expected {expected})")
    levels = cfg.loss.wavelet_levels
    if levels and cfg.latent_size % 2 ** levels:
        raise fail("loss.wavelet_levels", f"{levels} Haar levels halve the latents {levels} times: the latent size "
                   f"{cfg.latent_size} is not divisible by {2 ** levels}")
