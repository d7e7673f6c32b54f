"""Issue 21, the data layer: what a data folder, its metadata table or a saved data set can make the
program do. Each test names the finding (A10, A14, A16, A20, A22) or the rule (3, 4, 5, 7) it holds
to. A user's mistake is one ``DataError`` line naming the file, the row and the value."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config.schema import DataConfig
from modules.data.dataset import build_dataset
from modules.data.image_io import find_images
from modules.data.metadata import MAX_CLASSES, MAX_METADATA_LINE
from modules.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def cfg(path, **overrides) -> DataConfig:
    values = dict(path=str(path), image_size=SIZE, hflip=False, num_workers=0)
    values.update(overrides)
    return DataConfig(**values)


def images(folder: Path, n: int = 4, prefix: str = "") -> list[str]:
    """``n`` solid-colour PNGs in ``folder``; their names relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (SIZE, SIZE), COLOURS[i % len(COLOURS)]).save(folder / name)
        names.append(name)
    return names


def jsonl(folder: Path, rows: list, raw_lines: dict | None = None) -> Path:
    """``metadata.jsonl`` of ``rows`` (dicts, dumped); ``raw_lines``: {row index: text of that line} instead."""
    lines = [raw_lines[i] if raw_lines and i in raw_lines else json.dumps(r) for i, r in enumerate(rows)]
    path = folder / "metadata.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, f"not one short line: {message!r}"
    return message


def colour_of(item) -> tuple:
    return tuple(((item["image"][:, 0, 0] + 1) * 127.5).round().int().tolist())


# ============================================================================= A10, A22: labels

def test_a10_a_label_of_a_billion_is_refused_at_once_naming_the_row_and_the_limit(tmp_path):
    names = images(tmp_path)
    rows = [{"file_name": n, "label": i % 2} for i, n in enumerate(names)]
    rows[2]["label"] = 10 ** 9
    jsonl(tmp_path, rows)
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert time.perf_counter() - start < 2.0          # no class name is made per missing class
    message = one_line(e)
    assert "metadata.jsonl" in message and "line 3" in message and "1000000000" in message
    assert str(MAX_CLASSES) in message and MAX_CLASSES == 1 << 20


def test_a10_the_class_limit_is_the_networks():
    """The data refuses what the network's ``num_classes`` rule would refuse later, and nothing less."""
    from modules.core.networks.denoiser import Sizes
    from modules.core.settings import field_rules
    rules = field_rules(Sizes.__dataclass_fields__["num_classes"])
    assert not any(rule(MAX_CLASSES) for rule in rules) and any(rule(MAX_CLASSES + 1) for rule in rules)


def test_a10_integer_labels_below_the_limit_still_name_every_class(tmp_path):
    names = images(tmp_path)
    jsonl(tmp_path, [{"file_name": n, "label": label} for n, label in zip(names, [0, 5, 2, 5])])
    ds = build_dataset(cfg(tmp_path))
    assert ds.class_names == [str(i) for i in range(6)] and ds.labels.tolist() == [0, 5, 2, 5]


def test_a10_a_saved_data_set_with_a_label_of_a_billion_is_refused(tmp_path):
    import datasets
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (SIZE, SIZE), c) for c in COLOURS],
                                        "label": [0, 1, 10 ** 9, 1]})
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path / "saved"))
    message = one_line(e)
    assert "1000000000" in message and "[2]" in message and str(MAX_CLASSES) in message


