"""StyleGAN2 (config F family) in plain PyTorch: no compiled ops, runs on CPU and GPU.

Generator: mapping network z (+ optional class embedding) -> w with a tracked average for
truncation; synthesis from a learned 4x4 constant through modulated 3x3 convolutions with weight
demodulation and per-pixel noise, skip-architecture toRGB. Discriminator: residual blocks,
minibatch standard deviation, optional projection conditioning. Every layer uses the equalized
learning rate (weights stored at unit scale, multiplied by He's constant at run time).

Plain PyTorch ops stand in for the custom kernels: upsampling convolutions are stride-2
transposed convolutions followed by the [1,3,3,1] FIR blur (as upfirdn2d does), downsampling and
the toRGB skip path use average pooling / bilinear resampling, and modulation scales activations
before and after a shared convolution (the "non-fused" form StyleGAN2-ADA also uses in training),
which equals per-sample weight modulation exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)
SQRT_HALF = math.sqrt(0.5)


def channels_for(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (and a learning-rate multiplier)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activate: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        # leaky_relu(a * x) == a * leaky_relu(x) for a > 0, so the activation gain is folded
        # into the (small) weight and bias instead of costing a pass over the activations.
        out_gain = LRELU_GAIN if activate else 1.0
        self.weight_gain = lr_mul / math.sqrt(in_features) * out_gain
        self.bias_gain = lr_mul * out_gain
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) if self.activate else x


class EqualConv2d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        activate: bool = False,
        out_gain: float = 1.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Output gains (activation gain, residual 1/sqrt(2)) folded into weight and bias, as in
        # EqualLinear.
        self.bias_gain = out_gain * (LRELU_GAIN if activate else 1.0)
        self.weight_gain = self.bias_gain / math.sqrt(in_channels * kernel * kernel)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_gain
        x = F.conv2d(x, self.weight * self.weight_gain, bias, padding=self.weight.shape[-1] // 2)
        return F.leaky_relu(x, 0.2) if self.activate else x


FIR_TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])


def blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Depthwise [1,3,3,1] x [1,3,3,1] filter (sum ``gain``); 2H+1 -> 2H after a transposed conv."""
    channels = x.shape[1]
    taps = FIR_TAPS.to(x)
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2 * gain
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel.expand(channels, 1, 4, 4), groups=channels)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z (and a class embedding) -> w, with ``w_avg`` tracked for the truncation trick."""

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_layers: int,
        num_classes: int = 0,
        lr_mul: float = 0.01,
        w_avg_beta: float = 0.995,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        in_dim = z_dim + (w_dim if num_classes else 0)
        dims = [in_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[
                EqualLinear(a, b, lr_mul=lr_mul, activate=True)
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            x = torch.cat([x, normalize_2nd_moment(self.embed(c))], dim=1)
        w = self.layers(x)
        if update_w_avg:
            self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            w = self.w_avg.lerp(w, truncation_psi)
        return w


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional demodulation and 2x upsampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        w_dim: int,
        demodulate: bool = True,
        up: bool = False,
    ):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate, self.up = demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor, out_gain: float = 1.0) -> torch.Tensor:
        # The equalized-lr gain rides on the styles (N x C_in), not on the far larger weight.
        styles = self.affine(w) * self.weight_gain
        weight = self.weight
        x = x * styles[:, :, None, None]
        if self.up:
            # Stride-2 transposed conv (a quarter of the MACs of convolving at the output size),
            # then StyleGAN2's [1,3,3,1] FIR blur against checkerboard artefacts.
            x = blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), gain=4.0)
        else:
            x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            # sigma_j = sqrt(sum_i,k (w_ijk * s_i)^2): the std the modulated weights would give.
            dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
            x = x * (dcoefs * out_gain)[:, :, None, None]
        elif out_gain != 1.0:
            x = x * out_gain
        return x


class SynthesisLayer(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False
    ):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random"):
        # The activation gain rides on the demodulation coefficients, noise strength and bias.
        x = self.conv(x, w, out_gain=LRELU_GAIN)
        noise_strength = self.noise_strength * LRELU_GAIN
        if noise_mode == "random":
            noise = torch.randn(
                x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype
            )
            x = x + noise * noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * noise_strength
        return F.leaky_relu(x + (self.bias * LRELU_GAIN)[None, :, None, None], 0.2)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, img_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class SynthesisBlock(nn.Module):
    """One resolution: (upsample +) two modulated convs, and its toRGB added to the skip image."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int
    ):
        super().__init__()
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, img_channels, w_dim)
        self.num_ws = 2 if self.first else 3

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str):
        if self.first:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise_mode)
            y = self.torgb(x, ws[:, 1])
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
            y = self.torgb(x, ws[:, 2])
        if img is not None:
            y = y + F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
        return x, y


