"""MobileNetV3 Large and Small (Howard et al. 2019, "Searching for MobileNetV3").

The architecture is data: LARGE and SMALL below are the paper's Tables 1 and 2, one
typed row per bottleneck, and one generic `InvertedResidual` module builds every row.
Module names match torchvision's `mobilenet_v3_large` / `mobilenet_v3_small`, so at
width 1.0 a state_dict moves between the two unchanged (the key mapping is the identity).
timm's mobilenetv3_large_100 / _small_100 are the same network under other names
(pretrained.py maps them); only their BatchNorm eps differs (`bn_eps`). Stochastic depth
(`drop_path`) sits where timm puts it, for timm's training recipe.

    python -m model mobilenetv3_large_100     # params and multiply-adds at 224x224
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

# Non-linearities as the paper's tables name them.
RE = nn.ReLU
HS = nn.Hardswish

BN_EPS = 1e-3  # TF's defaults, which torchvision's published weights were trained with;
BN_MOMENTUM = 0.01  # PyTorch's momentum is 1 - TF's decay (0.99). timm's weights: eps 1e-5.
# A run's own momentum (auto_bn_momentum): the initial running statistics must weigh under
# SETTLED_WEIGHT once SETTLE_FRACTION of the run's steps are done; never above PyTorch's default.
SETTLE_FRACTION, SETTLED_WEIGHT, MAX_BN_MOMENTUM = 0.05, 0.01, 0.1


class Bneck(NamedTuple):
    """One "bneck" row of Table 1/2, in the paper's column order."""

    kernel: int  # depthwise kernel size (3 or 5)
    exp: int  # expansion size: channels inside the block
    out: int  # output channels
    se: bool  # squeeze-and-excitation after the depthwise conv
    nl: type[nn.Module]  # non-linearity, RE or HS
    stride: int


@dataclass(frozen=True)
class Arch:
    stem: int  # 3x3 stride-2 conv + BN + HS, the table's first row
    blocks: tuple[Bneck, ...]
    last_conv: int  # 1x1 conv + BN + HS before pooling
    head: int  # 1x1 conv without BN + HS after pooling (a Linear on the pooled vector)


LARGE = Arch(  # Table 1; comments give each row's input at 224x224
    stem=16,
    blocks=(
        #     k  exp  out   SE     NL  s
        Bneck(3, 16, 16, False, RE, 1),  # 112² x 16
        Bneck(3, 64, 24, False, RE, 2),  # 112² x 16
        Bneck(3, 72, 24, False, RE, 1),  # 56² x 24
        Bneck(5, 72, 40, True, RE, 2),  # 56² x 24
        Bneck(5, 120, 40, True, RE, 1),  # 28² x 40
        Bneck(5, 120, 40, True, RE, 1),  # 28² x 40
        Bneck(3, 240, 80, False, HS, 2),  # 28² x 40
        Bneck(3, 200, 80, False, HS, 1),  # 14² x 80
        Bneck(3, 184, 80, False, HS, 1),  # 14² x 80
        Bneck(3, 184, 80, False, HS, 1),  # 14² x 80
        Bneck(3, 480, 112, True, HS, 1),  # 14² x 80
        Bneck(3, 672, 112, True, HS, 1),  # 14² x 112
        Bneck(5, 672, 160, True, HS, 2),  # 14² x 112
        Bneck(5, 960, 160, True, HS, 1),  # 7² x 160
        Bneck(5, 960, 160, True, HS, 1),  # 7² x 160
    ),
    last_conv=960,
    head=1280,
)

