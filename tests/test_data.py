"""Data pipeline: sources, image formats, damaged files, masks, augmentation, resumable order,
and the synthetic shapes generator."""
from __future__ import annotations

import io
import json
import logging
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from modules.config.schema import DataConfig
from modules.core.metrics import mask_iou as batch_mask_iou
from modules.data import image_io
from modules.data.dataset import build_dataset, split_validation
from modules.data.order import ResumableBatchSampler, make_loader
from modules.errors import DataError
from scripts.shapes import PLAIN_GREY, SHAPES, foreground_mask, make_shapes, render_shape_batch


def mask_iou(a, b) -> float:
    """IoU of two bool masks [H, W] (numpy)."""
    return batch_mask_iou(torch.as_tensor(a)[None], torch.as_tensor(b)[None]).item()

SIZE = 16


def cfg(path, **overrides) -> DataConfig:
    values = dict(path=str(path), image_size=SIZE, hflip=False, num_workers=0)
    values.update(overrides)
    return DataConfig(**values)


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def rgb_of(value) -> torch.Tensor:
    """The [-1, 1] tensor value of 8-bit channel values."""
    return torch.tensor(value, dtype=torch.float32) / 127.5 - 1.0


def solid(colour, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- formats

def test_image_modes_are_converted_to_rgb(tmp_path):
    gray = Image.new("L", (8, 8), 100)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 8, 4))                  # top half fully transparent
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 4))                            # index 0 = transparent
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))        # pure red
    sixteen = Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16))
    save(tmp_path / "a_gray.png", gray)
    save(tmp_path / "b_rgba.png", rgba)
    save(tmp_path / "c_palette.png", palette, transparency=0)
    save(tmp_path / "d_cmyk.tif", cmyk)
    save(tmp_path / "e_sixteen.png", sixteen)
    ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 5 and ds.num_classes == 0
    assert Image.open(tmp_path / "e_sixteen.png").mode == "I;16"

    items = [ds[i] for i in range(5)]
    for item in items:
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["label"].item() == -1 and "mask" not in item
    torch.testing.assert_close(items[0]["image"], rgb_of(100).expand(3, SIZE, SIZE))
    white, red, green = rgb_of([255, 255, 255]), rgb_of([255, 0, 0]), rgb_of([0, 255, 0])
    for item, opaque in ((items[1], red), (items[2], green)):     # transparency -> white
        torch.testing.assert_close(item["image"][:, 0, 0], white)
        torch.testing.assert_close(item["image"][:, -1, -1], opaque)
    torch.testing.assert_close(items[3]["image"][:, 5, 5], red)
    # 16-bit 128*257 scales to 8-bit 128 (clipping would give 255)
    torch.testing.assert_close(items[4]["image"], rgb_of(128).expand(3, SIZE, SIZE))


def test_32bit_integer_tiff_holding_16bit_data_is_scaled(tmp_path):
    values = np.full((8, 8), 65535, dtype=np.int32)
    values[:, :4] = 0
    save(tmp_path / "deep.tif", Image.fromarray(values))
    image = build_dataset(cfg(tmp_path))[0]["image"]
    assert image[0, 0, 0].item() == -1.0 and image[0, 0, -1].item() == 1.0


