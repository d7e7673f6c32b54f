"""pytorch-fid's Inception weights (``pt_inception-2015-12-05-6726825d.pth``, a plain state dict): read without
running code into modules/eval/fid_inception.py, whose features equal pytorch-fid's own network on the same
weights (a frozen fixture computed with pytorch-fid 0.3.0: tests/fixtures/pytorch_fid_inception), and chosen
by evaluate.py ``--inception`` from the file's content."""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from modules.errors import MetricsError
from modules.eval.features import load_image, load_inception
from support import fid_inception_inputs, random_fid_inception_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pytorch_fid_inception"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """The fixture's random weights, saved as torch.save writes them today (zip) and as it did in 2019, when
    pytorch-fid's file was made (the legacy pickle format)."""
    root = tmp_path_factory.mktemp("fid_inception")
    state = random_fid_inception_weights()
    torch.save(state, root / "zip.pth")
    torch.save(state, root / "legacy.pth", _use_new_zipfile_serialization=False)
    return {"state": state, "zip": root / "zip.pth", "legacy": root / "legacy.pth"}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_our_network_gives_pytorch_fids_features_on_its_weights(weights, layout):
    """Within 1e-4 of the features' size (pytorch-fid's and ours were equal to the last bit where the fixture was
    made; the margin is for another machine's convolution kernels; pytorch-fid's normalisation against
    NVIDIA's, 127.5 against 128, moves them by about 1e-2)."""
    net = load_inception(weights[layout])
    expected = np.load(FIXTURE / "expected.npz")
    with torch.no_grad():
        for name, images in fid_inception_inputs().items():
            want = expected[f"features_{name}"]
            got = net(images, return_features=True).numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
            # The Inception Score's class probabilities: pool_3 times the logits' weight, without the bias.
            fc = weights["state"]["fc.weight"].double().numpy()
            logits = want.astype(np.float64) @ fc.T
            unbiased = np.exp(logits - logits.max(1, keepdims=True))
            np.testing.assert_allclose(net(images, no_output_bias=True).numpy(),
                                       unbiased / unbiased.sum(1, keepdims=True), rtol=1e-3, atol=1e-7)


def folder_of_images(folder: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_evaluate_takes_the_state_dict_without_a_hash_and_checks_one_given(weights, tmp_path, capsys):
    """The state dict runs no code when loaded, so no --inception-sha256 is needed; one given must match."""
    images = folder_of_images(tmp_path / "images")
    words = ["stats", "--inception", str(weights["zip"]), "--image-size", "32", "--workers", "1", str(images)]
    assert evaluate.main([*words, "--out", str(tmp_path / "ref.npz")]) == 0
    net = load_inception(weights["zip"])
    with torch.no_grad():
        direct = net(torch.stack([torch.from_numpy(load_image(p, 32)[0]) for p in sorted(images.iterdir())]),
                     return_features=True).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "ref.npz")["features"], direct, rtol=0,
                               atol=1e-5 * np.abs(direct).max())        # float32 rounding of the convolutions
    good = hashlib.sha256(weights["zip"].read_bytes()).hexdigest()
    assert evaluate.main([*words, "--inception-sha256", good, "--out", str(tmp_path / "again.npz")]) == 0
    capsys.readouterr()
    assert evaluate.main([*words, "--inception-sha256", "0" * 64, "--out", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and good in err and "0" * 64 in err, err


class WritesAMarker:
    """A pickle that creates a file when unpickled (what a crafted weights file could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(tmp_path: Path, kind: str, weights: dict) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "other_zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("weights/model.json", "{}")
    elif kind == "code":
        torch.save({"Conv2d_1a_3x3.conv.weight": WritesAMarker(tmp_path / "marker")}, path)
    elif kind == "legacy_code":
        with open(path, "wb") as f:
            pickle.dump(WritesAMarker(tmp_path / "marker"), f, protocol=2)
    elif kind == "other_keys":
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    elif kind == "other_shapes":
        torch.save({**weights["state"], "fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    return path


@pytest.mark.parametrize("kind, needle", [
    ("random_bytes", "neither a TorchScript archive"),
    ("other_zip", "neither a TorchScript archive"),
    ("code", "not a plain state dict"),
    ("legacy_code", "neither a TorchScript archive"),
    ("other_keys", "472 missing keys"),
    ("other_shapes", "2 keys of other shapes (e.g. fc.bias)"),
    ("not_a_dict", "a list, not a state dict"),
])
def test_an_inception_file_of_anything_else_is_one_line_and_runs_no_code(weights, tmp_path, capsys, kind, needle):
    path = crafted(tmp_path, kind, weights)
    images = folder_of_images(tmp_path / "images")
    assert evaluate.main(["stats", "--inception", str(path), "--trust-inception-code", "--image-size", "32",
                          str(images), "--out", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err and str(path) in err, err
    assert not (tmp_path / "marker").exists()           # nothing was unpickled with code
    with pytest.raises(MetricsError):
        load_inception(path)
