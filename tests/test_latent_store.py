"""The latent store (modules/data/latent_store.py): what it holds equals the VAE's posteriors of the images,
reading it is fast and exact, an encode survives kills and concurrent encoders, damage is found, and
a store of other inputs is refused."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.config.schema import DataConfig
from modules.data import latent_store
from modules.data.dataset import build_dataset
from modules.data.order import make_loader
from modules.data.streams import StreamSource
from modules.errors import CheckpointError, DataError
from modules.interop.vae import load_vae
from modules.run.export import vae_identity


class StandInImages(torch.utils.data.Dataset):
    """N random "images" (a function of their row), three classes; ``fail_at``: the item that raises."""

    def __init__(self, n: int, side: int = 8, fail_at: int = -1):
        self.n, self.side, self.fail_at, self.training = n, side, fail_at, False
        self.class_names, self.labels = ["a", "b", "c"], np.arange(n) % 3

    def __len__(self) -> int:
        return self.n

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def key(self, i: int) -> str:
        return f"{i:06d}.png"

    def fingerprint(self) -> str:
        return f"stand-in-{self.n}-{self.side}"

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.side, self.side, generator=g) * 2 - 1, "label": int(self.labels[i]),
                "index": i, "substituted": 0}


class StandInVAE:
    """A deterministic "encoder": the posterior's mean is a 2x2 average pool, its std the mean's magnitude."""

    def encode(self, images: torch.Tensor):
        mean = torch.nn.functional.avg_pool2d(images, 2)
        return type("Posterior", (), {"mean": mean, "std": mean.abs() + 0.1})()


def spec_for(dataset, **changes) -> latent_store.StoreSpec:
    return latent_store.StoreSpec(**{"vae": "stand-in", "source": dataset.fingerprint(), "image_size": dataset.side,
                                     "hflip": True, "masks": False, "text": None, "num_rows": len(dataset),
                                     "class_names": tuple(dataset.class_names), **changes})


def encode(dataset, folder: Path, shard_rows: int = 7, rank: int = 0, world: int = 1) -> Path:
    return latent_store.encode(StandInVAE(), latent_store.IndexedShards(dataset, shard_rows, batch_size=3),
                               spec_for(dataset), folder, "cpu", rank, world)


def expected_rows(dataset) -> dict[str, np.ndarray]:
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    out = {}
    for suffix, batch in (("", images), ("_flip", torch.flip(images, dims=[3]))):
        posterior = StandInVAE().encode(batch)
        out["mean" + suffix] = posterior.mean.numpy().astype(np.float16)
        out["std" + suffix] = posterior.std.numpy().astype(np.float16)
    return out


def test_a_store_holds_every_images_posterior_and_reads_back_exactly(tmp_path):
    dataset = StandInImages(20)
    store = latent_store.LatentStore(encode(dataset, tmp_path / "store"))
    expected = expected_rows(dataset)
    assert len(store) == 20 and store.num_classes == 3 and len(store.shards) == 3      # shards of 7, 7, 6 rows
    flip_seed = next(s for s in range(100) if random.Random(s).random() < 0.5)   # the item's flip is drawn from it
    for i in range(20):
        plain, flipped = store[i], store[(i, flip_seed)]
        assert torch.equal(plain["mean"], torch.from_numpy(expected["mean"][i]).float())
        assert torch.equal(plain["std"], torch.from_numpy(expected["std"][i]).float())
        assert torch.equal(flipped["mean"], torch.from_numpy(expected["mean_flip"][i]).float())
        assert int(plain["label"]) == i % 3 and int(plain["index"]) == i
    keys = [(i, 7 * i) for i in (19, 0, 8, 8, 3)]
    batch = store.__getitems__(keys)
    for j, key in enumerate(keys):      # a batch read equals its items read one by one
        assert all(torch.equal(batch[name][j], store[key][name]) for name in ("mean", "std", "label", "index"))
    loaded = next(iter(make_loader(store, 5, seed=0)))
    assert loaded["mean"].shape == (5, 3, 4, 4) and loaded["mean"].dtype == torch.float32
    assert latent_store.store_problem(store.folder, deep=True) is None


def test_a_store_of_a_vae_equals_the_vaes_posteriors_of_the_images(shapes_dir, tiny_vae_run, tmp_path):
    """With the real tiny VAE and image folder: the rows are the VAE's posterior of the centre crop, and
    the store's name changes with the labels (an edited metadata label is another store)."""
    vae = load_vae(tiny_vae_run / "vae")
    dataset = build_dataset(DataConfig(path=str(shapes_dir), image_size=32))
    spec = latent_store.spec_of(dataset, vae_identity(vae), 32, True, False)
    store = latent_store.open_or_encode(vae, dataset, spec, tmp_path / "cache", 5, "cpu")
    with torch.no_grad():
        posterior = vae.encode(torch.stack([dataset[i]["image"] for i in range(4)]))
    expected = torch.from_numpy(posterior.mean.float().numpy().astype(np.float16)).float()
    assert torch.equal(torch.stack([store[i]["mean"] for i in range(4)]), expected)
    relabelled = build_dataset(DataConfig(path=str(shapes_dir), image_size=32))
    relabelled._source.labels = relabelled._source.labels[::-1].copy()
    assert latent_store.spec_of(relabelled, vae_identity(vae), 32, True, False).name() != spec.name()


