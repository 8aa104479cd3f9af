"""Winograd F(m x m, 3 x 3) convolution for CPU fp32 inference, and the pass that puts it into a ResNet.

A stride-1 3x3 convolution computed on (m+2)x(m+2) input tiles that overlap by 2: each tile is
transformed (B^T d B), multiplied channel-wise by the transformed weights (G g G^T) in (m+2)^2
batched matrix products, and transformed back (A^T M A) to an m x m output tile. For m = 4 that is
36 products of [tiles, C] x [C, O] instead of 9 x 16 = 144 per tile: 4x fewer multiply-adds than a
direct convolution. Every transform is one matrix product over all tiles and channels, so the
whole convolution is six large torch ops (oneDNN/MKL do the work).

The matrices come from the Cook-Toom construction on the interpolation points (0, 1, -1, 2, -1/2, inf)
(Barabasz et al. 2020) rather than Lavin's (0, +-1, +-2, inf): their rounding error is several
times smaller, close to a direct convolution's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fast.scratch import ScratchBuffers

POINTS = {2: (0.0, 1.0, -1.0), 4: (0.0, 1.0, -1.0, 2.0, -0.5)}


def winograd_matrices(m: int, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T [m, n], G [n, r], B^T [n, n]) in float64 for F(m, r), n = m + r - 1, such that
    A^T [(G g) * (B^T d)] is the correlation of d (length n) with g (length r)."""
    n = m + r - 1
    points = torch.tensor(POINTS[m], dtype=torch.float64)
    a_t = torch.zeros(m, n, dtype=torch.float64)
    g = torch.zeros(n, r, dtype=torch.float64)
    for j, p in enumerate(points):
        a_t[:, j] = p ** torch.arange(m, dtype=torch.float64)
        others = torch.cat([points[:j], points[j + 1:]])
        g[j] = p ** torch.arange(r, dtype=torch.float64) / torch.prod(p - others)
    a_t[m - 1, n - 1] = 1.0  # the point at infinity
    g[n - 1, r - 1] = 1.0
    # B^T is what makes the identity hold; it is linear in B^T, so solve for it over basis vectors.
    equations, targets = [], []
    for i in range(m):
        for k in range(r):
            for col in range(n):
                coefficients = torch.zeros(n, n, dtype=torch.float64)
                coefficients[:, col] = a_t[i] * g[:, k]
                equations.append(coefficients.flatten())
                targets.append(float(col - i == k))
    system, rhs = torch.stack(equations), torch.tensor(targets, dtype=torch.float64)
    b_t = torch.linalg.lstsq(system, rhs).solution
    b_t = torch.round(b_t.view(n, n) * 64) / 64  # exact dyadic values: drop lstsq's 1e-16 noise
    residual = (system @ b_t.flatten() - rhs).abs().max()
    assert residual < 1e-12, f"F({m}, {r}) on points {POINTS[m]}: B^T is not dyadic (residual {residual:.1e})"
    return a_t, g, b_t