BAD_LABELS = {              # the text of the label in a metadata.jsonl line, what the error must show
    "1e400": ("1e400", "inf"),
    "NaN": ("NaN", "nan"),
    "Infinity": ("Infinity", "inf"),
    "minus_infinity": ("-Infinity", "-inf"),
    "true": ("true", "True"),
    "float": ("2.5", "2.5"),
    "dict": ('{"a": 1}', "{'a': 1}"),
    "list": ("[1]", "[1]"),
    "negative": ("-1", "-1"),
    "huge_int": ("1" + "0" * 40, "1" + "0" * 40),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_a22_a_label_that_is_neither_an_integer_nor_a_name_is_one_line(tmp_path, case):
    text, shown = BAD_LABELS[case]
    names = images(tmp_path)
    rows = [{"file_name": n, "label": 0} for n in names]
    jsonl(tmp_path, rows, raw_lines={1: '{"file_name": "%s", "label": %s}' % (names[1], text)})
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    message = one_line(e)
    assert "metadata.jsonl" in message and "line 2" in message and "label" in message and shown in message


def test_a22_integral_numbers_and_names_are_labels(tmp_path):
    names = images(tmp_path)
    jsonl(tmp_path, [{"file_name": n, "label": v} for n, v in zip(names, [0, 1.0, "2", 1])])
    assert build_dataset(cfg(tmp_path)).labels.tolist() == [0, 1, 2, 1]     # JSON's 1.0 is the number 1
    jsonl(tmp_path, [{"file_name": n, "label": v} for n, v in zip(names, ["dog", "cat", "1e400", "cat"])])
    ds = build_dataset(cfg(tmp_path))
    assert ds.class_names == ["1e400", "cat", "dog"] and ds.labels.tolist() == [2, 1, 0, 1]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,label\n" + "".join(f"{n},{v}\n" for n, v in
                                                                      zip(names, [3, 1, 0, 3])))
    assert build_dataset(cfg(tmp_path)).labels.tolist() == [3, 1, 0, 3]


def test_a22_a_label_in_metadata_csv_beyond_the_limit_is_one_line(tmp_path):
    names = images(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,label\n" + "".join(
        f"{n},{v}\n" for n, v in zip(names, [0, 1, 99999999999999999999, 1])))
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert "metadata.csv" in one_line(e) and "line 4" in str(e.value) and str(MAX_CLASSES) in str(e.value)


# ============================================================================= A16, rule 7: encodings and field types

def test_a16_a_latin1_metadata_jsonl_names_the_file_line_and_byte(tmp_path):
    names = images(tmp_path)
    lines = [json.dumps({"file_name": n, "text": "a cafe"}) for n in names]
    lines[2] = lines[2].replace("cafe", "caf\u00e9")
    data = "".join(line + "\n" for line in lines).encode("latin-1")
    (tmp_path / "metadata.jsonl").write_bytes(data)
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), caption_column="text")
    message = one_line(e)
    assert "metadata.jsonl" in message and "line 3" in message and f"byte {data.index(0xE9)}" in message
    assert "UTF-8" in message


def test_a16_a_latin1_metadata_csv_names_the_file_line_and_byte(tmp_path):
    names = images(tmp_path)
    data = ("file_name,text\n" + "".join(f"{n},caf\u00e9\n" for n in names)).encode("latin-1")
    (tmp_path / "metadata.csv").write_bytes(data)
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), caption_column="text")
    message = one_line(e)
    assert "metadata.csv" in message and "line 2" in message and f"byte {data.index(0xE9)}" in message


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_a16_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name):
    names = images(tmp_path)
    if name.endswith(".csv"):
        text = "file_name,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names))
    else:
        text = "".join(json.dumps({"file_name": n, "label": i % 2}) + "\n" for i, n in enumerate(names))
    (tmp_path / name).write_bytes(text.encode("utf-8-sig"))
    ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 0, 1]


BAD_FIELDS = {      # a row's field and its JSON text: each is refused naming the line and the column
    "file_name_number": ("file_name", "12"),
    "file_name_empty": ("file_name", '""'),
    "file_name_null": ("file_name", "null"),
    "file_name_list": ("file_name", '["0.png"]'),
    "mask_file_name_number": ("mask_file_name", "5"),
    "mask_file_name_dict": ("mask_file_name", '{"path": "m.png"}'),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_rule7_every_metadata_field_has_its_type_checked(tmp_path, case):
    column, text = BAD_FIELDS[case]
    names = images(tmp_path)
    row = {"file_name": json.dumps(names[1]), "mask_file_name": json.dumps(names[0]), column: text}
    line = "{" + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}"
    jsonl(tmp_path, [{"file_name": n, "mask_file_name": names[0]} for n in names], raw_lines={1: line})
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), masks=True)
    message = one_line(e)
    assert "metadata.jsonl" in message and "line 2" in message and column in message


def test_rule7_a_caption_of_the_wrong_type_is_one_line(tmp_path):
    names = images(tmp_path)
    jsonl(tmp_path, [{"file_name": n, "text": t} for n, t in zip(names, ["a", ["b"], "c", "d"])])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), caption_column="text")
    assert "caption" in one_line(e) and "1.png" in str(e.value)


@pytest.mark.parametrize("name", ["x" * 5000 + ".png", "a\x00b.png", "sub/" * 3000 + "x.png"],
                         ids=["name_too_long", "nul_byte", "path_too_long"])
