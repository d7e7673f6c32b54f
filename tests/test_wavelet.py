"""Haar DWT / IDWT exactness and the gated wavelet resampling blocks."""
from __future__ import annotations

import pytest
import torch

from modules.core.wavelet import SubbandGate, WaveletDownsample, WaveletUpsample, dwt, idwt, wavelet_bands, wavelet_loss


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 5, 6, 10), (3, 1, 2, 2)])
def test_idwt_inverts_dwt_exactly_in_float64(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bands = dwt(x)
    b, c, h, w = shape
    assert bands.shape == (b, 4 * c, h // 2, w // 2)
    assert torch.allclose(idwt(bands), x, atol=1e-10, rtol=0)
    # The transform is also a bijection the other way round.
    assert torch.allclose(dwt(idwt(bands)), bands, atol=1e-10, rtol=0)


def test_dwt_preserves_energy():
    x = torch.randn(2, 4, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    energy_in = x.square().sum(dim=(1, 2, 3))
    energy_out = dwt(x).square().sum(dim=(1, 2, 3))
    assert torch.allclose(energy_in, energy_out, rtol=1e-12)


def test_dwt_coefficients_and_band_major_channel_layout():
    # Two channels, one 2x2 block each: [[a, b], [c, d]].
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, -1.0], [0.0, 2.0]]]], dtype=torch.float64)
    bands = dwt(x)[0, :, 0, 0]

    def haar(a, b, c, d):
        return [(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]

    ll0, lh0, hl0, hh0 = haar(1, 2, 3, 4)
    ll1, lh1, hl1, hh1 = haar(5, -1, 0, 2)
    # Channels: [LL of c0, LL of c1, LH of c0, LH of c1, HL ..., HH ...].
    expected = torch.tensor([ll0, ll1, lh0, lh1, hl0, hl1, hh0, hh1], dtype=torch.float64)
    assert torch.equal(bands, expected)


def test_constant_image_has_only_low_band():
    x = torch.full((2, 3, 8, 8), 0.7, dtype=torch.float64)
    ll, lh, hl, hh = dwt(x).chunk(4, dim=1)
    assert torch.allclose(ll, torch.full_like(ll, 1.4), atol=1e-12)   # 4 * 0.7 / 2
    for band in (lh, hl, hh):
        assert band.abs().max().item() == 0.0


def test_horizontal_stripes_land_in_lh_only():
    # Rows alternate +1 / -1: high frequency along y, constant along x.
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    x[:, :, 1::2] = -1
    ll, lh, hl, hh = dwt(x).chunk(4, dim=1)
    assert torch.allclose(lh, torch.full_like(lh, 2.0))
    for band in (ll, hl, hh):
        assert band.abs().max().item() == 0.0


def test_dwt_refuses_odd_sizes_and_idwt_bad_channels():
    with pytest.raises(ValueError, match="even"):
        dwt(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        idwt(torch.zeros(1, 6, 4, 4))


def test_gate_gives_every_subband_of_every_channel_its_own_weight():
    torch.manual_seed(0)
    gate = SubbandGate(4 * 3)
    bands = dwt(torch.randn(2, 3, 8, 8))
    g = gate.gates(bands)
    assert g.shape == (2, 12)
    assert ((g > 0) & (g < 1)).all()
    per_band = g.view(2, 4, 3)
    # Not one value shared by the four sub-bands of a channel (the seed's defect).
    assert (per_band.max(dim=1).values - per_band.min(dim=1).values).min() > 1e-4
    assert torch.allclose(gate(bands), bands * g[:, :, None, None])


@pytest.mark.parametrize("in_ch,out_ch", [(8, 8), (8, 16), (16, 4)])
def test_gated_blocks_keep_shapes_and_train(in_ch, out_ch):
    torch.manual_seed(0)
    x = torch.randn(2, in_ch, 8, 12, requires_grad=True)
    for block, size in ((WaveletDownsample(in_ch, out_ch), (4, 6)), (WaveletUpsample(in_ch, out_ch), (16, 24))):
        y = block(x)
        assert y.shape == (2, out_ch, *size)
        y.square().mean().backward()
        for name, param in block.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert x.grad.abs().sum() > 0
        x.grad = None


def test_downsample_sees_high_frequencies():
    # A strided subsampling would map these two images (same even-pixel values) to the same output.
    torch.manual_seed(0)
    block = WaveletDownsample(1, 4)
    smooth = torch.ones(1, 1, 8, 8)
    striped = smooth.clone()
    striped[:, :, 1::2] = -1
    assert not torch.allclose(block(smooth), block(striped), atol=1e-3)


def test_upsample_output_is_idwt_of_gated_conv():
    torch.manual_seed(0)
    block = WaveletUpsample(4, 2)
    x = torch.randn(1, 4, 5, 5)
    bands = block.conv(x)
    expected = idwt(bands * block.gate.gates(bands)[:, :, None, None])
    assert torch.allclose(block(x), expected, atol=1e-6)


# ----------------------------------------------------------------------------- the iSM wavelet loss

def columns(pattern, size=16):
    """An image [1, 1, size, size] whose columns repeat ``pattern``: vertical stripes of one frequency."""
    return torch.tensor(pattern, dtype=torch.float64).repeat(size // len(pattern)).repeat(size, 1)[None, None]


def test_wavelet_loss_of_single_frequency_stripes():
    """Period-2 stripes (+1, -1) have all their energy in level 1's HL band (coefficient 2, mean square 4);
    period-4 stripes (+1, +1, -1, -1) in level 2's HL (coefficient 4, mean square 16). With equal band
    weights the loss is that band's mean square over 3L + 1 bands; the pixel MSE is 1 for both."""
    fine, coarse = columns([1, -1]), columns([1, 1, -1, -1])
    band_means = [b.pow(2).mean().item() for b in wavelet_bands(fine, 2)]   # LH1 HL1 HH1 LH2 HL2 HH2 LL2
    assert band_means == [0, 4, 0, 0, 0, 0, 0]
    assert [b.pow(2).mean().item() for b in wavelet_bands(coarse, 2)] == [0, 0, 0, 0, 16, 0, 0]
    assert wavelet_loss(fine, 1).item() == pytest.approx(4 / 4)
    assert wavelet_loss(fine, 2).item() == pytest.approx(4 / 7)
    assert wavelet_loss(coarse, 2).item() == pytest.approx(16 / 7)
    assert fine.pow(2).mean().item() == coarse.pow(2).mean().item() == 1.0


def test_band_size_weights_would_give_back_the_pixel_mse():
    """Why the per-band normalisation matters: weighted by coefficient count, the bands of the orthonormal
    transform sum to the pixel MSE exactly."""
    error = torch.randn(3, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bands = wavelet_bands(error, 3)
    by_size = sum(b.pow(2).flatten(1).sum(1) for b in bands) / error[0].numel()
    torch.testing.assert_close(by_size, error.pow(2).flatten(1).mean(1))
    equal = torch.stack([b.pow(2).flatten(1).mean(1) for b in bands], 1).mean(1)
    torch.testing.assert_close(wavelet_loss(error, 3), equal)
    assert not torch.allclose(equal, by_size)
