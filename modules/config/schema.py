"""Typed run configurations: the run-level sections, and the run configs that compose them with
the sections of the networks and the objectives.

A run's configuration is a tree of dataclasses. Each field is declared with its own rules
(``setting(default, rule, ...)``) and each section may add cross-field rules in ``check``;
:func:`modules.config.io.validate` applies them all, naming the offending key. It runs where a
config is built (the command line, or a saved file read back), and only there: networks,
objectives and samplers trust a validated config. A field without rules has none: nothing is
inherited from its name.

A network's section (``model``) is its own config class, chosen by ``model.arch``
(:data:`modules.core.networks.ARCHITECTURES`); an objective's section is its own config class,
one per registered objective (:data:`modules.core.objectives.OBJECTIVES`). Sizes that follow from
the VAE, the data, the text encoder and the objective are not config fields: :func:`network_sizes`
derives them when a run starts (``Sizes``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

from modules.config import legacy
from modules.config.io import PATH_METADATA
from modules.core.networks import ARCHITECTURES
from modules.core.networks.denoiser import EXTRA_INPUTS, CondConfig, Sizes
from modules.core.networks.unet import UNetConfig
from modules.core.networks.vae import VAEConfig
from modules.core.objectives import OBJECTIVES, build_objective, objective_class
from modules.core.objectives.base import Objective, Teacher
from modules.core.posthoc_ema import sigma_rel_problem
from modules.core.settings import at_most, each, fail, fraction, non_empty, non_negative, one_of, positive, setting
from modules.core.vae_loss import VAELossConfig
from modules.errors import ConfigError

SIZE_LIMIT = 16384          # pixels per side
OT_POOL_LIMIT = 2048        # rows of one train.ot_pairing assignment (O(n^3): about 1.6 s on a CPU core)
# Sanity bounds on counts a user types (rule 5: bounded where parsed), far above any real run and far below
# what overflows: a step count or a period in optimizer steps (10^9 steps at 10 steps/s is three years);
# micro-batches per step and images in one batch or hold-out; seconds a collective may wait (30 days; a
# timedelta overflows at about 10^14 s); sampling steps per image; the seed (torch generators take 64 bits).
STEP_LIMIT = 10 ** 9
COUNT_LIMIT = 1 << 16
TIMEOUT_LIMIT_S = 30 * 24 * 3600
SAMPLE_STEPS_LIMIT = 100_000
SEED_LIMIT = 2 ** 64 - 1


def path_setting(kind: str = "local") -> Any:
    """A field naming a file or a folder (``kind`` "hub": or a hub data set's name), unset when empty. Its
    relative values resolve against where they were given (modules/config/io.py: the current directory, or
    a saved config's run folder), and runs save it absolute."""
    return field(default="", metadata={PATH_METADATA: kind})


@dataclass
class DataConfig:
    path: str = path_setting("hub")     # image folder, save_to_disk folder, hub name, latent store (stage 2)
    split: str = "train"
    image_size: int = setting(256, positive, at_most(SIZE_LIMIT))
    random_crop_scale: float = setting(1.0, fraction(low_open=True))   # < 1: random resized crop, min area
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    num_val_images: int = setting(8, non_negative, at_most(COUNT_LIMIT))   # stage 1's validation PSNR, grids; 0: none
    num_workers: int = setting(2, non_negative, at_most(256))
    streaming: bool = False             # encode.py: read a hub data set as a stream (tar shards always are)


@dataclass
class TrainConfig:
    batch_size: int = setting(8, positive, at_most(COUNT_LIMIT))   # per process, per micro-step
    grad_accum: int = setting(1, positive, at_most(COUNT_LIMIT))
    max_steps: int = setting(100_000, positive, at_most(STEP_LIMIT))   # optimizer steps
    lr: float = setting(1e-4, positive)
    lr_warmup_steps: int = setting(0, non_negative, at_most(STEP_LIMIT))
    lr_schedule: str = setting("constant", one_of("constant", "cosine", "linear"))
    weight_decay: float = setting(0.0, non_negative)
    adam_beta1: float = setting(0.9, fraction(high_open=True))
    adam_beta2: float = setting(0.999, fraction(high_open=True))
    grad_clip: float = setting(1.0, non_negative)            # 0 disables
    mixed_precision: str = setting("auto", one_of("auto", "no", "fp16", "bf16"))   # auto: the accelerate config's
    seed: int = setting(0, non_negative, at_most(SEED_LIMIT))
    checkpoint_every: int = setting(1000, positive, at_most(STEP_LIMIT))
    keep_checkpoints: int = setting(3, positive, at_most(COUNT_LIMIT))
    log_every: int = setting(10, positive, at_most(STEP_LIMIT))
    image_log_every: int = setting(1000, positive, at_most(STEP_LIMIT))
    val_every: int = setting(1000, positive, at_most(STEP_LIMIT))
    max_bad_steps: int = setting(20, positive, at_most(STEP_LIMIT))   # consecutive non-finite steps before aborting
    # collective-op timeout: a dead peer ends the run
    process_timeout_s: int = setting(1800, positive, at_most(TIMEOUT_LIMIT_S))
    # Speed and memory (README "Fast on GPUs"): compile the network's training forward and backward,
    # recompute block activations in the backward pass (stage 2), channels_last tensors, TF32
    # matmuls and convolutions on CUDA, the fused AdamW kernel (CUDA and CPU; it skips bad steps on the device).
    compile: bool = False
    gradient_checkpointing: bool = False
    channels_last: bool = False
    tf32: bool = True
    fused_optimizer: bool = True
    # Stage 2 (iSM's scaling OT): pair noise with data by an assignment minimising the summed squared
    # distance over ot_pool consecutive micro-batches of a process, within each class of a class-conditional
    # model; refused with masks and prompts (modules/core/ot_pairing.py).
    ot_pairing: bool = False
    ot_pool: int = setting(1, positive, at_most(64))


def variant(choices: dict[str, type], default: str) -> Any:
    """A section whose class is chosen by its ``arch`` key among ``choices`` (modules.config.io switches it)."""
    return field(default_factory=choices[default], metadata={"variants": choices})


NETWORK_CONFIGS = {name: network.Config for name, network in ARCHITECTURES.items()}


# ----------------------------------------------------------------------------- stage 1

@dataclass
class VAERunConfig:
    model: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=4.5e-6, adam_beta1=0.5, adam_beta2=0.9))
    scale_samples: int = setting(256, positive, at_most(COUNT_LIMIT))   # images used to measure the latent scale factor
    other_paths: ClassVar[tuple[str, ...]] = ("loss.perceptual_weights",)   # path fields of sections declared in core/

    def check(self, prefix: str) -> None:
        for switch in ("gradient_checkpointing", "ot_pairing"):
            if getattr(self.train, switch):
                raise fail(f"{prefix}train.{switch}", "is a stage-2 (train_unet.py) switch; the VAE has none")
        f = self.model.downsample_factor
        if self.data.image_size % f:
            raise fail(f"{prefix}data.image_size", f"{self.data.image_size} is not divisible by the VAE's "
                       f"downsampling factor {f} (len(model.channel_mult) - 1 halvings)")
        # The PatchGAN (NLayerDiscriminator.min_input_size): loss.disc_layers 4x4 stride-2 convolutions halve the
        # images, then two 4x4 stride-1 ones remove a pixel each, and one logit must be left.
        layers = self.loss.disc_layers
        smallest = 3 * 2 ** layers
        if self.data.image_size < smallest:
            raise fail(f"{prefix}loss.disc_layers", f"{layers} discriminator layers halve the images {layers} times "
                       f"and need images of at least {smallest}x{smallest} px; data.image_size={self.data.image_size} (set "
                       f"loss.disc_layers={max(1, (self.data.image_size // 3).bit_length() - 1)} or larger images)")


