"""DeviceAugment: the trainer's one entry point, around normalisation.

    aug = DeviceAugment(num_classes=1000, auto_augment="imagenet", random_erase=0.2)
    images = aug.before_normalize(images_u8, step, rank)     # uint8 -> uint8, per-sample policy
    x = normalize(images)
    x, targets = aug.after_normalize(x, labels, step, rank)  # erasing, then mixup/cutmix
    loss = F.cross_entropy(logits, targets)                  # works for int labels and soft targets

Every draw is a pure function of (seed, step, rank): a resumed run augments step k exactly as the
first run did, and ranks draw differently. Plans (ops, magnitudes, boxes, lambda) are drawn on
the host with a fresh CPU generator per call, so the batch is grouped by op with no device->host
read; per-pixel noise comes from a generator on the images' device.
"""
from __future__ import annotations

import numpy as np
import torch

from .autoaugment import apply_plan
from .erase import ERASE_MODES, erase, sample_erase_boxes
from .mix import MixParams, mix_images, sample_mix, soft_targets
from .policies import POLICIES, Slot, sample_plan

_MASK64 = (1 << 64) - 1
# Separate streams so that turning one augmentation on or off does not shift another's draws.
STREAM_POLICY, STREAM_ERASE, STREAM_NOISE, STREAM_MIX = range(4)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A 63-bit seed from the tuple; neighbouring steps or ranks give unrelated streams (a plain
    seed + step would make rank r at step s replay rank 0 at step s + r)."""
    h = 0
    for v in (seed, step, rank, stream):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class DeviceAugment:
    """auto_augment: imagenet (torchvision's AutoAugment ImageNet policy), randaugment,
    trivialaugment (TrivialAugmentWide) or none. randaugment_magnitude is a bin of torchvision's
    31 (0..30), not timm's 0..10 scale (timm's m9 is bin 27); randaugment_magnitude_std draws the
    bin per op from N(magnitude, std) clipped to [0, 30] (timm's mstd, in bins: timm's mstd0.5 is
    1.5), inf: uniform in [0, magnitude].
    random_erase: per-sample probability; erase_mode const (0, the mean once normalised) or pixel
    (N(0, 1) noise). mixup_alpha / cutmix_alpha: Beta parameters, 0 turns each off; with both on,
    a batch uses cutmix with mix_switch_prob; mix_prob: probability a batch is mixed at all.
    label_smoothing is folded into the soft targets. seed: with (step, rank) fixes every draw.
    """

    def __init__(self, *, num_classes: int, auto_augment: str = "none",
                 randaugment_num_ops: int = 2, randaugment_magnitude: int = 9,
                 randaugment_magnitude_std: float = 0.0,
                 random_erase: float = 0.0, erase_mode: str = "const",
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_switch_prob: float = 0.5, mix_prob: float = 1.0,
                 label_smoothing: float = 0.0, seed: int = 0):
        if auto_augment not in POLICIES + ("none",):
            raise ValueError(f"--auto-augment {auto_augment!r}: use one of {POLICIES + ('none',)}")
        if erase_mode not in ERASE_MODES:
            raise ValueError(f"--random-erase-mode {erase_mode!r}: use one of {ERASE_MODES}")
        for name, p in (("--random-erase", random_erase), ("mix_prob", mix_prob),
                        ("mix_switch_prob", mix_switch_prob), ("--label-smoothing", label_smoothing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} {p} is a probability: give a value in [0, 1]")
        if auto_augment == "randaugment" and not 0 <= randaugment_magnitude <= 30:
            raise ValueError(f"--ra-magnitude {randaugment_magnitude}: give a bin in [0, 30]")
        if not randaugment_magnitude_std >= 0:
            raise ValueError(f"--ra-magnitude-std {randaugment_magnitude_std}: give a std in bins >= 0 "
                             "(0: fixed magnitude, inf: uniform)")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("--mixup-alpha and --cutmix-alpha must be >= 0 (0 turns them off)")
        self.num_classes = num_classes
        self.auto_augment = auto_augment
        self.randaugment = dict(num_ops=randaugment_num_ops, magnitude=randaugment_magnitude,
                                magnitude_std=randaugment_magnitude_std)
        self.random_erase, self.erase_mode = random_erase, erase_mode
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_switch_prob, self.mix_prob = mix_switch_prob, mix_prob
        self.label_smoothing = label_smoothing
        self.seed = seed

    @property
    def soft_targets(self) -> bool:
        """Whether after_normalize returns N x num_classes probabilities instead of int labels."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0

    @property
    def enabled(self) -> bool:
        return self.auto_augment != "none" or self.random_erase > 0 or self.soft_targets

    def _generator(self, step: int, rank: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, step, rank, stream))

    def plan(self, n: int, height: int, width: int, step: int, rank: int = 0) -> list[Slot]:
        """The per-sample ops and magnitudes before_normalize applies at (step, rank)."""
        g = self._generator(step, rank, STREAM_POLICY)
        return sample_plan(self.auto_augment, n, height, width, g, **self.randaugment)

    def mix_params(self, height: int, width: int, step: int, rank: int = 0) -> MixParams:
        rng = np.random.default_rng(derive_seed(self.seed, step, rank, STREAM_MIX))
        return sample_mix(rng, height, width, self.mixup_alpha, self.cutmix_alpha, self.mix_switch_prob, self.mix_prob)

    def before_normalize(self, images_u8: torch.Tensor, step: int, rank: int = 0) -> torch.Tensor:
        """AutoAugment / RandAugment / TrivialAugmentWide, each sample its own draw.
        uint8 N x 3 x H x W in; a new uint8 tensor, same shape, device and memory format, out."""
        if self.auto_augment == "none":
            return images_u8
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
            raise ValueError(f"before_normalize takes uint8 N x 3 x H x W images from the loader, "
                             f"got {images_u8.dtype} {tuple(images_u8.shape)}: call it before normalising")
        n, _, h, w = images_u8.shape
        return apply_plan(images_u8, self.plan(n, h, w, step, rank))

    def after_normalize(self, x: torch.Tensor, labels: torch.Tensor, step: int,
                        rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random erasing, then mixup/cutmix. Returns (x, targets): targets are float32
        N x num_classes probabilities (label smoothing folded in) when mixup, cutmix or label
        smoothing is on, else `labels` unchanged. `x` is never modified in place."""
        if not x.is_floating_point():
            raise ValueError(f"after_normalize takes the normalised float batch, got {x.dtype}: "
                             "call before_normalize on uint8 images, normalise, then call this")
        n, _, h, w = x.shape
        if self.random_erase > 0:
            boxes = sample_erase_boxes(self._generator(step, rank, STREAM_ERASE), n, h, w, self.random_erase)
            noise = self._generator(step, rank, STREAM_NOISE, x.device) if self.erase_mode == "pixel" else None
            x = erase(x, boxes, self.erase_mode, noise)
        if not self.soft_targets:
            return x, labels
        p = self.mix_params(h, w, step, rank)
        return mix_images(x, p), soft_targets(labels, self.num_classes, p.lam, self.label_smoothing)
