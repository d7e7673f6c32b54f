"""Generate images with a trained stage-2 network (UNet or DiT, EMA weights) and its VAE.

    python sample.py --unet runs/unet --out samples --num-samples 64 --steps 1
    python sample.py --unet runs/unet --out samples --steps 4 --class-label 2 --cfg-scale 1.5 --grid
    python sample.py --unet runs/unet --out samples --masks my_masks/ --steps 1
    python sample.py --unet runs/unet --out samples --prompt "a red circle on a striped background" --num-samples 4
    python sample.py --unet runs/unet --out samples --prompts prompts.txt --num-samples 2 --cfg-scale 2
    python sample.py --unet runs/imf --out samples --steps 1 --cfg-scale 8 --guidance-interval 0.35 0.60

    accelerate launch sample.py --unet runs/unet --out s1 --num-samples 50000 --steps 1 --npz

Writes one PNG per image and ``manifest.jsonl`` (one JSON line per image: index, file, seed,
steps, sampler, guidance (and the guidance interval, for a model that takes one), condition; see
modules/run/sample_folder.py). Image i depends only on
(--seed, i), its condition and the batch's size: every batch has exactly --batch-size rows (a
short last batch is padded) and each prompt is encoded alone, so neither the number of processes
nor an interruption changes a byte of the result; another --batch-size gives the same images
within rounding (a grey level). Under ``accelerate launch`` each process makes its share. Killed
and run again with the same command, it keeps the finished images and makes only the rest.

--out is claimed for the whole run (``modules.durable.claim_output``: one sample.py at a time, never
a model folder, a training run's export or a data folder); the request it records is keyed by the
content of its conditions (the masks' pixels as read, the prompts' text).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from modules.config.cli import run_cli
from modules.config.io import diff_fields
from modules.config.schema import SAMPLE_STEPS_LIMIT
from modules.core.generation import GenerationSpec, compiled_for_sampling, decode_latents, generate_latents
from modules.core.objectives import SAMPLERS
from modules.core.seeding import image_seed, mix_seed
from modules.data.image_io import UnreadableImage, find_images, image_tensor, mask_tensor, save_png, tile, to_uint8
from modules import durable
from modules.durable import WRITE_ERRORS, write_failure
from modules.errors import CheckpointError, ConfigError, ModelFolderError
from modules.interop.clip import TextEncoder, warn_truncated
from modules.interop.vae import load_vae
from modules.run.accelerator import finish, from_main_process, process_state
from modules.run.export import (find_model_folder, load_network, read_config, read_network_export, training_vae,
                                vae_identity, weights_digest, with_latent_norm)
from modules.run.sample_folder import MANIFEST, SampleFolder, batches, out_problem, pending

logger = logging.getLogger("sample")
GRID_MAX = 256
MAX_SAMPLES = 10 ** 7  # a sanity bound: a typo's extra zeros should not start a week-long run
# Bounds of the other numbers a user types (issue 21, rule 5), far above any real use: network evaluations
# per image (SAMPLE_STEPS_LIMIT, the config's bound of sample.steps), rows of one batch, and the seed (every
# bit of it counts: modules.core.seeding.image_seed mixes them all).
MAX_BATCH = 1 << 16
SEED_BITS = 128
MAX_PROMPT_CHARS = 100_000   # one line of --prompts (the text encoder reads its first 77 tokens or so)
LABEL_STREAM = 2        # --class-label random: the labels' own random stream


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", required=True, help="exported network folder (UNet or DiT), or a train_unet.py output "
                   "dir (uses its unet_ema/ export)")
    p.add_argument("--vae", default=None, help="VAE folder or train_vae.py output dir (default: the one the network "
                   "recorded)")
    p.add_argument("--out", required=True, help="output folder for PNGs and manifest.jsonl")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="network evaluations per image (shortcut: a power of two)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: shortcut / euler / meanflow / ddim by objective")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance w (1 = conditional "
                   "only; default: the model's, 1 but for iMF's imf.sample_scale); a model trained with "
                   "shortcut.intrinsic_guidance or objective=imf takes w as an input, in one forward")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="objective=imf: the guidance interval the network is given, in this toolkit's time (t = 0 "
                        "noise, t = 1 data; the paper's [a, b] is [1 - b, 1 - a] here); default: the model's "
                        "imf.sample_interval")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class-label", default=None,
                      help="a class number, 'all' (classes in turn, the default) or 'random' (drawn by seed)")
    cond.add_argument("--masks", default=None, help="folder of mask images: one sample per mask, named by its stem")
    cond.add_argument("--prompt", default=None, help="text-conditioned model: --num-samples images of this prompt")
    cond.add_argument("--prompts", default=None, help="text-conditioned model: a file of prompts, one per line, "
                      "--num-samples images each")
    p.add_argument("--text-encoder", default=None, help="text-conditioned model: the text encoder folder "
                   "(default: the one the network recorded; it must be the same encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--grid", action="store_true", help=f"also write grid.png (of the first {GRID_MAX} images)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz: every image in one uint8 NHWC "
                   "array arr_0 (the ADM evaluation suite's format)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing files in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and compute (auto: bfloat16 on CUDA, float32 elsewhere); latents accumulate in float32")
    p.add_argument("--compile", action="store_true",
                   help='torch.compile the network and the VAE decoder (mode="reduce-overhead": CUDA graphs on a GPU); '
                        "the first batch, and a last smaller one, wait for the compiler")
    return p


class Masks:
    """The mask files of --masks, read exactly as training reads them (``mask_tensor``), decoded when a batch
    needs them (issue 21, rule 5: memory does not grow with their number). ``masks[i]`` is mask i
    ``[1, S, S]``; ``sha256`` is the identity of their names and pixels as read, taken at start-up, where
    every file is decoded once (an unreadable one is refused before any image is made) and dropped."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size
        h = hashlib.sha256()
        self._digests = bytearray()     # 8 bytes of each mask's own: a file changed while sampling is refused
        for f in files:
            one = self._digest(self._decode(f))
            h.update(f.stem.encode("utf-8", "surrogateescape") + b"\0" + one)
            self._digests += one[:8]
        self.sha256 = h.hexdigest()

    @staticmethod
    def _digest(mask: torch.Tensor) -> bytes:
        return hashlib.sha256(mask.numpy().tobytes()).digest()

    def _decode(self, f: Path) -> torch.Tensor:
        try:
            return mask_tensor(f, self.size)
        except UnreadableImage as e:
            raise ConfigError(f"--masks: cannot read {f} ({e})") from None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), 1, self.size, self.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        mask = self._decode(self.files[i])
        if self._digest(mask)[:8] != self._digests[8 * i: 8 * i + 8]:
            raise ConfigError(f"--masks: {self.files[i]} changed while sampling; run the command again")
        return mask


