"""Device-side, per-sample, batched augmentation between the loader and the loss.

Start at device_augment.py (the trainer's entry point). policies.py draws what each sample gets,
autoaugment.py applies it grouped by op with the kernels in ops.py and geometry.py; erase.py and
mix.py work on the normalised batch.

Soft targets: `torch.nn.functional.cross_entropy(logits, targets)` accepts the float N x C
probabilities after_normalize returns; `soft_target_cross_entropy` computes the same value.
"""
from .device_augment import DeviceAugment, derive_seed
from .mix import soft_target_cross_entropy
from .policies import OPS, POLICIES, sample_plan

__all__ = ["DeviceAugment", "derive_seed", "soft_target_cross_entropy", "OPS", "POLICIES", "sample_plan"]
