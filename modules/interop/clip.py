"""The frozen text encoder of ``cond.type=text``: a CLIP text model and its tokenizer from a local folder.

``cond.text_encoder`` names a Stable Diffusion folder (``text_encoder/`` + ``tokenizer/``) or one
folder holding both (a CLIP text model or a whole CLIP model, with the tokenizer files). Nothing
is ever downloaded (``local_files_only``), weights are read from safetensors only, and
``transformers`` is imported only here, when a text-conditioned run needs it.

Prompts are tokenized as Stable Diffusion does: start and end tokens, padded to the encoder's
context (77 tokens for SD's CLIP), longer prompts truncated; every token's embedding is kept. An
encoder whose ``config.json`` sets ``use_attention_mask: true`` gets the tokenizer's attention mask,
as diffusers gives it (SD's CLIP has no such entry and attends to the padding).
``cond.text_layer``: ``last`` (the final hidden state, SD 1) or ``penultimate`` (the hidden
state before the last layer, with the final layer norm applied, as diffusers' ``clip_skip=1``;
diffusers' SD 2 folders already hold that cut encoder, 23 of OpenCLIP's 24 layers, so use
``last`` with them). The encoder's identity is the SHA-256 of the files it is read from; the
model itself is loaded on the first :meth:`TextEncoder.encode`, so a run whose embeddings are
cached never loads it.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from modules import durable
from modules.errors import ModelFolderError

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def _is_encoder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _is_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))


def locate(path: str) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of ``path``: an SD folder's ``text_encoder/`` and
    ``tokenizer/``, or ``path`` itself for both."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"cond.text_encoder={path}: no such folder")
    for encoder, tokenizer in ((root / "text_encoder", root / "tokenizer"), (root, root)):
        if _is_encoder(encoder) and _is_tokenizer(tokenizer):
            return encoder, tokenizer
    raise ModelFolderError(f"cond.text_encoder={path}: holds neither text_encoder/ + tokenizer/ (a Stable Diffusion "
                           "folder) nor a CLIP text model (config.json + model.safetensors) with its tokenizer files "
                           "(vocab.json + merges.txt, or tokenizer.json)")


def identity(encoder_dir: Path, tokenizer_dir: Path) -> str:
    """SHA-256 over the content of every file the encoder and its tokenizer are read from."""
    files = [encoder_dir / "config.json", *sorted(encoder_dir.glob("*.safetensors")),
             *sorted(encoder_dir.glob("*.safetensors.index.json")),
             *(tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file())]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{durable.sha256_file(f)}\n".encode())
    return h.hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class TextEncoder:
    """Prompts to token embeddings ``[n, tokens, width]`` (float32) with a frozen CLIP text model.

    Attributes known without loading the model: ``tokens`` (the context length), ``width`` (the
    hidden size), ``identity`` and :meth:`record`. Every problem with the folder is a one-line
    :class:`ModelFolderError` naming it.
    """

    def __init__(self, path: str, layer: str = "last", device: torch.device | str = "cpu"):
        self.path, self.layer, self.device = path, layer, torch.device(device)
        self.encoder_dir, self.tokenizer_dir = locate(path)
        transformers = _quiet_transformers()
        try:
            self.config = transformers.CLIPTextConfig.from_pretrained(str(self.encoder_dir), local_files_only=True)
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError ... for damaged files
            raise ModelFolderError(f"cond.text_encoder={path}: cannot read the CLIP config or tokenizer "
                                   f"({_first_line(e)})") from None
        if len(self.tokenizer) > self.config.vocab_size:
            raise ModelFolderError(f"cond.text_encoder={path}: the tokenizer ({self.tokenizer_dir}) has "
                                   f"{len(self.tokenizer)} tokens, the text model ({self.encoder_dir}) embeds only "
                                   f"{self.config.vocab_size}: they do not belong together")
        if layer == "penultimate" and self.config.num_hidden_layers < 2:
            raise ModelFolderError(f"cond.text_layer=penultimate: the text model in {self.encoder_dir} has only "
                                   f"{self.config.num_hidden_layers} layer")
        self.tokens = int(min(self.tokenizer.model_max_length, self.config.max_position_embeddings))
        self.uses_attention_mask = getattr(self.config, "use_attention_mask", False)
        if not isinstance(self.uses_attention_mask, bool):
            raise ModelFolderError(f"cond.text_encoder={path}: {self.encoder_dir / 'config.json'}'s use_attention_mask "
                                   f"is {self.uses_attention_mask!r}, not true or false")
        self.width = int(self.config.hidden_size)
        self.identity = identity(self.encoder_dir, self.tokenizer_dir)
        self._model = None

    def record(self) -> dict:
        """What an export records of its encoder (sample.py refuses another one)."""
        return {"path": str(Path(self.path).resolve()), "identity": self.identity, "layer": self.layer,
                "tokens": self.tokens, "width": self.width}

    def _load(self):
        transformers = _quiet_transformers()
        try:
            model, info = transformers.CLIPTextModel.from_pretrained(
                str(self.encoder_dir), local_files_only=True, use_safetensors=True, output_loading_info=True)
        except Exception as e:
            raise ModelFolderError(f"cond.text_encoder={self.path}: cannot load the text model from "
                                   f"{self.encoder_dir} ({_first_line(e)}; weights are read from .safetensors files "
                                   "only)") from None
        missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
        if missing:
            raise ModelFolderError(f"cond.text_encoder={self.path}: the weights in {self.encoder_dir} do not fit "
                                   f"its config.json ({len(missing)} missing, e.g. {', '.join(sorted(missing)[:3])})")
        return model.to(self.device).eval().requires_grad_(False)

    def too_long(self, prompts: list[str]) -> list[bool]:
        """Which prompts have more tokens than the encoder's context (they are truncated)."""
        ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        return [len(row) > self.tokens for row in ids]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token embeddings ``[len(prompts), tokens, width]`` (float32, on ``device``)."""
        if self._model is None:
            self._model = self._load()
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokens, truncation=True,
                                return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        # An encoder whose config sets use_attention_mask (as diffusers' pipelines read it) is called with the
        # tokenizer's mask, so padding is not attended to; SD's CLIP (no such entry) sees the padding.
        mask = tokens["attention_mask"].to(self.device) if self.uses_attention_mask else None
        if self.layer == "last":
            return self._model(ids, attention_mask=mask).last_hidden_state.float()
        hidden = self._model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        # transformers 5 holds the final layer norm on the model itself, earlier versions on its text_model
        return getattr(self._model, "text_model", self._model).final_layer_norm(hidden).float()

    def encode_unique(self, prompts: list[str]) -> torch.Tensor:
        """:meth:`encode` of each distinct prompt once, rows in the order of ``prompts``."""
        distinct = sorted(set(prompts))
        embeddings = self.encode(distinct)
        index = {p: i for i, p in enumerate(distinct)}
        return embeddings[torch.tensor([index[p] for p in prompts], device=embeddings.device)]

    def null(self) -> torch.Tensor:
        """The empty prompt's embedding ``[tokens, width]``: the null condition of classifier-free guidance."""
        return self.encode([""])[0]


def warn_truncated(count: int, tokens: int, where: str) -> None:
    """The one warning that counts the prompts cut to the encoder's context."""
    if count:
        logger.warning("%d %s longer than the text encoder's %d tokens: truncated (as Stable Diffusion does)",
                       count, where, tokens)