def test_exif_orientation_is_applied(tmp_path):
    # stored 40 wide x 20 high: left half red, right half blue; orientation 6 = rotate 90 CW,
    # so the upright image is 20 x 40 with red on top
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "rotated.png", stored, exif=exif)
    image = build_dataset(cfg(tmp_path))[0]["image"]
    red, blue = rgb_of([255, 0, 0]), rgb_of([0, 0, 255])
    torch.testing.assert_close(image[:, 2, SIZE // 2], red)      # top
    torch.testing.assert_close(image[:, -3, SIZE // 2], blue)    # bottom
    torch.testing.assert_close(image[:, 2, 2], image[:, 2, -3])  # no left/right split


def test_shorter_side_resize_and_center_crop(tmp_path):
    wide = Image.new("RGB", (48, 16), (0, 0, 255))
    wide.paste((255, 0, 0), (16, 0, 32, 16))                  # red centre third
    save(tmp_path / "wide.png", wide)
    image = build_dataset(cfg(tmp_path))[0]["image"]
    torch.testing.assert_close(image, rgb_of([255, 0, 0])[:, None, None].expand(3, SIZE, SIZE))


def test_one_pixel_image_is_upscaled(tmp_path):
    save(tmp_path / "dot.png", solid((10, 20, 30), (1, 1)))
    image = build_dataset(cfg(tmp_path))[0]["image"]
    torch.testing.assert_close(image, rgb_of([10, 20, 30])[:, None, None].expand(3, SIZE, SIZE))


# ----------------------------------------------------------------------------- damaged files

def test_empty_and_non_image_files_are_skipped_at_scan(tmp_path):
    save(tmp_path / "good.png", solid((255, 0, 0)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 1 and ds.skipped_at_scan == 2
    assert sorted(Path(p).name for p in ds.skipped_files) == ["empty.png", "notes.jpg"]


def test_truncated_images_are_substituted_by_the_next_readable(tmp_path, caplog):
    colours = {"a.png": (255, 0, 0), "c.png": (0, 255, 0)}
    for name, colour in colours.items():
        save(tmp_path / name, solid(colour, (32, 32)))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name, fmt in (("b.jpg", "JPEG"), ("d.png", "PNG")):
        buf = io.BytesIO()
        noisy.save(buf, fmt)
        (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 4 and ds.skipped_at_scan == 0          # headers are intact
    with caplog.at_level(logging.WARNING, logger="modules.data"):
        items = [ds[i] for i in range(4)]
    assert [it["substituted"].item() for it in items] == [0, 1, 0, 1]
    assert [it["index"].item() for it in items] == [0, 2, 2, 0]  # d wraps around to a
    torch.testing.assert_close(items[1]["image"], items[2]["image"])
    torch.testing.assert_close(items[3]["image"], items[0]["image"])
    assert "b.jpg" in caplog.text and "d.png" in caplog.text


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
            + struct.pack(">I", zlib.crc32(b"IEND")))


def test_decompression_bomb_is_skipped_and_logged(tmp_path, caplog, monkeypatch):
    save(tmp_path / "good.png", solid((0, 0, 255), (20, 20)))
    (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    with caplog.at_level(logging.WARNING, logger="modules.data"):
        ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 1 and [Path(p).name for p in ds.skipped_files] == ["bomb.png"]
    assert "bomb.png" in caplog.text

    # our own limit, below PIL's: a 20x20 image is a bomb when the limit is 100 pixels
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 100)
    save(tmp_path / "small.png", solid((0, 0, 255), (5, 5)))
    ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 1 and sorted(Path(p).name for p in ds.skipped_files) == ["bomb.png", "good.png"]


GOOD_PNG = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8)))
_jpeg = io.BytesIO()
Image.open(io.BytesIO(GOOD_PNG)).save(_jpeg, "JPEG")
GOOD_JPEG = _jpeg.getvalue()

damaged_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: GOOD_PNG[:8] + b),
    st.binary(max_size=300).map(lambda b: GOOD_JPEG[:2] + b),
    st.integers(0, len(GOOD_PNG)).map(lambda n: GOOD_PNG[:n]),
    st.integers(0, len(GOOD_JPEG)).map(lambda n: GOOD_JPEG[:n]),
    st.tuples(st.integers(0, len(GOOD_PNG) - 1), st.integers(0, 255)).map(
        lambda t: GOOD_PNG[:t[0]] + bytes([t[1]]) + GOOD_PNG[t[0] + 1:]),
    st.tuples(st.integers(0, len(GOOD_JPEG) - 1), st.integers(0, 255)).map(
        lambda t: GOOD_JPEG[:t[0]] + bytes([t[1]]) + GOOD_JPEG[t[0] + 1:]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=damaged_bytes, name=st.sampled_from(["x.png", "x.jpg", "x.gif", "x.tif", "x.bmp"]))
def test_arbitrary_bytes_as_an_image_never_break_the_dataset(content, name):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save(root / "a_good.png", solid((255, 0, 0), (10, 10)))
        (root / name).write_bytes(content)
        ds = build_dataset(cfg(root, hflip=True, random_crop_scale=0.5))
        assert len(ds) + ds.skipped_at_scan == 2 and len(ds) >= 1
        for i in range(len(ds)):
            for key in (i, (i, 3)):
                item = ds[key]
                assert item["image"].shape == (3, SIZE, SIZE)
                assert torch.isfinite(item["image"]).all()
                assert item["image"].abs().max() <= 1.0


# ----------------------------------------------------------------------------- sources and errors

def test_missing_empty_and_unreadable_folders_raise_data_error(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError, match="no such folder"):
        build_dataset(cfg(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        build_dataset(cfg(empty))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    with pytest.raises(DataError, match=f"{texts}.*no image files"):
        build_dataset(cfg(texts))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.png").write_text("nope")
    with pytest.raises(DataError, match=f"{broken}.*all 2 image files are unreadable"):
        build_dataset(cfg(broken))
    with pytest.raises(DataError, match="data.path is empty"):
        build_dataset(cfg(""))


def test_unreachable_hub_name_gives_a_clear_error(monkeypatch):
    import datasets

    def offline(name, split=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/faces' is neither a local folder nor a reachable hub dataset"):
        build_dataset(cfg("someone/faces"))


def test_class_labels_from_sorted_subfolders(tmp_path):
    colours = {"zebra": (0, 0, 255), "ant": (255, 0, 0), "mole": (0, 255, 0)}
    for name, colour in colours.items():
        for i in range(2):
            save(tmp_path / name / f"{i}.png", solid(colour))
    ds = build_dataset(cfg(tmp_path))
    assert ds.class_names == ["ant", "mole", "zebra"] and ds.num_classes == 3
    for i in range(len(ds)):
        item = ds[i]
        colour = colours[ds.class_names[item["label"].item()]]
        torch.testing.assert_close(item["image"][:, 0, 0], rgb_of(list(colour)))
    save(tmp_path / "stray.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match="stray.png"):
        build_dataset(cfg(tmp_path))


def test_metadata_jsonl_gives_labels_and_masks(shapes_dir):
    ds = build_dataset(cfg(shapes_dir, image_size=32), masks=True)
    assert len(ds) == 24 and ds.has_masks and ds.class_names == list(SHAPES)
    rows = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert ds.labels.tolist() == [r["label"] for r in rows]
    for i in range(len(ds)):
        item = ds[i]
        assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        pixels = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert mask_iou(foreground_mask(pixels), item["mask"][0].numpy() > 0) == 1.0
        assert Path(rows[i]["file_name"]).parts[0] == SHAPES[item["label"].item()]
    unmasked = build_dataset(cfg(shapes_dir, image_size=32))
    assert not unmasked.has_masks and "mask" not in unmasked[0]


def test_metadata_csv_with_named_labels_and_missing_file(tmp_path):
    save(tmp_path / "x.png", solid((255, 0, 0)))
    save(tmp_path / "y.png", solid((0, 255, 0)))
    (tmp_path / "metadata.csv").write_text("file_name,label\nx.png,dog\ny.png,cat\n")
    ds = build_dataset(cfg(tmp_path))
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [1, 0]
    (tmp_path / "metadata.csv").write_text("file_name,label\nx.png,dog\ngone.png,cat\n")
    with pytest.raises(DataError, match="missing image.*gone.png"):
        build_dataset(cfg(tmp_path))


def test_metadata_mask_referring_to_missing_file(tmp_path):
    save(tmp_path / "x.png", solid((255, 0, 0)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "mask_file_name": "m/x.png"}))
    with pytest.raises(DataError, match="m/x.png"):
        build_dataset(cfg(tmp_path), masks=True)


def test_masks_folder_matched_by_stem(tmp_path):
    root = make_shapes(tmp_path / "flat", 6, image_size=24, seed=3, layout="flat")
    ds = build_dataset(cfg(root, image_size=24), masks=True)
    assert ds.has_masks and ds.num_classes == 0 and len(ds) == 6   # masks/ is not a class
    images, masks, _ = render_shape_batch(6, 24, seed=3)
    for i in range(6):
        np.testing.assert_array_equal(ds[i]["mask"][0].numpy() > 0, masks[i])
    (root / "masks" / "00004.png").unlink()
    with pytest.raises(DataError, match="00004.png"):
        build_dataset(cfg(root, image_size=24), masks=True)
    with pytest.raises(DataError, match=r"masks are needed \(cond.type=mask\)"):
        build_dataset(cfg(tmp_path / "flat" / "masks"), masks=True)


def test_mask_of_another_size_stays_binary_and_aligned(tmp_path):
    save(tmp_path / "img.png", solid((255, 0, 0), (20, 20)))
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:, :20] = 255                                        # left half
    save(tmp_path / "masks" / "img.png", Image.fromarray(mask))
    out = build_dataset(cfg(tmp_path), masks=True)[0]["mask"][0]
    expected = torch.zeros(SIZE, SIZE)
    expected[:, : SIZE // 2] = 1
    torch.testing.assert_close(out, expected)


def test_non_binary_mask_is_thresholded_with_one_warning(tmp_path, caplog):
    save(tmp_path / "img.png", solid((255, 0, 0), (SIZE, SIZE)))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, 4:8], mask[:, 8:12], mask[:, 12:] = 100, 127, 200
    save(tmp_path / "masks" / "img.png", Image.fromarray(mask))
    ds = build_dataset(cfg(tmp_path), masks=True)
    with caplog.at_level(logging.WARNING, logger="modules.data"):
        first, second = ds[0]["mask"][0], ds[0]["mask"][0]
    expected = torch.zeros(SIZE, SIZE)
    expected[:, 12:] = 1
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    warnings = [r for r in caplog.records if "not binary" in r.getMessage()]
    assert len(warnings) == 1 and "img.png" in warnings[0].getMessage()


def test_zero_one_masks_are_not_thresholded_away(tmp_path):
    save(tmp_path / "img.png", solid((255, 0, 0), (SIZE, SIZE)))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:8] = 1
    save(tmp_path / "masks" / "img.png", Image.fromarray(mask))
    assert build_dataset(cfg(tmp_path), masks=True)[0]["mask"].sum().item() == 8 * SIZE


def test_save_to_disk_source(tmp_path):
    import datasets

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    table = datasets.Dataset.from_dict(
        {"image": [solid(c, (12, 20)) for c in colours], "label": [1, 0, 1, 0],
         "mask": [Image.fromarray(np.full((12, 20), 255 * (i % 2), dtype=np.uint8)) for i in range(4)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["cat", "dog"]),
                                    "mask": datasets.Image()}))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    ds = build_dataset(cfg(tmp_path / "saved"), masks=True)
    assert len(ds) == 4 and ds.class_names == ["cat", "dog"] and ds.has_masks
    for i, colour in enumerate(colours):
        item = ds[i]
        torch.testing.assert_close(item["image"], rgb_of(list(colour))[:, None, None].expand(3, SIZE, SIZE))
        assert item["label"].item() == [1, 0, 1, 0][i]
        assert item["mask"].mean().item() == float(i % 2)
    assert len(build_dataset(cfg(tmp_path / "saved", split="test"))) == 1
    with pytest.raises(DataError, match="no split 'val'.*train"):
        build_dataset(cfg(tmp_path / "saved", split="val"))


# ----------------------------------------------------------------------------- augmentation

def test_augmentation_is_joint_and_deterministic(shapes_dir):
    ds = build_dataset(cfg(shapes_dir, image_size=32, hflip=True, vflip=True, rot90=True,
                           random_crop_scale=0.5), masks=True)
    plain = ds[5]
    distinct_masks = set()
    for seed in range(12):
        item = ds[(5, seed)]
        again = ds[(5, seed)]
        for key in item:
            assert torch.equal(item[key], again[key])
        pixels = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        seen, mask = foreground_mask(pixels), item["mask"][0].numpy() > 0
        # resampling blurs the image's edge, so they may disagree only next to the mask's edge
        edge = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
        assert mask.sum() > 20 and not (seen ^ mask)[~edge].any()
        distinct_masks.add(mask.tobytes())
    assert len(distinct_masks) >= 8                  # the parameters really vary with the seed
    ds.train(False)
    for key in plain:
        assert torch.equal(ds[(5, 3)][key], plain[key])    # evaluation mode never augments


def test_flip_and_rotation_follow_the_seed_exactly(tmp_path):
    # asymmetric image and mask: one marked corner; without random crops the output is an
    # exact dihedral transform of the plain item, the same one for image and mask
    img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    img[:4, :6] = (255, 0, 0)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:4, :6] = 255
    save(tmp_path / "a.png", Image.fromarray(img))
    save(tmp_path / "masks" / "a.png", Image.fromarray(mask))
    ds = build_dataset(cfg(tmp_path, hflip=True, vflip=True, rot90=True), masks=True)
    plain = ds[0]
    seen = set()
    for seed in range(40):
        item = ds[(0, seed)]
        matches = [(h, v, k) for h in (0, 1) for v in (0, 1) for k in range(4)
                   if torch.equal(_dihedral(plain["image"], h, v, k), item["image"])]
        assert matches, "augmented image is not a flip/rotation of the plain one"
        assert any(torch.equal(_dihedral(plain["mask"], *m), item["mask"]) for m in matches)
        seen.add(item["image"].numpy().tobytes())
    assert len(seen) == 8                            # all eight orientations occur


def _dihedral(x: torch.Tensor, h: int, v: int, k: int) -> torch.Tensor:
    if h:
        x = torch.flip(x, dims=(2,))
    if v:
        x = torch.flip(x, dims=(1,))
    return torch.rot90(x, k, dims=(1, 2))


def test_split_validation_is_disjoint_and_not_augmented(shapes_dir):
    ds = build_dataset(cfg(shapes_dir, image_size=32, hflip=True))
    train, val = split_validation(ds, 6)
    assert len(train) == 18 and len(val) == 6 and train.training and not val.training
    train_idx = {train[i]["index"].item() for i in range(len(train))}
    val_pixels = [val[(i, 7)]["image"] for i in range(len(val))]
    train_pixels = [train[i]["image"] for i in range(len(train))]
    assert not any(torch.equal(v, t) for v in val_pixels for t in train_pixels)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # spread over the classes
    assert len(train_idx) == 18
    again_train, again_val = split_validation(ds, 6)
    assert all(torch.equal(val_pixels[i], again_val[i]["image"]) for i in range(6))
    with pytest.raises(DataError, match="cannot hold out 24"):
        split_validation(ds, 24)


# ----------------------------------------------------------------------------- order

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_resumed_sampler_reproduces_the_uninterrupted_sequence():
    full = _take(ResumableBatchSampler(10, 3, seed=5), 20)          # 3 batches per epoch
    for k in (1, 3, 7, 13):
        assert _take(ResumableBatchSampler(10, 3, seed=5, start_batch=k), 20 - k) == full[k:]
    epoch0 = [i for batch in full[:3] for i, _ in batch]
    epoch1 = [i for batch in full[3:6] for i, _ in batch]
    assert len(set(epoch0)) == 9 and epoch0 != epoch1             # a fresh permutation per epoch
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    assert _take(ResumableBatchSampler(10, 3, seed=6), 3) != full[:3]


def test_ranks_partition_each_global_batch():
    world, batch = 3, 2
    per_rank = [_take(ResumableBatchSampler(20, batch, seed=1, rank=r, world_size=world), 9)
                for r in range(world)]
    single = _take(ResumableBatchSampler(20, batch * world, seed=1), 9)
    for step in range(9):
        union = [key for r in range(world) for key in per_rank[r][step]]
        assert len({i for i, _ in union}) == batch * world
        assert union == single[step]                              # same data as one big process
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 2, seed=0, world_size=3)
    with pytest.raises(DataError, match="rank 3"):
        ResumableBatchSampler(20, 2, seed=0, rank=3, world_size=3)


