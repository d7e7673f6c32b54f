"""pytorch-fid's FID Inception-v3 (the TF "inception-2015-12-05" graph) in plain PyTorch, for its weights file.

pytorch-fid publishes the TF graph's weights as a plain state dict,
``pt_inception-2015-12-05-6726825d.pth``, in torchvision's ``Inception3`` key layout
(``num_classes=1008``, no auxiliary head: 94 conv + BN units ``<name>.conv.weight``,
``<name>.bn.{weight,bias,running_mean,running_var}``, and ``fc.weight`` [1008, 2048], ``fc.bias``);
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same keys. Such a file is
read with ``torch.load(weights_only=True)``, which runs no code, into :class:`FIDInceptionV3`.

The network is an adaptation of torchvision's ``Inception3`` (torchvision/models/inception.py,
BSD 3-Clause License, Copyright (c) Soumith Chintala 2016) with pytorch-fid's FID patches
(pytorch_fid/inception.py ``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1``,
``FIDInceptionE_2``; Apache License 2.0, Copyright Maximilian Seitzer), written without either
package: the 3x3 average pools of blocks A, C and the first E leave the zero padding out of the
mean (``count_include_pad=False``, as TF does), the last E block max-pools its pool branch, and BN
uses eps 1e-3, frozen. With the same weights its features equal pytorch-fid 0.3.0's
``InceptionV3([3], resize_input=True, normalize_input=True)`` exactly (max difference 0.0 in
float32 for inputs of 32 to 512 px; tests/test_fid_inception.py checks a frozen fixture of them).

Preprocessing is pytorch-fid's: images in 0..255 are divided by 255, resized to 299x299 with
bilinear ``F.interpolate`` (``align_corners=False``; the identity for 299 px inputs), then mapped
to [-1, 1] by ``2x - 1``. NVIDIA's TorchScript file resizes as TF1 did and maps by
``(x - 128) / 128`` instead, so its features differ slightly from these for the same weights.

The call convention is that of NVIDIA's TorchScript Inception, so the two are interchangeable in
modules/eval/features.py: ``net(x, return_features=True)`` gives the [B, 2048] pool_3 features,
``net(x)`` the softmax over the 1008 classes, and ``net(x, no_output_bias=True)`` that softmax
without the final bias (the Inception Score's convention: openai/improved-gan multiplies pool_3 by
the logits' weight alone, as torch-fidelity and StyleGAN2-ADA do).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_WIDTH = 2048
NUM_CLASSES = 1008


class FrozenBatchNorm(nn.Module):
    """BatchNorm with its running statistics, always in inference mode; keys as ``nn.BatchNorm2d``'s (a
    ``num_batches_tracked`` entry, present in torchvision's state dicts and absent from pytorch-fid's, is
    dropped)."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """Convolution without bias, frozen BN (eps 1e-3), ReLU: torchvision's ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_average_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3/1 SAME average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b, 5c, 5d."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_average_pool(x))], dim=1)


class BlockB(nn.Module):
    """Mixed_6a: the grid from 35 to 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockC(nn.Module):
    """Mixed_6b to 6e: factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          double,
                          self.branch_pool(tf_average_pool(x))], dim=1)


class BlockD(nn.Module):
    """Mixed_7a: the grid from 17 to 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch, as the TF graph has it)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_average_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(three), self.branch3x3_2b(three),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 with pytorch-fid's preprocessing; state-dict keys as pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_WIDTH, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)             # an evaluator: BN statistics never move

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in 0..255, any size -> [B, 2048] pool_3 features."""
        x = images.to(self.fc.weight.dtype) / 255
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.features(images)
        if return_features:
            return features
        logits = features @ self.fc.weight.T
        return torch.softmax(logits if no_output_bias else logits + self.fc.bias, dim=1)