def test_an_encode_killed_mid_shard_resumes_at_the_first_unfinished_shard(tmp_path):
    folder = tmp_path / "store"
    with pytest.raises(CheckpointError, match="2 of 3 shards are complete and kept; the same command continues"):
        encode(StandInImages(20, fail_at=16), folder)
    assert not (folder / latent_store.INDEX).exists() and not (folder / "shard_00002").exists()
    done = {k: (folder / f"shard_0000{k}" / "mean.npy").stat().st_mtime_ns for k in (0, 1)}
    encode(StandInImages(20), folder)          # the same command again, now without the kill
    assert {k: (folder / f"shard_0000{k}" / "mean.npy").stat().st_mtime_ns for k in (0, 1)} == done   # kept
    straight = latent_store.LatentStore(encode(StandInImages(20), tmp_path / "straight"))
    resumed = latent_store.LatentStore(folder)
    assert all(torch.equal(resumed[i]["mean"], straight[i]["mean"]) for i in range(20))


def _encode_in_a_process(folder: str, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    encode(StandInImages(60), Path(folder), shard_rows=5, rank=rank, world=world)


def test_processes_and_runs_encoding_one_store_share_its_shards(tmp_path):
    """Two processes of one run, and a third one of another run, build the same store at once: every shard
    is written once (its lock), and the store equals one built alone."""
    folder = tmp_path / "store"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_encode_in_a_process, args=(str(folder), r, w)) for r, w in ((0, 2), (1, 2), (0, 1))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    alone = latent_store.LatentStore(encode(StandInImages(60), tmp_path / "alone", shard_rows=5))
    shared = latent_store.LatentStore(folder)
    assert latent_store.store_problem(folder, deep=True) is None
    assert all(torch.equal(shared[i]["mean"], alone[i]["mean"]) for i in range(60))


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.truncate(f / "shard_00001" / "mean.npy", 100), "shard shard_00001: file mean.npy has 100 bytes"),
    (lambda f: shutil.rmtree(f / "shard_00002"), "shard shard_00002: missing file"),
    (lambda f: (f / "index.json").write_text("[]"), "not a latent store index"),
])
def test_a_damaged_store_is_refused_naming_the_damage_and_rebuilt_when_it_is_a_runs_own(damage, message, tmp_path):
    dataset = StandInImages(20)
    root = tmp_path / "cache"
    spec = spec_for(dataset)
    store = latent_store.open_or_encode(StandInVAE(), dataset, spec, root, 3, "cpu", shard_rows=7)
    reference = [store[i]["mean"] for i in range(20)]
    damage(store.folder)
    with pytest.raises(DataError, match=message):
        latent_store.LatentStore(store.folder)
    rebuilt = latent_store.open_or_encode(StandInVAE(), dataset, spec, root, 3, "cpu", shard_rows=7)   # a run's own
    assert all(torch.equal(rebuilt[i]["mean"], reference[i]) for i in range(20))


def test_content_damage_of_the_same_size_is_found_by_verify(tmp_path):
    folder = encode(StandInImages(20), tmp_path / "store")
    array = folder / "shard_00000" / "std.npy"
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF
    array.write_bytes(bytes(data))
    assert latent_store.store_problem(folder) is None           # start-up checks sizes and headers only
    assert latent_store.main(["verify", str(folder)]) == 2      # the full check names it
    assert "changed since it was written" in latent_store.store_problem(folder, deep=True)


def test_a_store_of_other_inputs_is_refused_naming_what_changed(tmp_path):
    dataset = StandInImages(10)
    folder = encode(dataset, tmp_path / "store")
    with pytest.raises(DataError, match=r"other inputs \(changed: vae\)"):
        latent_store.open_store(folder, spec_for(dataset, vae="another VAE"))
    with pytest.raises(DataError, match=r"changed: hflip, image_size"):
        latent_store.open_store(folder, spec_for(dataset, image_size=16, hflip=False))
    latent_store.claim_store_folder(tmp_path / "store", spec_for(dataset))     # the same inputs: continued
    with pytest.raises(DataError, match="holds a latent store of other inputs"):
        latent_store.claim_store_folder(tmp_path / "store", spec_for(dataset, vae="another VAE"))


def test_encoding_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    def peak(n: int) -> int:
        tracemalloc.start()
        encode(StandInImages(n, side=16), tmp_path / f"store_{n}", shard_rows=256)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top
    small, large = peak(300), peak(3000)
    assert large < 1.5 * small, (small, large)