def load_masks(folder: Path, image_size: int) -> tuple[list[str], Masks]:
    """The masks of --masks (see :class:`Masks`), one sample per file, named by stem."""
    if not folder.is_dir():
        raise ConfigError(f"--masks {folder}: not a folder")
    files = find_images(folder, recursive=False)
    if not files:
        raise ConfigError(f"--masks {folder}: no mask images found")
    if len(files) > MAX_SAMPLES:
        raise ConfigError(f"--masks {folder}: {len(files)} masks, at most {MAX_SAMPLES} (one image each) in one folder")
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(f.stem.lower(), []).append(f.name)
    clashes = [names for names in by_name.values() if len(names) > 1]
    if clashes:
        raise ConfigError(f"--masks {folder}: {', '.join(clashes[0])} would write the same output file "
                          f"({len(clashes)} such clash(es)); rename them")
    return [f.stem for f in files], Masks(files, image_size)


def conditions_identity(masks: Optional[Masks], prompts: Optional[list[str]]) -> Optional[str]:
    """The identity of the request's conditions' content (issue 21, rule 1): the masks' names and pixels as
    read, or every prompt's text; None for classes (their labels are in the request itself)."""
    if masks is not None:
        return masks.sha256
    if prompts is not None:
        return durable.fingerprint(prompts)
    return None


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def load_models(args, device):
    net_folder = find_model_folder(args.unet, "unet_ema")
    export = read_network_export(net_folder)
    recorded = export.vae
    # The training run's own copy first (the VAE it came from may have trained on since), also when the run moved.
    vae_path = args.vae or training_vae(net_folder, recorded)
    if not Path(vae_path).exists():
        raise ModelFolderError(f"VAE {vae_path} does not exist; pass --vae")
    vae_folder = find_model_folder(vae_path, "vae")
    vae = load_vae(vae_folder)
    vae_model = dataclasses.asdict(vae.config)
    if isinstance(recorded.get("model"), dict):
        structural = ["in_channels", "base_channels", "channel_mult", "num_res_blocks", "latent_channels",
                      "resample", "scale_factor"]
        mismatch = diff_fields({k: recorded["model"].get(k) for k in structural},
                               {k: vae_model.get(k) for k in structural})
        if mismatch:
            raise ModelFolderError(f"VAE {vae_folder} does not match the one the network was trained with: "
                                   + "; ".join(mismatch))
    if recorded.get("identity") and vae_identity(vae) != recorded["identity"]:
        raise ModelFolderError(f"VAE {vae_folder} has other weights than the one the network was trained with "
                               f"(identity {vae_identity(vae)[:16]}, recorded {recorded['identity'][:16]})")
    if vae.config.latent_channels != export.sizes.latent_channels:
        raise ModelFolderError(f"VAE {vae_folder} has {vae.config.latent_channels} latent channels, "
                               f"the network expects {export.sizes.latent_channels}")
    vae = with_latent_norm(vae, recorded.get("latent_norm"), net_folder / "config.json")   # the run's latent_norm
    return load_network(net_folder, export).to(device), vae.to(device).eval(), export, net_folder


