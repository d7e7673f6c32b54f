"""train.ot_pairing (modules/core/ot_pairing.py): the assignment against brute force, pairing within each class
(never across, the optimum within each, and the noise each class gets still N(0, I)), what pairing does to
noise-data distances, the pool's bookkeeping, and a resumed OT run equal to a straight one."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment as scipy_assignment

from modules.core.ot_pairing import PairedPool, assignment, pair_noise


def brute_force(cost: np.ndarray) -> float:
    """The least total cost of an assignment, over every permutation."""
    n = cost.shape[0]
    return min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n, kind", [(1, "normal"), (2, "normal"), (5, "normal"), (7, "normal"), (6, "ties"),
                                     (7, "negative")])
def test_assignment_is_the_brute_force_optimum(n, kind):
    rng = np.random.default_rng(n)
    if kind == "ties":
        cost = rng.integers(0, 3, size=(n, n)).astype(float)
    elif kind == "negative":
        cost = rng.normal(size=(n, n)) * 100
    else:
        cost = ((rng.normal(size=(n, 1, 16)) - rng.normal(size=(1, n, 16))) ** 2).sum(-1)
    column = assignment(torch.from_numpy(cost)).numpy()
    assert sorted(column.tolist()) == list(range(n))            # a permutation
    assert cost[np.arange(n), column].sum() == pytest.approx(brute_force(cost), rel=1e-12, abs=1e-9)


def shuffled_classes(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def test_pairing_within_class_never_crosses_classes_and_is_optimal_in_each():
    """Each class's rows get a permutation of the noise drawn at its own rows, by the least-cost assignment of
    that class (brute force over the 6 or 7 rows of each of 3 classes); data of one class far from the others."""
    g = torch.Generator().manual_seed(0)
    labels = shuffled_classes(20, 3, g)
    x1 = torch.randn(20, 2, 2, 2, generator=g) + 3 * labels.view(-1, 1, 1, 1)
    noise = torch.randn(20, 2, 2, 2, generator=g)
    paired = pair_noise(x1, noise, labels)
    for c in range(3):
        rows = labels == c
        mine = sorted(map(tuple, noise[rows].flatten(1).tolist()))
        assert sorted(map(tuple, paired[rows].flatten(1).tolist())) == mine
        cost = torch.cdist(x1[rows].flatten(1).double(), noise[rows].flatten(1).double()).pow(2).numpy()
        distance = (x1[rows].double() - paired[rows].double()).pow(2).sum().item()
        assert distance == pytest.approx(brute_force(cost), rel=1e-9)
    crossed = pair_noise(x1, noise)             # one assignment over the pool moves noise across classes
    assert any(sorted(map(tuple, crossed[labels == c].flatten(1).tolist()))
               != sorted(map(tuple, noise[labels == c].flatten(1).tolist())) for c in range(3))


def test_noise_paired_with_each_class_is_still_standard_normal():
    """Three classes whose latents sit 2.5 apart along their own axis, 60 pools of 96 rows (fixed seed): the noise
    paired with class c, projected on class c's axis, passes a Kolmogorov-Smirnov test against N(0, 1) (p > 0.001; and
    has mean ~ 0, variance ~ 1 over all its elements); one assignment over the whole pool shifts it
    towards the class (the test sees it: p < 1e-6)."""
    g = torch.Generator().manual_seed(0)
    within, across = {c: [] for c in range(3)}, {c: [] for c in range(3)}
    for _ in range(60):
        labels = shuffled_classes(96, 3, g)
        x1 = torch.randn(96, 4, 2, 2, generator=g) * 0.5
        x1.view(96, -1)[torch.arange(96), labels] += 2.5
        noise = torch.randn(96, 4, 2, 2, generator=g)
        for out, paired in ((within, pair_noise(x1, noise, labels)), (across, pair_noise(x1, noise))):
            for c in range(3):
                out[c].append(paired[labels == c].flatten(1))
    for c in range(3):
        mine = torch.cat(within[c]).double()
        assert stats.kstest(mine[:, c].numpy(), "norm").pvalue > 1e-3       # three tests at a fixed seed
        assert abs(mine.mean().item()) < 0.03 and abs(mine.var().item() - 1) < 0.03     # 30720 values
        assert stats.kstest(torch.cat(across[c])[:, c].double().numpy(), "norm").pvalue < 1e-6


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


def test_a_class_pool_pairs_within_each_class():
    """by_class: the noise drawn at a class's rows stays with that class, even where the other class's data is
    nearer; without it, one assignment over the pool gives every row the nearest draw."""
    def load(m):
        return torch.tensor([[0.0], [10.0]]) + m, torch.tensor([0, 1])

    def draw_noise(m, x1):
        return torch.tensor([[10.0], [0.0]]) + m      # each class's rows drew the noise at the other's data

    for by_class, expected in ((False, [[0.0, 10.0], [1.0, 11.0]]), (True, [[10.0, 0.0], [11.0, 1.0]])):
        pool = PairedPool(2, load, draw_noise, by_class=by_class)
        assert [pool(m)[2].flatten().tolist() for m in range(2)] == expected


def test_ot_run_resumed_mid_pool_equals_a_straight_run(shapes_dir, tiny_vae_run, tmp_path):
    """Pool of 3 micro-batches (class-conditional: paired within each class), checkpoint at step 4: the resumed
    run rebuilds the pool of steps 3-5."""
    import train_unet
    from modules.run.export import read_weights

    def train(out, *extra):
        train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                         str(out), "--report-to", "none", "objective=flow", "cond.type=class", "train.ot_pairing=true",
                         "train.ot_pool=3",
                         "train.checkpoint_every=4", "train.image_log_every=100", *extra])
    train(tmp_path / "straight", "--max-steps", "6")
    train(tmp_path / "split", "--max-steps", "4")
    train(tmp_path / "split", "--max-steps", "6", "--resume", "latest")
    a, b = read_weights(tmp_path / "straight" / "unet"), read_weights(tmp_path / "split" / "unet")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
