"""Helpers the tests share (not fixtures): networks built for the sizes a run would derive."""
from __future__ import annotations

from modules.core.networks import build_network
from modules.core.networks.denoiser import Denoiser, Sizes


def sizes_of(cfg, latent_channels: int = 4, downsample: int = 8, num_classes: int = 0, text_tokens: int = 0,
             text_width: int = 0) -> Sizes:
    """The sizes a run of ``cfg`` (a UNetRunConfig) derives from a VAE with ``latent_channels`` and
    ``downsample``, data with ``num_classes`` classes and a text encoder of ``text_tokens`` x ``text_width``."""
    text = cfg.cond.type == "text"
    return Sizes(latent_channels=latent_channels, latent_size=cfg.data.image_size // downsample,
                 image_downsample=downsample, num_classes=num_classes if cfg.cond.type == "class" else 0,
                 text_tokens=text_tokens if text else 0, text_width=text_width if text else 0,
                 inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))


def network_of(cfg, **sizes) -> Denoiser:
    """A freshly initialised network of ``cfg`` for :func:`sizes_of` ``(cfg, **sizes)``."""
    return build_network(cfg.model, cfg.cond, sizes_of(cfg, **sizes))


def wandb_offline_runs(folder, wait_s: float = 60) -> list[dict]:
    """The W&B runs written offline under ``folder/wandb``, oldest first, as wandb stored them: each
    ``{"id", "project", "entity", "name", "history": [one dict per logged row]}``. wandb's service writes
    the files after ``finish`` returns: each is read once it holds its ``exit`` record (within ``wait_s``)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + wait_s
    runs = []
    for path in sorted(Path(folder, "wandb").glob("offline-run-*/run-*.wandb")):
        run, finished = _read_wandb_file(path)
        while not finished and time.monotonic() < deadline:
            time.sleep(0.2)
            run, finished = _read_wandb_file(path)
        assert finished, f"{path}: no exit record after {wait_s} s"
        runs.append(run)
    return runs


def _read_wandb_file(path) -> tuple[dict, bool]:
    """(the run, whether its exit record was read). A ``.wandb`` file is ``:W&B`` + magic + version (7 bytes),
    then LevelDB-log records (32 KiB blocks; each record a 7-byte header: checksum, length, FULL/FIRST/MIDDLE/
    LAST) holding wandb's ``Record`` protobufs."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", path
    run, pos, pending, finished = {"history": []}, 7, b"", False
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:       # the padding at a block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):              # FIRST or MIDDLE: the record goes on in the next block
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, project=record.run.project, entity=record.run.entity,
                       name=record.run.display_name)
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        finished = finished or kind == "exit"
    return run, finished


def random_fid_inception_weights() -> dict:
    """Random weights in the key layout of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, the same on
    every machine: each array is drawn by numpy's legacy RandomState (a frozen stream) seeded by its key's
    CRC-32, scaled so that the features are of Inception's size (tests/fixtures/pytorch_fid_inception)."""
    import zlib

    import numpy as np
    import torch

    from modules.eval.fid_inception import FIDInceptionV3
    weights = {}
    for key, value in FIDInceptionV3().state_dict().items():
        rng = np.random.RandomState(zlib.crc32(key.encode()))
        shape = tuple(value.shape)
        if key.endswith("conv.weight"):
            array = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            array = 0.5 + rng.random_sample(shape)
        elif key == "fc.weight":
            array = rng.standard_normal(shape) / np.sqrt(shape[1])
        else:                                   # BN biases and means, fc.bias
            array = 0.1 * rng.standard_normal(shape)
        weights[key] = torch.from_numpy(array.astype(np.float32))
    return weights


def fid_inception_inputs() -> dict:
    """The images of tests/fixtures/pytorch_fid_inception: float 0..255 [B, 3, H, W] at 299 px (no resize),
    64 px (upsampled) and 300x301 px (downsampled)."""
    import numpy as np
    import torch
    rng = np.random.RandomState(0)
    return {name: torch.from_numpy(rng.randint(0, 256, size=shape).astype(np.float32))
            for name, shape in (("299", (1, 3, 299, 299)), ("64", (2, 3, 64, 64)), ("300x301", (1, 3, 300, 301)))}