def test_rule7_a_file_name_the_file_system_cannot_take_is_one_line(tmp_path, name):
    names = images(tmp_path)
    jsonl(tmp_path, [{"file_name": n} for n in names] + [{"file_name": name}])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert "metadata.jsonl" in one_line(e) and "line 5" in str(e.value)


# ============================================================================= rule 5: bounded reads

def test_rule5_a_metadata_line_longer_than_the_limit_is_one_line_without_reading_it_whole(tmp_path):
    names = images(tmp_path)
    path = jsonl(tmp_path, [{"file_name": n, "text": "x"} for n in names])
    with open(path, "a") as f:
        f.write('{"file_name": "0.png", "text": "' + "x" * (100 << 20) + '"}\n')    # a 100 MB line
    import tracemalloc
    tracemalloc.start()
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), caption_column="text")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = one_line(e)
    assert "metadata.jsonl" in message and "line 5" in message and str(MAX_METADATA_LINE) in message
    assert peak < 4 * MAX_METADATA_LINE + (8 << 20), f"read {peak} bytes for one line"


def test_rule5_deeply_nested_json_is_one_line(tmp_path):
    names = images(tmp_path)
    deep = '{"file_name": "0.png", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    jsonl(tmp_path, [{"file_name": n} for n in names], raw_lines={3: deep})
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert "metadata.jsonl" in one_line(e) and "line 4" in str(e.value) and "nest" in str(e.value)


def test_rule5_a_number_of_more_digits_than_python_converts_is_one_line(tmp_path):
    names = images(tmp_path)
    jsonl(tmp_path, [{"file_name": n} for n in names], raw_lines={0: '{"file_name": "0.png", "label": ' +
                                                                   "9" * 5000 + "}"})
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert "metadata.jsonl" in one_line(e) and "line 1" in str(e.value)


def test_rule5_a_csv_field_above_the_csv_limit_is_one_line(tmp_path):
    names = images(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},x\n" for n in names[:3]) +
                                           f'{names[3]},"{"y" * 200_000}"\n')
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path), caption_column="text")
    assert "metadata.csv" in one_line(e) and "line 5" in str(e.value)


def test_rule5_a_jsonl_line_is_split_on_newlines_only(tmp_path):
    names = images(tmp_path)
    captions = ["one\u2028two", "three\x1cfour", "five\x85six", "seven\x0beight"]
    path = tmp_path / "metadata.jsonl"
    path.write_text("".join(json.dumps({"file_name": n, "text": c}, ensure_ascii=False) + "\n"
                            for n, c in zip(names, captions)), encoding="utf-8")
    ds = build_dataset(cfg(tmp_path), caption_column="text")
    assert [ds[i]["caption"] for i in range(4)] == captions


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels (grey), with an empty image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_rule5_a_mask_that_is_a_decompression_bomb_is_skipped_at_the_scan(tmp_path, caplog):
    names = images(tmp_path)
    for n in names:
        Image.new("L", (SIZE, SIZE), 255).save(tmp_path / f"m{n}")
    (tmp_path / "m2.png").write_bytes(_bomb_png(20000, 20000))
    jsonl(tmp_path, [{"file_name": n, "mask_file_name": f"m{n}"} for n in names])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(cfg(tmp_path), masks=True)
    assert len(ds) == 3 and ds.skipped_files == [str(tmp_path / "2.png")]
    assert any("m2.png" in r.getMessage() and "decompression" in r.getMessage() for r in caplog.records)


# ============================================================================= rule 3: masks/ is never images

def test_rule3_masks_folders_inside_class_folders_are_not_images(tmp_path, caplog):
    for cls in ("cat", "dog"):
        images(tmp_path / cls, 3)
        images(tmp_path / cls / "masks", 3)
    with caplog.at_level(logging.INFO):
        ds = build_dataset(cfg(tmp_path))
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"]
    assert any("masks" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert len(find_images(tmp_path)) == 6                  # the same scan FID folders use
    assert len(find_images(tmp_path / "cat" / "masks")) == 3    # a masks folder asked for is read


def test_rule3_a_flat_folder_with_masks_counts_only_the_images(tmp_path):
    images(tmp_path, 4)
    images(tmp_path / "masks", 4)
    assert len(build_dataset(cfg(tmp_path))) == 4 and len(find_images(tmp_path)) == 4
    assert len(build_dataset(cfg(tmp_path), masks=True)) == 4


def test_rule3_a_metadata_row_naming_a_mask_as_its_image_is_refused(tmp_path):
    names = images(tmp_path)
    images(tmp_path / "masks")
    jsonl(tmp_path, [{"file_name": n} for n in names] + [{"file_name": "masks/1.png"}])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(tmp_path))
    assert "line 5" in one_line(e) and "masks/1.png" in str(e.value)