# ----------------------------------------------------------------------------- stage 2


POSTHOC_EMAS_LIMIT = 8      # ema.posthoc_sigma_rels: each is one more float32 copy of the weights on every device


@dataclass
class EMAConfig:
    decay: float = setting(0.9999, fraction(high_open=True))
    warmup: bool = True                 # decay ramps as min(decay, (1 + n) / (10 + n))
    # Post-hoc EMA (EDM2; README "Post-hoc EMA"): power-function EMAs of these lengths are tracked and their weights
    # saved every posthoc_every steps (and at the last) in posthoc_ema/; posthoc_ema.py makes any length from them.
    posthoc: bool = False
    posthoc_sigma_rels: tuple[float, ...] = setting((0.05, 0.10), non_empty, each(sigma_rel_problem))
    posthoc_every: int = setting(1000, positive, at_most(STEP_LIMIT))

    def check(self, prefix: str) -> None:
        lengths = self.posthoc_sigma_rels
        if len(set(lengths)) != len(lengths) or len(lengths) > POSTHOC_EMAS_LIMIT:
            raise fail(f"{prefix}posthoc_sigma_rels", f"must be distinct lengths, at most {POSTHOC_EMAS_LIMIT} "
                       f"(each is a copy of the weights on every device), got {lengths}")


