"""train.ot_pairing (modules/ot_pairing.py): the exact assignment against scipy, what pairing does to
noise-data distances, the pool's bookkeeping, and a resumed OT run equal to a straight one."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_assignment

from modules.core.ot_pairing import PairedPool, linear_sum_assignment, pair_noise


@pytest.mark.parametrize("n, kind", [(1, "normal"), (2, "normal"), (7, "normal"), (64, "normal"), (200, "normal"),
                                     (30, "ties"), (25, "negative")])
def test_assignment_cost_equals_scipys(n, kind):
    rng = np.random.default_rng(n)
    if kind == "ties":
        cost = rng.integers(0, 3, size=(n, n)).astype(float)
    elif kind == "negative":
        cost = rng.normal(size=(n, n)) * 100
    else:
        cost = ((rng.normal(size=(n, 1, 16)) - rng.normal(size=(1, n, 16))) ** 2).sum(-1)
    column = linear_sum_assignment(cost)
    assert sorted(column.tolist()) == list(range(n))            # a permutation
    rows, cols = scipy_assignment(cost)
    assert cost[np.arange(n), column].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-12, abs=1e-9)


def test_pairing_shortens_noise_to_data_distances():
    """Data far from the noise's centre: OT pairing reduces the mean squared distance against the
    random pairing, keeps the noise rows (a permutation) and is optimal (scipy's cost)."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(128, 4, 4, 4, generator=g) * 0.5 + torch.linspace(-2, 2, 128).view(-1, 1, 1, 1)
    noise = torch.randn(128, 4, 4, 4, generator=g)
    paired = pair_noise(x1, noise)
    random = (x1 - noise).pow(2).flatten(1).sum(1).mean()
    ot = (x1 - paired).pow(2).flatten(1).sum(1).mean()
    assert ot < 0.9 * random                      # measured 0.81 of it
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))
    cost = torch.cdist(x1.flatten(1).double(), noise.flatten(1).double()).pow(2).numpy()
    rows, cols = scipy_assignment(cost)
    assert (x1 - paired).double().pow(2).sum().item() == pytest.approx(cost[rows, cols].sum(), rel=1e-9)


def test_pool_pairs_across_its_micro_batches_and_keeps_data_in_place():
    loads = []

    def load(m):
        loads.append(m)
        return torch.full((2, 1), float(10 * m)), torch.tensor([m, m])

    def draw_noise(m, x1):
        return torch.full_like(x1, float(10 * (2 - m % 3)))    # pool 0 draws noise 20, 10, 0 for data 0, 10, 20

    pool = PairedPool(3, load, draw_noise)
    got = [pool(m) for m in range(3)]
    assert loads == [0, 1, 2]
    for m, (x1, cond, noise) in enumerate(got):
        assert torch.equal(x1, torch.full((2, 1), 10.0 * m)) and torch.equal(cond, torch.tensor([m, m]))
        assert torch.equal(noise, x1)                 # each data row got the noise draw at zero distance
    pool(4)
    assert loads == [0, 1, 2, 3, 4, 5] and pool.start(4) == 3


def test_ot_run_resumed_mid_pool_equals_a_straight_run(shapes_dir, tiny_vae_run, tmp_path):
    """Pool of 3 micro-batches, checkpoint at step 4: the resumed run rebuilds the pool of steps 3-5."""
    import train_unet
    from modules.run.export import read_weights

    def train(out, *extra):
        train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                         str(out), "--report-to", "none", "objective=flow", "train.ot_pairing=true", "train.ot_pool=3",
                         "train.checkpoint_every=4", "train.image_log_every=100", *extra])
    train(tmp_path / "straight", "--max-steps", "6")
    train(tmp_path / "split", "--max-steps", "4")
    train(tmp_path / "split", "--max-steps", "6", "--resume", "latest")
    a, b = read_weights(tmp_path / "straight" / "unet"), read_weights(tmp_path / "split" / "unet")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
