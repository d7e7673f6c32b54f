"""EMA: closed-form averages, bit-exact swapping, state-dict round trips."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modules.core.ema import EMA


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.frozen = nn.Parameter(torch.ones(2, dtype=dtype), requires_grad=False)
        self.register_buffer("stat", torch.zeros(2, dtype=dtype))


def set_all(model, values):
    with torch.no_grad():
        model.lin.weight.copy_(values[0])
        model.lin.bias.copy_(values[1])


def closed_form(initial, sequence, decay, warmup):
    """s_N = prod(d) s_0 + sum_n (1 - d_n) prod_{m > n} d_m v_n, in float64."""
    n = len(sequence)
    d = np.array([min(decay, (1 + i) / (10 + i)) if warmup else decay for i in range(n)])
    out = np.prod(d) * initial
    for i, v in enumerate(sequence):
        out = out + (1 - d[i]) * np.prod(d[i + 1:]) * v
    return out


@pytest.mark.parametrize("warmup", [True, False])
def test_shadow_matches_closed_form(warmup):
    torch.manual_seed(0)
    model = Net()
    initial = [model.lin.weight.detach().double().numpy().copy(), model.lin.bias.detach().double().numpy().copy()]
    ema = EMA(model, decay=0.9, warmup=warmup)
    seq = [[torch.randn(2, 3), torch.randn(2)] for _ in range(40)]
    for values in seq:
        set_all(model, values)
        ema.update(model)
    for k, name in enumerate(["lin.weight", "lin.bias"]):
        ref = closed_form(initial[k], [v[k].double().numpy() for v in seq], 0.9, warmup)
        assert np.allclose(ema.shadow[name].numpy(), ref, atol=1e-6)
    assert ema.num_updates == 40
    assert set(ema.shadow) == {"lin.weight", "lin.bias"}   # frozen parameters and buffers are not averaged


def test_warmup_decay_schedule():
    model = Net()
    ema = EMA(model, decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([0.1, 2 / 11, 3 / 12])
    ema.load_state_dict({**ema.state_dict(), "num_updates": torch.tensor(10 ** 6)})
    assert ema.current_decay() == pytest.approx(0.999)
    assert EMA(Net(), decay=0.999, warmup=False).current_decay() == pytest.approx(0.999)


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_an_update_flagged_not_finite_changes_nothing_and_is_not_counted(decay):
    """A skipped training step skips the EMA on the device: shadow and count bit-identical."""
    torch.manual_seed(0)
    model = Net()
    ema, twin = EMA(model, decay=decay), EMA(model, decay=decay)
    for finite in (True, False, True, False, False, True):
        set_all(model, [torch.randn(2, 3), torch.randn(2)])
        before = {k: v.clone() for k, v in ema.shadow.items()}
        ema.update(model, torch.tensor(finite))
        if finite:
            twin.update(model)
        else:
            assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
    assert ema.num_updates == twin.num_updates == 3
    assert all(torch.equal(ema.shadow[k], twin.shadow[k]) for k in ema.shadow)


def test_decay_zero_tracks_latest_weights():
    model = Net()
    for warmup in (True, False):
        ema = EMA(model, decay=0.0, warmup=warmup)
        for _ in range(3):
            values = [torch.randn(2, 3), torch.randn(2)]
            set_all(model, values)
            ema.update(model)
            assert torch.equal(ema.shadow["lin.weight"], values[0])
            assert torch.equal(ema.shadow["lin.bias"], values[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swapped_restores_bit_exact(dtype):
    torch.manual_seed(0)
    model = Net(dtype)
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        set_all(model, [torch.randn(2, 3), torch.randn(2)])
        ema.update(model)
    assert ema.shadow["lin.weight"].dtype == torch.float32
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model) as swapped:
        assert swapped is model
        assert torch.equal(model.lin.weight, ema.shadow["lin.weight"].to(dtype))
        assert torch.equal(model.lin.bias, ema.shadow["lin.bias"].to(dtype))
        assert not torch.equal(model.lin.weight, original["lin.weight"])
        assert model.lin.weight.dtype == dtype and model.lin.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.uint8), original[k].view(torch.uint8)), k   # bit for bit
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped(model):
            raise RuntimeError("inside")
    assert torch.equal(model.lin.weight, original["lin.weight"])


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, decay=0.99)
    for _ in range(7):
        set_all(model, [torch.randn(2, 3), torch.randn(2)])
        ema.update(model)
    sd = ema.state_dict()
    assert set(sd) == {"shadow.lin.weight", "shadow.lin.bias", "num_updates"}
    save_file(sd, tmp_path / "ema.safetensors")   # plain tensors: safetensors accepts them
    restored = EMA(Net(), decay=0.99)
    restored.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    assert restored.num_updates == 7
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name])
    set_all(model, [torch.randn(2, 3), torch.randn(2)])
    ema.update(model)
    restored.update(model)   # same decay step after the reload
    assert torch.equal(restored.shadow["lin.weight"], ema.shadow["lin.weight"])


def test_load_state_dict_names_bad_keys():
    ema = EMA(Net(), decay=0.99)
    sd = ema.state_dict()
    bad = {k: v for k, v in sd.items() if k != "shadow.lin.bias"}
    bad["shadow.other.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: \[shadow.lin.bias\]; unexpected keys: \[shadow.other.weight\]"):
        ema.load_state_dict(bad)
    wrong_shape = dict(sd, **{"shadow.lin.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'shadow.lin.bias' has shape \(3,\), expected \(2,\)"):
        ema.load_state_dict(wrong_shape)


def test_update_refuses_a_different_model():
    ema = EMA(Net(), decay=0.99)
    with pytest.raises(ValueError, match=r"missing in model: \[lin.weight, lin.bias\]; not in shadow: \[weight, bias\]"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(Net(), decay=1.0)


# ----------------------------------------------------------------------------- FSDP2 (two CPU ranks, gloo)

def _fsdp2_worker(rank, port):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))

        x = torch.ones(3, 4)
        model = build()
        fully_shard(model)
        with torch.no_grad():
            model(x)   # FSDP2 now keeps the root's gathered parameters
        ema = EMA(model, decay=0.5, warmup=False)
        assert ema.shadow["0.weight"].shape == (3, 4)   # this rank's shard of the [6, 4] weight
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        ema.update(model)   # shadow = (w + 3 w) / 2 = 2 w
        online = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        with ema.swapped(model):
            with torch.no_grad():
                teacher_out = model(x)
        with torch.no_grad():
            after_out = model(x)
        reference = build()
        reference.load_state_dict({n: v * 2 / 3 for n, v in online.items()})
        assert torch.allclose(teacher_out, reference(x), atol=1e-6), "swapped forward did not use the shadow"
        reference.load_state_dict(online)
        assert torch.allclose(after_out, reference(x), atol=1e-6), "forward after the swap used stale weights"
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, where gloo's background threads
    # have aborted a finished worker (seen once in the suite).
    os._exit(0)


def test_swapped_under_fsdp2_with_two_ranks():
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp2_worker, args=(port,), nprocs=2)


# ----------------------------------------------------------------------------- FSDP1 (two CPU ranks, gloo)

FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")   # the HYBRID modes and NO_SHARD are untested


def _fsdp1_worker(rank, port):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2)))

        x = torch.ones(3, 4)
        for strategy in FSDP1_STRATEGIES:
            # accelerate's FSDP1 setup: the root unit (holding the first Linear) and a nested unit.
            root = FSDP(build(), device_id=torch.device("cpu"), use_orig_params=True,
                        auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}),
                        sharding_strategy=ShardingStrategy[strategy])
            owner = root.module                      # what accelerator.unwrap_model returns
            with torch.no_grad():
                root(x)                              # FSDP1 now keeps the root unit's gathered parameters
            ema = EMA(owner, decay=0.5, warmup=False, root=root)
            with torch.no_grad():
                for p in owner.parameters():
                    p.mul_(3.0)
            ema.update(owner)                        # shadow = 2 w, the online weights are 3 w
            with FSDP.summon_full_params(root):
                online = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                          for n, p in owner.named_parameters()}
            with ema.swapped(owner), torch.no_grad():
                teacher_out = root(x)
            with torch.no_grad():
                after_out = root(x)
            reference = build()
            reference.load_state_dict({n: v * 2 / 3 for n, v in online.items()})
            assert torch.allclose(teacher_out, reference(x), atol=1e-6), \
                f"{strategy}: the swapped forward did not use the shadow"
            reference.load_state_dict(online)
            assert torch.allclose(after_out, reference(x), atol=1e-6), \
                f"{strategy}: the forward after the swap used stale weights"
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, where gloo's background threads
    # have aborted a finished worker (seen once in the suite).
    os._exit(0)


def test_swapped_under_fsdp1_reaches_the_root_unit():
    """accelerate's unwrap_model strips the root FSDP1 wrapper: the EMA must release the root's
    gathered parameters through ``root``, or the swap silently does not happen there. Both
    sharding modes: SHARD_GRAD_OP keeps every unit's gathered parameters after a forward."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp1_worker, args=(port,), nprocs=2)


def test_the_teacher_runs_in_eval_mode_with_the_ema_weights():
    """Bootstrap targets carry no dropout noise (the official code calls the teacher with train=False)."""
    from modules.core.ema import teacher
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2)).train()
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)
    x = torch.randn(4, 3)
    reference = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2)).eval()
    reference.load_state_dict(ema.shadow)
    with teacher(model, model, ema)() as t, torch.no_grad():
        first, second = t(x), t(x)
    assert torch.equal(first, second) and torch.allclose(first, reference(x), atol=1e-6)
    assert model.training                        # back in train mode, with its own weights
    with teacher(model, model, None)() as t, torch.no_grad():
        assert torch.equal(t(x), t(x)) and not t.training