@dataclass
class SampleLogConfig:
    steps: tuple[int, ...] = setting((1, 4, 128), non_empty, each(positive, at_most(SAMPLE_STEPS_LIMIT)))
    num_images: int = setting(16, positive, at_most(1024))
    cfg_scale: float = setting(1.0, non_negative)


@dataclass
class EvalConfig:
    """Scores during training (README "Evaluation during training")."""
    every: int = setting(5000, non_negative, at_most(STEP_LIMIT))   # steps between evaluations; 0: never
    reference: str = path_setting()                # statistics .npz of the real images (evaluate.py stats); "": no FID
    inception: str = path_setting()                # local inception-2015-12-05.pt
    inception_sha256: str = ""                     # its SHA-256 (a TorchScript file runs code when loaded)
    num_samples: int = setting(2000, positive, at_most(1_000_000))    # generated per step count, over all processes
    steps: tuple[int, ...] = setting((), each(positive, at_most(SAMPLE_STEPS_LIMIT)))   # (): 1, 4 and the finest
    batch_size: int = setting(64, positive, at_most(COUNT_LIMIT))
    image_size: int = setting(299, positive, at_most(1024))          # what the extractor sees
    # latents held out of training for the validation loss; 0: none
    val_images: int = setting(0, non_negative, at_most(COUNT_LIMIT))

    def check(self, prefix: str) -> None:
        if self.reference and not (self.inception and self.inception_sha256):
            raise fail(f"{prefix}inception", "FID during training (eval.reference set) needs eval.inception and "
                       "eval.inception_sha256 (the SHA-256 of that file: it runs code when loaded)")
        if self.every and self.reference and self.num_samples < 2:
            raise fail(f"{prefix}num_samples", f"must be >= 2 for FID (a covariance), got {self.num_samples}")


@dataclass
class LatentNormConfig:
    """How stage 2 normalises the VAE's latents (README "Latent normalisation")."""
    # vae: as the VAE's config says (scale_factor; its shift_factor or per-channel statistics when it has them).
    # channel: (z - mean) * scale / std per channel, mean and std as given here or measured over the training
    # latents (mean and std of their posteriors, over `rows` rows spread over the data).
    mode: str = setting("vae", one_of("vae", "channel"))
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = setting((), each(positive))
    scale: float = setting(1.0, positive)       # the normalised latents' std (EDM2 uses 0.5)
    rows: int = setting(10_000, positive, at_most(1 << 24))

    def check(self, prefix: str) -> None:
        if bool(self.mean) != bool(self.std):
            raise fail(f"{prefix}{'std' if self.mean else 'mean'}", "per-channel statistics need both "
                       f"{prefix}mean and {prefix}std (or neither: measured over the data)")
        if self.mean and len(self.mean) != len(self.std):
            raise fail(f"{prefix}std", f"{len(self.std)} values for the {len(self.mean)} of {prefix}mean")
        if self.mode == "vae" and (self.mean or self.scale != 1.0):
            raise fail(f"{prefix}mode", f"is 'vae' (the VAE's own normalisation): {prefix}mean, {prefix}std and "
                       f"{prefix}scale apply to {prefix}mode=channel")