def _tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, png, label in samples:
            for ext, payload in (("png", png), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tar_shards_are_read_as_a_stream_and_equal_the_same_images_in_a_folder(shapes_dir, tmp_path):
    """WebDataset tars (through datasets' webdataset loader): one store shard per tar, the same crops as the
    image folder, labels from .cls."""
    dataset = build_dataset(DataConfig(path=str(shapes_dir), image_size=32))
    files = [Path(dataset.key(i)) for i in range(len(dataset))]
    for t in range(2):
        _tar(tmp_path / f"train-{t:03d}.tar", [(f"{t}{i:04d}", files[i].read_bytes(), int(dataset.labels[i]))
                                              for i in range(t * 12, (t + 1) * 12)])
    source = StreamSource(str(tmp_path / "train-{000..001}.tar"), 32)
    assert source.n_shards == 2
    items = list(source.items(1))
    assert len(items) == 12 and [it["label"] for it in items] == [int(x) for x in dataset.labels[12:24]]
    assert all(torch.equal(items[i]["image"], dataset[12 + i]["image"]) for i in range(12))
    spec = latent_store.StoreSpec(vae="stand-in", source=source.identity, image_size=32, hflip=True, masks=False,
                                  text=None, num_rows=0)
    store = latent_store.LatentStore(latent_store.encode(StandInVAE(), latent_store.StreamShards(source, 5), spec,
                                                         tmp_path / "store", "cpu"))
    assert len(store) == 24 and store.num_classes == 3 and len(store.shards) == 2
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["spec"]["num_rows"] == 24


def test_train_unet_trains_from_an_encoded_store_with_the_images_moved_away(shapes_dir, tiny_vae_run, tmp_path):
    """encode.py once, then train_unet.py --data STORE: the images are never read again, and the run equals one
    that encodes its own store from the images (encoded in the same batches) step for step."""
    import encode
    import train_unet
    from modules.run.export import read_config, read_weights
    images = tmp_path / "images"
    shutil.copytree(shapes_dir, images)
    common = ["--config", "tiny", "--vae", str(tiny_vae_run), "--report-to", "none", "--max-steps", "3",
              "cond.type=class", "train.checkpoint_every=3"]
    train_unet.main([*common, "--data", str(images), "--output-dir", str(tmp_path / "from_images")])
    encode.main(["--config", "tiny", "--data", str(images), "--vae", str(tiny_vae_run), "--out", str(tmp_path / "store"),
                 "--batch-size", "8", "cond.type=class"])
    images.rename(tmp_path / "moved_away")
    train_unet.main([*common, "--data", str(tmp_path / "store"), "--output-dir", str(tmp_path / "from_store")])
    for folder in ("unet", "unet_ema"):
        a, b = read_weights(tmp_path / "from_images" / folder), read_weights(tmp_path / "from_store" / folder)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # The run records the store it trained on: in its export's config and its checkpoints' identity.
    assert read_config(tmp_path / "from_store" / "unet_ema")["run_config"]["data"]["path"] == str(tmp_path / "store")
    identity = json.loads((tmp_path / "from_store" / "checkpoints" / "step_3" / "identity.json").read_text())
    assert Path(identity["store"]).resolve() == (tmp_path / "store").resolve()


def test_caches_of_the_earlier_format_are_named_not_read(tmp_path, caplog):
    """Never rebuilt at ImageNet cost without a word: the log says the old caches are not read, and how to
    remove them."""
    dataset = StandInImages(5)
    (tmp_path / "cache" / "latents_0123abcd").mkdir(parents=True)
    with caplog.at_level("INFO"):
        latent_store.open_or_encode(StandInVAE(), dataset, spec_for(dataset), tmp_path / "cache", 3, "cpu")
    assert f"1 latent cache(s) of the earlier format in {tmp_path / 'cache'} are not read" in caplog.text
    assert f"rm -r {tmp_path / 'cache'}/latents_*" in caplog.text


def test_a_valid_store_is_opened_without_a_lock_or_a_write(tmp_path, monkeypatch):
    """A34: a valid store on a read-only file system is usable: a lock is for writers."""
    dataset = StandInImages(10)
    root = tmp_path / "cache"
    first = latent_store.open_or_encode(StandInVAE(), dataset, spec_for(dataset), root, 3, "cpu")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def no_writes(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")
    for name in ("Lock", "claim_output", "write_file", "write_json", "fresh_folder", "publish_folder"):
        monkeypatch.setattr(latent_store.durable, name, no_writes)
    again = latent_store.open_or_encode(StandInVAE(), dataset, spec_for(dataset), root, 3, "cpu")
    assert again.folder == first.folder and torch.equal(again[9]["mean"], first[9]["mean"])
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_remove_deletes_stores_only(tmp_path, capsys):
    """``remove`` refuses, removing nothing, a folder whose index.json is another tool's (a run's post-hoc EMA
    snapshots keep one), so a mistyped path never deletes a run's files."""
    store = encode(StandInImages(5), tmp_path / "store")
    snapshots = tmp_path / "run" / "posthoc_ema"
    snapshots.mkdir(parents=True)
    (snapshots / "index.json").write_text('{"snapshots": []}')
    assert latent_store.main(["remove", str(store), str(snapshots)]) == 2
    assert store.is_dir() and snapshots.is_dir() and "nothing was removed" in capsys.readouterr().err
    assert latent_store.main(["remove", str(store)]) == 0 and not store.exists()