def _check_resolution(resolution: int) -> int:
    if resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two in 8..1024, got {resolution}")
    return int(np.log2(resolution))


class Generator(nn.Module):
    def __init__(
        self,
        resolution: int,
        img_channels: int,
        z_dim: int = 512,
        w_dim: int = 512,
        mapping_layers: int = 8,
        channel_base: int = 16384,
        channel_max: int = 512,
        num_classes: int = 0,
        mask_channels: int = 0,
    ):
        super().__init__()
        log2 = _check_resolution(resolution)
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.resolution, self.img_channels = resolution, img_channels
        self.blocks = nn.ModuleList()
        in_channels = 0
        for res in (2**i for i in range(2, log2 + 1)):
            out_channels = channels_for(res, channel_base, channel_max)
            self.blocks.append(SynthesisBlock(in_channels, out_channels, w_dim, res, img_channels))
            in_channels = out_channels
        # Consecutive blocks share the w of their boundary layer (toRGB of one, conv0 of next).
        self.num_ws = 2 * (log2 - 1)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes)
        # The last channels are masks (+1 a class is there, -1 it is not): squashed into that
        # range, as real masks are, so their values alone never tell drawn from real.
        self.mask_channels = mask_channels

    def synthesize(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        x = img = None
        index = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, index : index + block.num_ws], noise_mode)
            index += block.num_ws - 1
        if not self.mask_channels:
            return img
        split = img.shape[1] - self.mask_channels
        return torch.cat([img[:, :split], torch.tanh(img[:, split:])], dim=1)

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
    ) -> torch.Tensor:
        w = self.mapping(z, c, truncation_psi)
        return self.synthesize(w.unsqueeze(1).expand(-1, self.num_ws, -1), noise_mode)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activate=True)
        # The residual sum is scaled by 1/sqrt(2) through both branches' gains.
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activate=True, out_gain=SQRT_HALF)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, out_gain=SQRT_HALF)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        return self.conv1(F.avg_pool2d(self.conv0(x), 2)) + skip


def mbstd_group(n: int, group_size: int = 4) -> int:
    """The largest group size <= ``group_size`` that divides ``n``."""
    group = min(group_size, n)
    while n % group:
        group -= 1
    return group


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append the mean std over groups of samples as one feature map (StyleGAN's MBSTD).

    Groups are runs of consecutive samples, so a batch that stacks two sets (fakes, then reals)
    never mixes them when ``group_size`` divides the size of each set.
    """
    n, c, h, w = x.shape
    group = mbstd_group(n, group_size)
    y = x.reshape(n // group, group, c, h, w)
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1).add(1e-8).sqrt()
    y = y.mean(dim=(1, 2, 3)).repeat_interleave(group).reshape(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Residual discriminator; with ``num_classes`` a projection head scores the class too."""

    def __init__(
        self,
        resolution: int,
        img_channels: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        num_classes: int = 0,
    ):
        super().__init__()
        log2 = _check_resolution(resolution)
        self.from_rgb = EqualConv2d(
            img_channels, channels_for(resolution, channel_base, channel_max), 1, activate=True
        )
        self.blocks = nn.Sequential(
            *[
                DiscriminatorBlock(
                    channels_for(2**i, channel_base, channel_max),
                    channels_for(2 ** (i - 1), channel_base, channel_max),
                )
                for i in range(log2, 2, -1)
            ]
        )
        top = channels_for(4, channel_base, channel_max)
        self.conv = EqualConv2d(top + 1, top, 3, activate=True)
        self.fc = EqualLinear(top * 16, top, activate=True)
        self.out = EqualLinear(top, 1)
        self.embed = EqualLinear(num_classes, top) if num_classes else None

    def forward(
        self, img: torch.Tensor, c: torch.Tensor | None = None, mbstd_group_size: int = 4
    ) -> torch.Tensor:
        x = self.blocks(self.from_rgb(img))
        x = self.fc(self.conv(minibatch_stddev(x, mbstd_group_size)).flatten(1))
        score = self.out(x)
        if self.embed is not None:
            score = score + (self.embed(c) * x).sum(dim=1, keepdim=True) / math.sqrt(x.shape[1])
        return score