@dataclass
class UNetRun:
    """The sections of every stage-2 run; :data:`UNetRunConfig` adds one section per registered objective."""
    objective: str = setting("shortcut", one_of(*OBJECTIVES))
    vae: str = path_setting()           # exported VAE folder or train_vae output dir
    model: UNetConfig = variant(NETWORK_CONFIGS, "unet")      # model.arch: unet or dit
    cond: CondConfig = field(default_factory=CondConfig)
    latent_norm: LatentNormConfig = field(default_factory=LatentNormConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=0.1))
    sample: SampleLogConfig = field(default_factory=SampleLogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache_dir: str = path_setting()     # the run's latent stores; default: <output-dir>/../latent_cache
    init_from: str = path_setting()     # model.arch=dit: start from a diffusers DiT or a DiT/SiT/REPA/MeanFlow .pt

    upgrade = staticmethod(legacy.upgrade)     # saved configs of the earlier layout read as today's
    other_paths: ClassVar[tuple[str, ...]] = ("cond.text_encoder",)   # path fields of sections declared in core/

    @property
    def objective_class(self) -> type[Objective]:
        return objective_class(self.objective)

    @property
    def objective_cfg(self):
        """The objective's own section (``shortcut``, ``flow``, ...)."""
        return getattr(self, self.objective)

    def build_objective(self, teacher: Optional[Teacher] = None) -> Objective:
        """The objective this run trains; ``teacher`` runs its teacher (None: the online network teaches, for
        an objective that has one). Condition dropout applies to conditional models only."""
        cond_drop = self.cond.drop if self.cond.type != "none" else 0.0
        return build_objective(self.objective, self.objective_cfg, cond_drop, teacher)

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The step counts FID is measured at: eval.steps, or the objective's (1, 4 and the finest)."""
        return self.eval.steps or self.objective_class.eval_steps(self.objective_cfg)

    def sampling_problem(self, sampler: Optional[str], steps: int) -> Optional[str]:
        """Why this model cannot be sampled with ``sampler`` (None: its default) in ``steps`` steps, or None."""
        cls = self.objective_class
        return cls.sampling_problem(self.objective_cfg, sampler or cls.samplers[0], steps)

    def guidance_problem(self, scale: float) -> Optional[str]:
        """Why this model cannot be sampled at guidance ``scale``: the objective's rule (a scale it takes as
        an input must be in its trained range), or None."""
        return self.objective_class.guidance_problem(self.objective_cfg, scale)

    def sampling_guidance(self, scale: Optional[float], interval: Optional[Sequence[float]]
                          ) -> tuple[float, Optional[tuple[float, float]]]:
        """The guidance scale and interval to sample at: the ones given, else the objective's (1 and none, but
        for objective=imf ``imf.sample_scale`` and ``imf.sample_interval``); the interval stays None for a
        model that takes none."""
        cls, section = self.objective_class, self.objective_cfg
        default = cls.default_guidance_interval(section)
        return (cls.default_guidance(section) if scale is None else float(scale),
                default if interval is None or default is None else (float(interval[0]), float(interval[1])))

    def guidance_interval_problem(self, interval: Sequence[float]) -> Optional[str]:
        """Why this model cannot be sampled with the guidance ``interval`` (this project's time), or None."""
        return self.objective_class.guidance_interval_problem(self.objective_cfg, tuple(interval))

    def unconditional_problem(self, scale: float) -> Optional[str]:
        """Why guidance ``scale`` cannot be applied because the model never learnt the unconditional
        prediction, or None. Asked where images are requested (sample.py, evaluate.py sweep), not of saved
        configs, so a model trained so still loads and samples at scale 1."""
        intrinsic = self.objective_class.network_inputs(self.objective_cfg).guidance
        if not intrinsic and scale != 1 and self.cond.type != "none" and self.cond.drop == 0:
            return (f"guidance scale {scale} needs the unconditional prediction, and this model was trained with "
                    "cond.drop=0 (no condition dropout), so it has none")
        return None

    def check(self, prefix: str) -> None:
        objective = self.objective_class
        objective.check(self.objective_cfg, self, prefix)
        for name, other in OBJECTIVES.items():
            if name == self.objective:
                continue
            section, defaults = getattr(self, name), other.Config()
            for switch in other.switches:
                if getattr(section, switch) != getattr(defaults, switch):
                    raise fail(f"{prefix}{name}.{switch}", f"is a switch of objective={name}, got "
                               f"objective={self.objective}")
        conditional = self.cond.type != "none"
        if objective.trains_guidance(self.objective_cfg) and conditional and self.cond.drop == 0:
            raise fail(f"{prefix}cond.drop", f"must be above 0 for the guidance objective={self.objective} trains "
                       "in: its targets use the unconditional velocity, which only condition dropout trains")
        network = ARCHITECTURES[self.model.arch]
        problem = network.condition_problem(self.model, self.cond)
        if problem:
            raise fail(f"{prefix}{problem[0]}", problem[1])
        inputs = objective.network_inputs(self.objective_cfg)
        needed = [name for name in EXTRA_INPUTS if getattr(inputs, name)]
        if any(name not in network.extra_inputs for name in needed):
            able = [arch for arch, cls in ARCHITECTURES.items() if all(n in cls.extra_inputs for n in needed)]
            raise fail(f"{prefix}model.arch", f"objective={self.objective} needs a network that embeds "
                       f"{', '.join(needed)}: model.arch={' or '.join(able)}, got {self.model.arch}")
        if self.cond.type == "text" and not self.cond.text_encoder:
            raise fail(f"{prefix}cond.text_encoder", "cond.type=text needs a local CLIP text encoder folder (a Stable "
                       "Diffusion folder with text_encoder/ and tokenizer/, or one folder holding both)")
        if self.init_from and self.model.arch != "dit":
            raise fail(f"{prefix}init_from", "loads a DiT (diffusers' DiTTransformer2DModel, or the DiT/SiT code's "
                       "state dict): it needs model.arch=dit")
        if self.train.ot_pairing and self.cond.type in ("mask", "text"):
            raise fail(f"{prefix}train.ot_pairing", f"cannot pair noise with {self.cond.type}-conditioned data: "
                       "pairing runs within each class, so that the noise of every condition stays N(0, I) as "
                       f"sampling draws it, and {'masks' if self.cond.type == 'mask' else 'prompts'} have no classes "
                       "(use it with cond.type=class or none)")
        pool_rows = self.train.ot_pool * self.train.batch_size
        if self.train.ot_pairing and pool_rows > OT_POOL_LIMIT:
            raise fail(f"{prefix}train.ot_pool", f"{self.train.ot_pool} micro-batches of train.batch_size="
                       f"{self.train.batch_size} make {pool_rows} rows; one exact assignment is limited to "
                       f"{OT_POOL_LIMIT} (its cost grows as rows^3)")
        problem = self.guidance_problem(self.sample.cfg_scale)
        if problem:
            raise fail(f"{prefix}sample.cfg_scale", problem)
        for key, steps_list in (("sample.steps", self.sample.steps), ("eval.steps", self.eval.steps)):
            for steps in steps_list:
                problem = self.sampling_problem(None, steps)
                if problem:
                    raise fail(f"{prefix}{key}", problem)


UNetRunConfig = dataclasses.make_dataclass(
    "UNetRunConfig", [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in OBJECTIVES.items()],
    bases=(UNetRun,), namespace={"__module__": __name__,
                                 "__doc__": "A stage-2 run: the sections of :class:`UNetRun` and one per objective."})


# ----------------------------------------------------------------------------- derived sizes

def network_sizes(cfg: UNetRun, vae: VAEConfig, num_classes: int = 0, text_tokens: int = 0,
                  text_width: int = 0) -> Sizes:
    """What the network of ``cfg`` is built for, from the VAE's config, the data's class count and the text
    encoder's tokens and width; checked (:func:`sizes_problem`) before anything is trained."""
    if cfg.cond.type == "class" and num_classes < 2:
        raise ConfigError(f"cond.type=class needs class sub-folders (or a label column) in {cfg.data.path}; "
                          f"found {num_classes} class(es)")
    text = cfg.cond.type == "text"
    sizes = Sizes(latent_channels=vae.latent_channels, latent_size=cfg.data.image_size // vae.downsample_factor,
                  image_downsample=vae.downsample_factor, num_classes=num_classes if cfg.cond.type == "class" else 0,
                  text_tokens=text_tokens if text else 0, text_width=text_width if text else 0,
                  inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))
    problem = sizes_problem(cfg, sizes)
    if problem:
        raise ConfigError(problem)
    return sizes