# ============================================================================= A14: an output folder inside the data

def test_a14_an_output_dir_inside_the_data_folder_is_skipped_and_resume_keeps_three_classes(
        shapes_dir, tiny_vae_run, tmp_path, caplog):
    import train_unet
    data = tmp_path / "data"
    for cls in ("circle", "square", "triangle"):
        shutil.copytree(shapes_dir / cls, data / cls)
    out = data / "run"
    args = ["--config", "tiny", "--data", str(data), "--vae", str(tiny_vae_run), "--output-dir", str(out),
            "--report-to", "none", "cond.type=class", "train.checkpoint_every=2", "train.image_log_every=2",
            f"cache_dir={tmp_path / 'cache'}"]
    with caplog.at_level(logging.INFO):
        train_unet.main(args + ["--max-steps", "2"])
    assert list(out.rglob("*.png")), "the run wrote no sample grid inside the data folder"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_unet.main(args + ["--max-steps", "4", "--resume", "latest"])
    messages = [r.getMessage() for r in caplog.records]
    scans = [m for m in messages if m.startswith("ImageDataset(")]
    assert scans and all("24 images, 3 classes" in m for m in scans), scans
    assert any(f"skipping {out}" in m and "output" in m for m in messages)
    assert (out / "checkpoints" / "step_4").is_dir()


# ============================================================================= A20, rule 4: paths stay inside their root

def _saved_with_paths(tmp_path: Path, paths: list) -> Path:
    """A real ``save_to_disk`` folder whose image column's rows hold only a path (``bytes`` None)."""
    import datasets
    import pyarrow as pa
    saved = tmp_path / "saved"
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (SIZE, SIZE), (9, 9, 9))] * len(paths),
                                        "label": [i % 2 for i in range(len(paths))]})
    table.save_to_disk(str(saved))
    (arrow,) = glob.glob(str(saved / "*.arrow"))
    with pa.memory_map(arrow) as m:
        data = pa.ipc.open_stream(m).read_all()
    field = data.schema.field("image")
    column = pa.array([{"bytes": None, "path": p} for p in paths], type=field.type)
    data = data.set_column(data.schema.get_field_index("image"), field, column)
    with pa.OSFile(arrow, "wb") as f, pa.ipc.new_stream(f, data.schema) as writer:
        writer.write_table(data)
    return saved


@pytest.mark.parametrize("how", ["absolute", "climbing"])
def test_a20_save_to_disk_rows_holding_a_path_outside_the_data_set_are_refused(tmp_path, how):
    outside = images(tmp_path / "outside")
    inside_dir = tmp_path / "saved"
    far = [str(tmp_path / "outside" / n) if how == "absolute" else f"../outside/{n}" for n in outside]
    names = images(inside_dir / "files")
    saved = _saved_with_paths(tmp_path, [f"files/{names[0]}", far[1], f"files/{names[2]}", far[3]])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(saved))
    message = one_line(e)
    assert "[1]" in message and "outside" in message and far[1] in message


def test_a20_save_to_disk_rows_holding_a_path_inside_read_it_from_the_data_set_not_the_current_directory(
        tmp_path, monkeypatch):
    saved_dir = tmp_path / "saved"
    names = images(saved_dir / "files")
    saved = _saved_with_paths(tmp_path, [f"files/{names[0]}", str(saved_dir / "files" / names[1])])
    decoy = tmp_path / "elsewhere"
    images(decoy / "files", 4, prefix="")
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(decoy / "files" / names[0])
    monkeypatch.chdir(decoy)
    ds = build_dataset(cfg(saved))
    assert [colour_of(ds[i]) for i in range(2)] == [COLOURS[0], COLOURS[1]]


def test_a20_a_save_to_disk_image_replaced_behind_a_path_changes_the_fingerprint(tmp_path):
    saved_dir = tmp_path / "saved"
    names = images(saved_dir / "files")
    saved = _saved_with_paths(tmp_path, [f"files/{n}" for n in names])
    before = build_dataset(cfg(saved)).fingerprint()
    target = saved_dir / "files" / names[1]
    replacement = tmp_path / "new.png"
    Image.new("RGB", (SIZE, SIZE), (7, 7, 7)).save(replacement)
    os.replace(replacement, target)
    assert build_dataset(cfg(saved)).fingerprint() != before


