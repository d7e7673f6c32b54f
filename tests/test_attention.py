"""modules/attention.py: the SDPA path against explicit softmax attention, backend choice and fallback."""
import logging
import sys
import types

import pytest
import torch

from modules.core import attention as attn_mod
from modules.core.attention import attention, attention_backend, reset_attention_backends

REAL_XFORMERS_CAPABLE = attn_mod._xformers_capable


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out, [B, H, N, D]."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def xformers_layout_reference(q, k, v):
    """What memory_efficient_attention computes, in its own [B, N, H, D] layout."""
    return reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.fixture(autouse=True)
def fresh_backends(monkeypatch):
    monkeypatch.delenv("LDM_ATTENTION", raising=False)
    reset_attention_backends()
    yield
    reset_attention_backends()


def install_fake_xformers(monkeypatch, fn):
    """Make ``from xformers.ops import memory_efficient_attention`` return ``fn`` and pretend CPU is CUDA."""
    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = fn
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attn_mod, "_xformers_capable", lambda device: True)


def random_qkv(b, h, n, m, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("b,h,n,m,d", [(1, 1, 1, 1, 8), (2, 3, 17, 17, 16), (2, 4, 64, 64, 32),
                                       (3, 2, 10, 7, 8), (1, 5, 4, 77, 64)])
def test_sdpa_path_matches_explicit_softmax_attention(b, h, n, m, d):
    q, k, v = random_qkv(b, h, n, m, d)
    out = attention(q, k, v)
    assert out.shape == (b, h, n, d)
    assert (out - reference_attention(q, k, v)).abs().max().item() < 1e-12


def test_cpu_backend_is_sdpa_even_with_working_xformers(monkeypatch):
    calls = []
    install_fake_xformers(monkeypatch, lambda q, k, v: calls.append(1) or xformers_layout_reference(q, k, v))
    monkeypatch.setattr(attn_mod, "_xformers_capable", REAL_XFORMERS_CAPABLE)
    assert REAL_XFORMERS_CAPABLE(torch.device("cuda"))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert attention_backend("cpu", dtype) == "sdpa"
    assert calls == []


def test_working_xformers_is_used_with_layout_transposes(monkeypatch, caplog):
    calls = []

    def fake(q, k, v):
        calls.append(q.shape)
        return xformers_layout_reference(q, k, v)

    install_fake_xformers(monkeypatch, fake)
    with caplog.at_level(logging.INFO, logger="modules.core.attention"):
        assert attention_backend("cpu", torch.float64) == "xformers"
        q, k, v = random_qkv(2, 3, 5, 9, 8)
        out = attention(q, k, v)
        attention(q, k, v)
    assert (out - reference_attention(q, k, v)).abs().max().item() < 1e-12
    # one probe, then two real calls that received the [B, N, H, D] layout
    assert len(calls) == 3 and calls[1] == (2, 5, 3, 8)
    chosen = [r for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(chosen) == 1 and "xformers" in chosen[0].getMessage()


def test_environment_variable_forces_sdpa(monkeypatch):
    calls = []
    install_fake_xformers(monkeypatch, lambda q, k, v: calls.append(1) or xformers_layout_reference(q, k, v))
    monkeypatch.setenv("LDM_ATTENTION", "sdpa")
    assert attention_backend("cpu", torch.float32) == "sdpa"
    assert calls == []
    monkeypatch.setenv("LDM_ATTENTION", "flash")
    reset_attention_backends()
    with pytest.raises(ValueError, match="LDM_ATTENTION"):
        attention_backend("cpu", torch.float32)


@pytest.mark.parametrize("failure", ["raises", "wrong_numbers"])
def test_failed_probe_falls_back_to_sdpa(monkeypatch, failure):
    calls = []

    def broken(q, k, v):
        calls.append(1)
        if failure == "raises":
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        return torch.zeros_like(q)

    install_fake_xformers(monkeypatch, broken)
    q, k, v = random_qkv(2, 2, 6, 6, 16, dtype=torch.float32)
    out = attention(q, k, v)
    assert attention_backend("cpu", torch.float32) == "sdpa"
    assert torch.allclose(out, reference_attention(q, k, v), atol=1e-5)
    attention(q, k, v)
    assert calls == [1]  # probed once per (device type, dtype), never called again


def test_compiled_attention_probes_at_trace_time_without_graph_breaks(monkeypatch):
    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise NotImplementedError("No operator found")

    install_fake_xformers(monkeypatch, broken)
    compiled = torch.compile(lambda q, k, v: 2 * attention(q, k, v), backend="eager", fullgraph=True)
    q, k, v = random_qkv(1, 2, 5, 5, 8, dtype=torch.float32)
    for _ in range(2):
        out = compiled(q, k, v)
    assert torch.allclose(out, 2 * reference_attention(q, k, v), atol=1e-5)
    assert calls == [1] and attention_backend("cpu", torch.float32) == "sdpa"