def test_loader_resumes_with_identical_batches_across_worker_counts(shapes_dir):
    ds = build_dataset(cfg(shapes_dir, image_size=32, hflip=True, random_crop_scale=0.6), masks=True)
    reference = make_loader(ds, batch_size=4, seed=2, num_workers=0)
    batches = [b for _, b in zip(range(8), reference)]
    resumed = make_loader(ds, batch_size=4, seed=2, start_batch=5, num_workers=2)
    assert not resumed.pin_memory or torch.cuda.is_available()
    for expected, got in zip(batches[5:], resumed):
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["mask"].shape == (4, 1, 32, 32)


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_foreground_is_recoverable_and_reproducible():
    images, masks, labels = render_shape_batch(60, image_size=32, seed=4)
    assert labels.tolist() == [i % 3 for i in range(60)]
    assert min(mask_iou(foreground_mask(im), m) for im, m in zip(images, masks)) > 0.95
    assert all(0.03 < m.mean() < 0.5 for m in masks)
    more_images, more_masks, _ = render_shape_batch(70, image_size=32, seed=4)
    np.testing.assert_array_equal(more_images[:60], images)
    # background pixels are not mistaken for shapes: the mask is not the whole image
    assert not foreground_mask(images)[~masks].any()
    # the classes differ in shape: circles fill more of their bounding box than triangles
    fill = [m.sum() / (np.ptp(np.nonzero(m)[0]) + 1) / (np.ptp(np.nonzero(m)[1]) + 1) for m in masks]
    by_class = [np.mean([f for f, lab in zip(fill, labels) if lab == c]) for c in range(3)]
    assert by_class[0] > by_class[2] + 0.15


def test_plain_background_keeps_the_shapes_and_colours_of_the_textured_set():
    textured, masks, labels = render_shape_batch(12, image_size=32, seed=3)
    plain, plain_masks, plain_labels = render_shape_batch(12, image_size=32, seed=3, background="plain")
    np.testing.assert_array_equal(plain_masks, masks)
    np.testing.assert_array_equal(plain_labels, labels)
    assert (plain[~masks] == round(PLAIN_GREY * 255)).all()
    assert not (textured[~masks] == round(PLAIN_GREY * 255)).all()
    assert min(mask_iou(foreground_mask(im), m) for im, m in zip(plain, masks)) > 0.95


def test_shapes_dir_files_match_rendered_arrays(shapes_dir):
    images, masks, labels = render_shape_batch(24, image_size=32, seed=0)
    rows = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(np.asarray(Image.open(shapes_dir / row["file_name"])), images[i])
        np.testing.assert_array_equal(np.asarray(Image.open(shapes_dir / row["mask_file_name"])) > 0, masks[i])
        assert row["label"] == labels[i]
    with pytest.raises(FileExistsError):
        make_shapes(shapes_dir, 2)