SMALL = Arch(  # Table 2
    stem=16,
    blocks=(
        #     k  exp  out   SE     NL  s
        Bneck(3, 16, 16, True, RE, 2),  # 112² x 16
        Bneck(3, 72, 24, False, RE, 2),  # 56² x 16
        Bneck(3, 88, 24, False, RE, 1),  # 28² x 24
        Bneck(5, 96, 40, True, HS, 2),  # 28² x 24
        Bneck(5, 240, 40, True, HS, 1),  # 14² x 40
        Bneck(5, 240, 40, True, HS, 1),  # 14² x 40
        Bneck(5, 120, 48, True, HS, 1),  # 14² x 40
        Bneck(5, 144, 48, True, HS, 1),  # 14² x 48
        Bneck(5, 288, 96, True, HS, 2),  # 14² x 48
        Bneck(5, 576, 96, True, HS, 1),  # 7² x 96
        Bneck(5, 576, 96, True, HS, 1),  # 7² x 96
    ),
    # Table 2 ticks SE on this conv, but the authors' TF code, torchvision and the
    # published weights have none there (and 2,542,856 parameters only without it).
    last_conv=576,
    head=1024,
)


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% below `channels`.

    The rule of the authors' TF code: multiples of 8 keep vector units full.
    """
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias: BN follows) + BatchNorm + optional activation; keys .0 / .1 as torchvision."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = None):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention (paper section 5.3): pool, squeeze to 1/4, ReLU, expand, hard-sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels / 4)
        # 1x1 convs rather than Linear so the weights have torchvision's shapes and names.
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training each sample's branch
    is zeroed with probability p and kept ones are scaled by 1 / (1 - p), so the expectation is
    unchanged; in eval, the identity. One Bernoulli draw per sample, made exactly as timm's
    drop_path makes it, so a seeded run drops the same samples as timm."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class InvertedResidual(nn.Module):
    """One bneck row: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 linear project (+ input)."""

    def __init__(self, in_ch: int, exp_ch: int, out_ch: int, row: Bneck, drop_path: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        if exp_ch != in_ch:  # the first Large row has nothing to expand
            layers.append(ConvBNAct(in_ch, exp_ch, act=row.nl))
        layers.append(ConvBNAct(exp_ch, exp_ch, row.kernel, row.stride, groups=exp_ch, act=row.nl))
        if row.se:
            layers.append(SqueezeExcite(exp_ch))
        layers.append(ConvBNAct(exp_ch, out_ch))  # no activation: the projection is linear
        self.block = nn.Sequential(*layers)
        self.use_residual = row.stride == 1 and in_ch == out_ch
        # Only a residual branch can be dropped; no parameters, so state_dicts are unchanged.
        self.drop_path = DropPath(drop_path) if self.use_residual and drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return self.drop_path(y) + x if self.use_residual else y


class MobileNetV3(nn.Module):
    """`dropout`: before the classifier. `drop_path`: stochastic depth rate of the deepest block
    (timm's drop_path_rate; 0 = off). `bn_eps`: every BatchNorm's eps."""

    def __init__(self, arch: Arch, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2,
                 drop_path: float = 0.0, bn_eps: float = BN_EPS):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"--drop-path {drop_path}: give a rate in [0, 1)")
        stem = make_divisible(arch.stem * width)
        layers: list[nn.Module] = [ConvBNAct(3, stem, kernel=3, stride=2, act=HS)]
        in_ch, table_in = stem, arch.stem
        # timm's schedule: block i of n drops with drop_path * i / n, where timm counts the last
        # 1x1 conv as a block too (it has no residual, so it never drops).
        num_blocks = len(arch.blocks) + 1
        for i, row in enumerate(arch.blocks):
            out_ch = make_divisible(row.out * width)
            # The expansion is a ratio of the block's (already rounded) input, as in the authors'
            # TF code that produced the paper's Table 3 numbers for width 0.75 (155M MAdds, 4.0M
            # params). torchvision scales the exp column on its own instead (140M, 3.4M); at
            # width 1.0 both give the table exactly.
            exp_ch = make_divisible(in_ch * row.exp / table_in)
            layers.append(InvertedResidual(in_ch, exp_ch, out_ch, row, drop_path * i / num_blocks))
            in_ch, table_in = out_ch, row.out
        last_conv = make_divisible(arch.last_conv * width)
        layers.append(ConvBNAct(in_ch, last_conv, act=HS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The head keeps its table width below width 1.0 (the TF code's "finegrain
        # classification mode", which the paper's 0.75 numbers use): it is cheap, and the
        # classifier needs the capacity.
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, arch.head),
            HS(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(arch.head, num_classes),
        )
        init_weights(self)
        set_bn_eps(self, bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def init_weights(module: nn.Module) -> None:
    """torchvision's init: He (fan-out) for convs, BN as identity, small normal for Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def set_bn_eps(module: nn.Module, eps: float) -> None:
    """eps is not in a state_dict: weights must be used with the eps they were trained with."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """How fast the running statistics (what evaluation normalises with) follow the batches."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


def auto_bn_momentum(total_steps: int) -> float:
    """The BatchNorm momentum for a run of `total_steps` optimizer steps. The running statistics
    start at mean 0, variance 1 and move by `momentum` per step, so at the model's 0.01 a short run
    (a few hundred steps) evaluates mostly with its initial statistics: at chance. This is the
    momentum at which they weigh under 1% after the first 5% of the run, clamped to [0.01, 0.1]:
    0.1 up to ~870 steps, the model's own 0.01 from ~9,200 (the reference's 600 epochs of 1,251)."""
    settle_steps = max(1.0, SETTLE_FRACTION * total_steps)
    momentum = 1.0 - SETTLED_WEIGHT ** (1.0 / settle_steps)
    return round(min(MAX_BN_MOMENTUM, max(BN_MOMENTUM, momentum)), 4)


def get_bn_eps(module: nn.Module) -> float:
    """The eps its BatchNorms run with (set_bn_eps keeps them all the same): checkpoints carry it."""
    return next(m.eps for m in module.modules() if isinstance(m, nn.BatchNorm2d))


def mobilenetv3_large(width: float = 1.0, **kwargs) -> MobileNetV3:
    return MobileNetV3(LARGE, width, **kwargs)


def mobilenetv3_small(width: float = 1.0, **kwargs) -> MobileNetV3:
    return MobileNetV3(SMALL, width, **kwargs)