def test_rule4_a_metadata_name_that_climbs_out_or_is_absolute_is_refused(tmp_path):
    images(tmp_path / "outside", 1)
    data = tmp_path / "data"
    names = images(data)
    for bad in ("../outside/0.png", str(tmp_path / "outside" / "0.png"), "sub/../../outside/0.png"):
        jsonl(data, [{"file_name": n} for n in names] + [{"file_name": bad}])
        with pytest.raises(DataError) as e:
            build_dataset(cfg(data))
        assert "outside the data folder" in one_line(e) and "line 5" in str(e.value)


def test_rule4_links_inside_the_data_folder_are_followed_as_class_folder_links_are(tmp_path):
    """The decision: a path written in a file is checked as written (no ``..``, not absolute); a link is
    something the user made in the data folder, and is followed, as links to class folders are."""
    outside = tmp_path / "outside"
    images(outside, 2)
    data = tmp_path / "data"
    names = images(data, 2)
    os.symlink(outside / "1.png", data / "linked.png")
    os.symlink(outside, data / "linked_dir")
    listed = names + ["linked.png", "linked_dir/0.png"]
    jsonl(data, [{"file_name": n, "label": "x"} for n in listed])
    ds = build_dataset(cfg(data))
    assert [colour_of(ds[i]) for i in range(4)] == [COLOURS[0], COLOURS[1], COLOURS[1], COLOURS[0]]


# ============================================================================= rule 7 through the command line

@pytest.mark.parametrize("case", ["label_1e400", "latin1"])
def test_rule7_bad_metadata_through_train_vae_is_one_error_line(tmp_path, case):
    data = tmp_path / "data"
    names = images(data, 8)
    rows = [json.dumps({"file_name": n, "label": 0}) for n in names]
    if case == "label_1e400":
        rows[5] = '{"file_name": "%s", "label": 1e400}' % names[5]
        (data / "metadata.jsonl").write_text("".join(r + "\n" for r in rows))
    else:
        rows[5] = rows[5].replace('"label": 0', '"label": "caf\u00e9"')
        (data / "metadata.jsonl").write_bytes("".join(r + "\n" for r in rows).encode("latin-1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "train_vae.py", "--config", "tiny", "--report-to", "none", "--data",
                          str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "metadata.jsonl" in lines[-1] and "line 6" in lines[-1], lines[-1]


def test_rule4_listed_images_gives_evaluate_what_training_reads(tmp_path):
    """``modules.data.metadata.listed_images``: the one reader of a folder's metadata table for every program."""
    from modules.data.metadata import listed_images
    names = images(tmp_path)
    assert listed_images(tmp_path) is None
    (tmp_path / "metadata.csv").write_bytes(("file_name\n" + "".join(f"{n}\n" for n in names)).encode("utf-8-sig"))
    assert listed_images(tmp_path) == [tmp_path / n for n in names]
    (tmp_path / "metadata.csv").write_text("file_name\n../x.png\n")
    with pytest.raises(DataError, match="line 2.*outside the data folder"):
        listed_images(tmp_path)


def test_square_image_is_the_data_sets_item_without_augmentation(tmp_path):
    """The one decoding of an un-augmented item (``image_io.square_image``), used by the data set and the
    stream sources alike."""
    from modules.data.image_io import square_image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)).save(tmp_path / "b.jpg", quality=90)
    ds = build_dataset(cfg(tmp_path, image_size=16))
    for i, name in enumerate(["a.png", "b.jpg"]):
        assert torch.equal(ds[i]["image"], square_image(tmp_path / name, 16))


@pytest.mark.parametrize("value", [b"1e400", "nan", 10 ** 9, -1, True, 2.5, b"\xff", "cat", None])
def test_a10_a22_a_single_class_number_is_checked_too(value):
    from modules.data.metadata import class_number
    with pytest.raises(DataError) as e:
        class_number(value, "shard-0.tar, sample 7")
    assert "shard-0.tar, sample 7" in one_line(e)
    assert class_number(b"3", "x") == 3 and class_number(" 4\n", "x") == 4 and class_number(5.0, "x") == 5