def condition_flags_problem(args, cond_type: str, num_classes: int, net_folder) -> Optional[str]:
    """What is wrong with the condition flags (--class-label, --masks, --prompt, --prompts) for a model
    conditioned on ``cond_type``, or None. ``evaluate.py sweep`` asks this before anything is sampled."""
    prompt_flag = "--prompts" if args.prompts is not None else "--prompt" if args.prompt is not None else None
    for flag, given, wanted in ((prompt_flag, prompt_flag is not None, "text"),
                                ("--masks", args.masks is not None, "mask"),
                                ("--class-label", args.class_label is not None, "class")):
        if given and cond_type != wanted:
            return f"{flag}: {net_folder} is a '{cond_type}'-conditioned model, not {wanted}-conditioned"
    if cond_type == "text" and prompt_flag is None:
        return f"{net_folder} is text-conditioned: pass --prompt TEXT or --prompts FILE"
    if cond_type == "mask" and args.masks is None:
        return f"{net_folder} is mask-conditioned: pass --masks DIR"
    if args.class_label not in (None, "all", "random") and not 0 <= int(args.class_label) < num_classes:
        return f"--class-label {args.class_label}: the model knows classes 0..{num_classes - 1}"
    return None


def read_prompts(args) -> Optional[list[str]]:
    """The prompts of --prompt or --prompts FILE, or None. One line of the file is one prompt: lines end at
    '\\n' only (not at U+2028, U+0085 or a form feed, where str.splitlines() would split), a '\\r' before it
    is dropped, blank lines are skipped. Read a line at a time, and at most as many prompts as
    --num-samples each may make within MAX_SAMPLES images, each of at most MAX_PROMPT_CHARS characters."""
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts is None:
        return None
    limit = MAX_SAMPLES // max(1, args.num_samples)
    prompts = []
    try:
        with open(args.prompts, encoding="utf-8", newline="\n") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_PROMPT_CHARS + 1), ""), 1):
                if len(line) > MAX_PROMPT_CHARS and not line.endswith("\n"):
                    raise ConfigError(f"--prompts {args.prompts}: line {number} is longer than {MAX_PROMPT_CHARS} "
                                      "characters (one prompt per line)")
                prompt = line.rstrip("\n").rstrip("\r").strip()
                if prompt:
                    if len(prompts) == limit:
                        raise ConfigError(f"--prompts {args.prompts}: more than {limit} prompts; at most "
                                          f"{MAX_SAMPLES} images ({args.num_samples} per prompt) in one folder")
                    prompts.append(prompt)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {args.prompts}: cannot be read as UTF-8 text ({e})") from None
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts}: no prompt in the file (one prompt per line)")
    return prompts