class WinogradConv2d(nn.Conv2d):
    """A stride-1, padding-1, 3x3 nn.Conv2d that runs as Winograd F(m x m, 3 x 3) on CPU fp32 without
    autograd or autocast (elsewhere, and under torch.compile, the ordinary convolution). The weights
    are the taken-over convolution's; the transformed copy is a buffer outside the state_dict."""

    @classmethod
    def taking_over(cls, conv: nn.Conv2d, m: int = 4) -> WinogradConv2d:
        if not eligible(conv):
            raise ValueError(f"Winograd needs a 3x3 convolution with stride 1, padding 1, no groups: got {conv}")
        new = cls(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None, device="meta")
        new.weight = conv.weight  # the same Parameter objects
        new.bias = conv.bias
        new.tile = m
        a_t, g, b_t = winograd_matrices(m)
        n = m + 2
        weight = conv.weight.detach().double()
        transformed = torch.einsum("ai,ocij,bj->abco", g, weight, g).reshape(n * n, conv.in_channels, -1)
        bias = torch.zeros(n * n, 1, conv.out_channels, dtype=torch.float64)
        if conv.bias is not None:
            # A^T's column 1 is all ones (point 1), so M[1, 1] reaches every output of the tile once.
            bias[n + 1, 0] = conv.bias.detach().double()
        dtype, device = conv.weight.dtype, conv.weight.device
        new.register_buffer("winograd_weight", transformed.to(device, dtype).contiguous(), persistent=False)
        new.register_buffer("winograd_bias", bias.to(device, dtype), persistent=False)
        new.register_buffer("input_transform", torch.kron(b_t, b_t).to(device, dtype), persistent=False)
        new.register_buffer("output_transform", torch.kron(a_t, a_t).to(device, dtype), persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_winograd(x):
            return self.winograd(x, relu=False)
        return super().forward(x)

    def runs_winograd(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def winograd(self, x: torch.Tensor, relu: bool, scratch: ScratchBuffers | None = None) -> torch.Tensor:
        """conv2d(x) (+ ReLU), x [N, C, H, W]; the result is channels_last. With `scratch`, the
        temporaries and the result are carved out of its arena "winograd": the result is valid
        until the next call with the same `scratch` (fast.fused_layers.FusedResidualLayer, whose next
        convolution reads it before any other Winograd convolution of the model runs)."""
        m, n = self.tile, self.tile + 2
        batch, channels, height, width = x.shape
        out_channels = self.out_channels
        rows, cols = -(-height // m), -(-width // m)
        tiles_count = batch * rows * cols
        whole = rows * m == height and cols * m == width
        shapes = {"padded": (batch, m * rows + 2, m * cols + 2, channels), "tiles": (n * n, batch, rows, cols, channels),
                  "transformed": (n * n, tiles_count * channels), "products": (n * n, tiles_count, out_channels),
                  "out_tiles": (m * m, tiles_count * out_channels), "tiled": (batch, rows * m, cols * m, out_channels),
                  "out": (batch, height, width, out_channels)}
        views: dict[str, torch.Tensor] = {}
        if scratch is not None:
            if whole:
                del shapes["out"]
            sizes = {name: math.prod(shape) for name, shape in shapes.items()}
            flat = scratch.arena("winograd", sum(sizes.values()), x)
            start = 0
            for name, shape in shapes.items():
                views[name] = flat[start:start + sizes[name]].view(shape)
                start += sizes[name]

        # NHWC, padded by 1 on top/left and up to whole tiles on bottom/right.
        if "padded" in views:
            padded = views["padded"]
            padded.zero_()[:, 1:height + 1, 1:width + 1].copy_(x.permute(0, 2, 3, 1))
        else:
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, m * cols + 1 - width, 1, m * rows + 1 - height))
        tiles = torch.stack([padded[:, i:i + m * rows:m, j:j + m * cols:m] for i in range(n) for j in range(n)],
                            out=views.get("tiles"))
        transformed = torch.mm(self.input_transform, tiles.view(n * n, -1), out=views.get("transformed"))
        products = torch.baddbmm(self.winograd_bias, transformed.view(n * n, -1, channels), self.winograd_weight,
                                 out=views.get("products"))
        out_tiles = torch.mm(self.output_transform, products.view(n * n, -1), out=views.get("out_tiles"))
        out_tiles = out_tiles.view(m, m, batch, rows, cols, out_channels).permute(2, 3, 0, 4, 1, 5)
        out = views.get("tiled")
        if out is None:
            out = torch.empty(shapes["tiled"], dtype=x.dtype, device=x.device)
        tiled_out = out.view(batch, rows, m, cols, m, out_channels)
        if relu:
            torch.clamp_min(out_tiles, 0, out=tiled_out)
        else:
            tiled_out.copy_(out_tiles)
        if not whole:
            cropped = out[:, :height, :width]
            out = cropped.contiguous() if "out" not in views else views["out"].copy_(cropped)
        return out.permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3 convolution, stride 1, padding 1, dilation 1, one group, zero padding."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


# Below 128 channels the tile transforms cost more than the 4x fewer multiply-adds save (layer1).
WINOGRAD_MIN_CHANNELS = 128


@torch.no_grad()
def winograd_convolutions(model: nn.Module, min_channels: int = WINOGRAD_MIN_CHANNELS) -> nn.Module:
    """Every ResNet block's stride-1 3x3 convolution with >= `min_channels` inputs becomes a
    `WinogradConv2d` (same weights; CPU fp32 inference only, elsewhere the same convolution).
    Call it after fold_frozen_batchnorm (it transforms the weights as they are then); returns `model`."""
    for block in model.modules():
        if type(block) in (BasicBlock, Bottleneck):
            for name in ("conv1", "conv2") if type(block) is BasicBlock else ("conv2",):
                conv = getattr(block, name)
                if eligible(conv) and conv.in_channels >= min_channels:
                    setattr(block, name, WinogradConv2d.taking_over(conv))
    return model