def sizes_problem(cfg: UNetRun, sizes: Sizes) -> Optional[str]:
    """Why a network of ``cfg`` cannot be built for ``sizes`` (as derived by :func:`network_sizes`, or as an
    export recorded them), or None."""
    size, factor = cfg.data.image_size, sizes.image_downsample
    if size % factor or size // factor != sizes.latent_size:
        return (f"data.image_size={cfg.data.image_size} does not give {sizes.latent_size}x{sizes.latent_size} latents "
                f"with the VAE's downsampling factor {sizes.image_downsample}")
    problem = cfg.model.size_problem(sizes) or cfg.objective_class.sizes_problem(cfg.objective_cfg, sizes)
    if problem:
        return f"{problem} (data.image_size={cfg.data.image_size} / the VAE's factor {sizes.image_downsample})"
    expected = cfg.objective_class.network_inputs(cfg.objective_cfg)
    if sizes.inputs != expected:
        return f"the network's inputs {sizes.inputs} do not fit objective={cfg.objective} (expected {expected})"
    if cfg.cond.type == "class" and sizes.num_classes < 1:
        return "a class-conditional model needs at least one class, got 0"
    if cfg.cond.type == "text" and (sizes.text_tokens < 1 or sizes.text_width < 1):
        return (f"a text-conditioned model needs the encoder's tokens and width, got "
                f"{sizes.text_tokens} x {sizes.text_width}")
    return None