def load_text_encoder(args, export, net_folder: Path, device):
    """The text encoder a text-conditioned network was trained with (recorded in its export), checked by identity."""
    recorded = export.text_encoder
    path = args.text_encoder or recorded.get("path")
    if not Path(path).exists():
        raise ModelFolderError(f"text encoder {path} (recorded by {net_folder}) does not exist; pass --text-encoder")
    encoder = TextEncoder(path, export.config.cond.text_layer, device)
    if encoder.identity != recorded["identity"]:
        raise ModelFolderError(f"text encoder {path} is not the one {net_folder} was trained with (identity "
                               f"{encoder.identity[:16]}, recorded {recorded['identity'][:16]})")
    return encoder


def parse_class_label(value: Optional[str]) -> Optional[str]:
    """--class-label as given, when it is 'all', 'random' or a class number (ASCII digits: str.isdigit()
    takes '²' and '١', which int() does not), else a one-line ConfigError."""
    if value in (None, "all", "random") or re.fullmatch(r"-?[0-9]{1,18}", value, flags=re.ASCII):
        return value
    raise ConfigError(f"--class-label {_shown(value)}: expected a class number (0, 1, ...), 'all' (classes in turn) "
                      "or 'random' (drawn by seed)")


def _shown(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def check_numbers(args) -> None:
    """Every number on the command line within its bounds (issue 21, rule 5), before anything is loaded."""
    for flag, value, low, high in (("--num-samples", args.num_samples, 1, MAX_SAMPLES),
                                   ("--batch-size", args.batch_size, 1, MAX_BATCH),
                                   ("--steps", args.steps, 1, SAMPLE_STEPS_LIMIT),
                                   ("--seed", args.seed, 0, 2 ** SEED_BITS - 1)):
        if not low <= value <= high:
            bound = f"2^{SEED_BITS} - 1" if flag == "--seed" else str(high)
            extra = (" (split larger sets over several --out folders with different --seed)"
                     if flag == "--num-samples" and value > high else "")
            raise ConfigError(f"{flag} {_shown(value)}: must be at least {low} and at most {bound}{extra}")
    if not 0 <= args.eta <= 1:
        raise ConfigError(f"--eta {args.eta}: must be in [0, 1]")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise ConfigError(f"--cfg-scale {args.cfg_scale}: must be a finite number")
    if args.guidance_interval is not None and not all(map(math.isfinite, args.guidance_interval)):
        raise ConfigError(f"--guidance-interval {' '.join(map(str, args.guidance_interval))}: must be finite numbers")


def encode_prompts(encoder: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """The embeddings of a batch's prompts, each distinct prompt encoded alone: an image's condition does not
    depend on which other prompts share its batch (nor does a batch encode a prompt twice)."""
    alone = {p: encoder.encode([p])[0] for p in dict.fromkeys(prompts)}
    return torch.stack([alone[p] for p in prompts])


def claim_out(out: Path, folder: SampleFolder, overwrite: bool, file_of):
    """Main process: (the lock of --out, its finished images) or (None, why it cannot be used). The lock
    (``durable.claim_output``) is held until the run ends: a second sample.py on the folder is refused."""
    try:
        problem = out_problem(out) or folder.foreign()
    except OSError as e:        # a name too long, a folder that cannot be listed ...
        problem = f"--out {out}: cannot use it ({write_failure(e)})"
    if problem:
        return None, problem
    try:
        lock = durable.claim_output(out, "samples")
    except CheckpointError as e:
        return None, str(e)
    try:
        return lock, folder.open(overwrite, file_of)
    except ConfigError as e:
        lock.release()
        return None, str(e)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.class_label = parse_class_label(args.class_label)
    check_numbers(args)
    state = process_state()
    device = state.device if state.num_processes > 1 else parse_device(args.device)
    net, vae, export, net_folder = load_models(args, device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    net.to(dtype)
    vae.to(dtype)
    spec = GenerationSpec.of(export.config, export.sizes)
    sampler = args.sampler or export.config.objective_class.samplers[0]
    problem = export.config.sampling_problem(sampler, args.steps)
    if problem:
        raise ConfigError(f"--sampler {sampler} --steps {args.steps}: {problem}")
    if spec.cond_type == "none" and args.cfg_scale not in (None, 1.0):
        logger.warning("--cfg-scale %s ignored: %s is an unconditional model", args.cfg_scale, net_folder)
    if args.guidance_interval is not None:
        problem = export.config.guidance_interval_problem(args.guidance_interval)
        if problem:
            raise ConfigError(f"--guidance-interval {' '.join(f'{v:g}' for v in args.guidance_interval)}: {problem}")
    # From here on both are what the images are made with: given, or the model's defaults.
    args.cfg_scale, args.guidance_interval = export.config.sampling_guidance(args.cfg_scale, args.guidance_interval)
    problem = export.config.guidance_problem(args.cfg_scale) or export.config.unconditional_problem(args.cfg_scale)
    if problem:
        raise ConfigError(f"--cfg-scale {args.cfg_scale}: {problem}")

    problem = condition_flags_problem(args, spec.cond_type, spec.num_classes, net_folder)
    if problem:
        raise ConfigError(problem)
    names, masks = None, None
    prompts = read_prompts(args)
    encoder = load_text_encoder(args, export, net_folder, device) if prompts is not None else None
    if encoder is not None:
        warn_truncated(sum(encoder.too_long(prompts)), encoder.tokens, "prompt(s) are")
    if args.masks is not None:
        names, masks = load_masks(Path(args.masks), export.config.data.image_size)
        if args.grid and "grid" in (n.lower() for n in names):
            raise ConfigError(f"--masks {args.masks}: a mask named 'grid' would be overwritten by --grid's grid.png")
        logger.info("--masks: one sample per mask file (%d); --num-samples is not used", len(names))
    count = len(names) if names is not None else args.num_samples * (len(prompts) if prompts else 1)
    if count > MAX_SAMPLES:
        raise ConfigError(f"{count} images requested (one per mask, or --num-samples per prompt): at most "
                          f"{MAX_SAMPLES} in one folder")

    def label(i: int):
        """Image i's condition as the manifest records it: its mask's name, its prompt, its class (one, all in
        turn, or drawn by seed), or None."""
        if masks is not None:
            return f"mask:{names[i]}"
        if prompts is not None:
            return prompts[i // args.num_samples]
        if spec.cond_type == "class":
            if args.class_label == "random":
                return mix_seed(args.seed, i, LABEL_STREAM) % spec.num_classes
            if args.class_label in (None, "all"):
                return i % spec.num_classes
            return int(args.class_label)
        return None

    def condition(i: int):
        """Image i's condition for the network: its mask (decoded now), its prompt's text (the batch encodes
        it), its class as a tensor, or None."""
        if masks is not None:
            return masks[i]
        value = label(i)
        return torch.tensor(value) if spec.cond_type == "class" else value

    def file_of(i: int) -> str:
        return f"{names[i]}.png" if names is not None else f"{i:06d}.png"

    # The guidance interval is part of what an image is, for a model that takes one (a resumed run refuses another).
    interval = {} if args.guidance_interval is None else {"guidance_interval": list(args.guidance_interval)}

    def record_of(i: int) -> dict:
        return {"index": i, "file": file_of(i), "seed": image_seed(args.seed, i), "steps": args.steps,
                "sampler": sampler, "guidance": args.cfg_scale, **interval, "condition": label(i)}

    request = {"unet": str(net_folder.resolve()), "unet_weights": weights_digest(read_config(net_folder)),
               "vae": vae_identity(vae), "sampler": sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
               **interval, "eta": args.eta, "seed": args.seed, "count": count, "dtype": str(dtype),
               "conditions": ({"masks": len(names)} if names is not None else {"prompts": len(prompts)}
                              if prompts is not None else args.class_label or spec.cond_type),
               "conditions_sha256": conditions_identity(masks, prompts)}
    folder = SampleFolder(Path(args.out), request, state.process_index)
    lock, done = claim_out(Path(args.out), folder, args.overwrite, file_of) if state.is_main_process else (None, None)
    done = from_main_process(done, state)      # every process gets the verdict, so none waits alone
    try:
        if isinstance(done, str):
            raise ConfigError(done)
        sample_into(folder, done, args, state, net, vae, spec, sampler, device, dtype, count, condition, encoder,
                    file_of, record_of)
    finally:
        if lock is not None:
            lock.release()


def sample_into(folder: SampleFolder, done, args, state, net, vae, spec, sampler, device, dtype, count, condition,
                encoder, file_of, record_of) -> None:
    """Make the images of ``folder`` not in ``done``: this process's share, in batches of exactly --batch-size
    rows (a short last batch is padded with copies of its last image, whose results are dropped), so an
    image's pixels never depend on which images share its batch; then (main process) the manifest, the
    grid and the .npz. Every process returns once the folder is complete, or raises the main process's
    error."""
    if len(done) and state.is_main_process:
        logger.info("%s: %d of %d images already made; making the other %d", args.out, len(done), count,
                    count - len(done))
    share = len(range(state.process_index, count - len(done), state.num_processes))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    network = compiled_for_sampling(net, vae) if args.compile else net
    try:
        with tqdm(total=share, desc="sampling", disable=not state.is_main_process) as progress:
            for idx in batches(pending(count, done, state.process_index, state.num_processes), args.batch_size):
                rows = idx + [idx[-1]] * (args.batch_size - len(idx))
                made = [condition(i) for i in idx]
                conds = made + [made[-1]] * (len(rows) - len(idx))
                if encoder is not None:
                    batch_cond = encode_prompts(encoder, conds)
                else:
                    batch_cond = None if conds[0] is None else torch.stack(conds).to(device)
                del made, conds
                with autocast:
                    z = generate_latents(network, spec, batch_cond, [image_seed(args.seed, i) for i in rows],
                                         args.steps, sampler, args.cfg_scale, args.eta, device,
                                         args.guidance_interval)
                    images = decode_latents(vae, z.float(), args.batch_size)
                for i, array in zip(idx, to_uint8(images[:len(idx)])):
                    save_png(array, folder.out / file_of(i))
                    folder.record(record_of(i))
                progress.update(len(idx))
        folder.close()
        state.wait_for_everyone()
    except WRITE_ERRORS as e:
        folder.close()
        raise CheckpointError(f"could not write to --out {args.out} ({write_failure(e)}); "
                              f"{finished_so_far(folder, record_of, state)}: the same command again makes the "
                              "rest") from None
    failure = None
    if state.is_main_process:
        try:
            folder.merge(record_of)
            if args.grid:
                grid = tile(torch.stack([image_tensor(folder.out / file_of(i)) for i in range(min(count, GRID_MAX))]))
                save_png(to_uint8(grid), folder.out / "grid.png")
            if args.npz:
                logger.info("wrote %s", folder.write_npz(file_of))
        except ConfigError as e:
            failure = ("config", str(e))
        except WRITE_ERRORS as e:
            failure = ("write", f"could not write to --out {args.out} ({write_failure(e)}); "
                                f"{finished_so_far(folder, record_of, state)}: the same command again makes the rest")
    # Every process returns when the manifest is written (a caller such as evaluate.py sweep reads it next).
    failure = from_main_process(failure, state)
    if failure:
        raise (ConfigError if failure[0] == "config" else CheckpointError)(failure[1])
    if state.is_main_process:
        logger.info("wrote %d images (%d by this run) and %s to %s", count, count - len(done), MANIFEST, args.out)


def finished_so_far(folder: SampleFolder, record_of, state) -> str:
    """After a failed write: the main process lists the finished images in the manifest, if it still can."""
    finished = folder.listed()
    if not state.is_main_process:
        return f"the {len(finished)} images listed so far are complete"
    try:
        folder.write_manifest(finished, record_of)
    except WRITE_ERRORS:
        return f"the {len(finished)} images listed in {folder.out / '.parts'} are complete"
    return f"the {len(finished)} images listed in {folder.out / MANIFEST} are complete"


if __name__ == "__main__":
    run_cli(main)
    finish(PartialState())
