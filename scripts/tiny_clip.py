"""A tiny, randomly initialised CLIP text encoder with a BPE tokenizer for a fixed word list, written
in the Hugging Face layout.

For trying ``cond.type=text`` on the example data without downloading CLIP, for the tests and for
the quality benchmark's text row: a frozen random encoder still gives every caption its own token
embeddings, which is all a small text-to-image model needs to tell "red" from "blue". It is no
language model: words it was not given are split into letters.

    python scripts/tiny_clip.py --out runs/tiny_clip            # the example captions' words
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from scripts.shapes import BACKGROUND_WORDS, COLOURS, SHAPES  # noqa: E402

EXAMPLE_WORDS = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUND_WORDS)
START, END = "<|startoftext|>", "<|endoftext|>"


def bpe_files(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab.json, merges.txt lines) of a CLIP-style BPE that builds each word letter by letter:
    every letter alone and word-final (``x</w>``), and every merge result, are in the vocabulary."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(START)
    add(END)
    words = sorted({w.lower() for w in words})
    for letter in sorted(set("".join(words))):
        add(letter)
        add(letter + "</w>")
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        joined = pieces[0]
        for piece in pieces[1:]:
            if f"{joined} {piece}" not in merges:
                merges.append(f"{joined} {piece}")
            joined += piece
            add(joined)
    return vocab, merges


def write_tiny_clip(folder: str | Path, words: Iterable[str] = EXAMPLE_WORDS, layout: str = "sd", hidden: int = 32,
                    layers: int = 2, heads: int = 2, max_tokens: int = 16, seed: int = 0) -> Path:
    """Write the encoder and tokenizer into ``folder``: ``text_encoder/`` + ``tokenizer/`` (``layout="sd"``,
    Stable Diffusion's) or both in ``folder`` itself (``"single"``). The same arguments write the same files."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder = Path(folder)
    encoder_dir, tokenizer_dir = (folder / "text_encoder", folder / "tokenizer") if layout == "sd" else (folder, folder)
    vocab, merges = bpe_files(words)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_tokens,
                            bos_token_id=vocab[START], eos_token_id=vocab[END], pad_token_id=vocab[END])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval()
    model.save_pretrained(encoder_dir, safe_serialization=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_tokens}))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (text_encoder/ and tokenizer/)")
    parser.add_argument("--words", nargs="*", default=list(EXAMPLE_WORDS), help="the vocabulary (default: the "
                        "example data's caption words)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    write_tiny_clip(args.out, args.words, hidden=args.hidden, max_tokens=args.max_tokens)
    print(f"wrote a tiny random CLIP text encoder ({len(args.words)} words) to {args.out}: "
          f"cond.type=text cond.text_encoder={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
