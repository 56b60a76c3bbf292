"""Reuse of the U-Net's deep features across sampling steps (DeepCache; Ma et al. 2024,
"DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858).

Between neighbouring denoising steps the features of the U-Net's deep, low-resolution
part change little, while the shallow, full-resolution branch carries the detail. A
:class:`FeatureCache` handed to :meth:`ldm.models.unet.UNet.forward` keeps the hidden
state that enters the last up block's resnet ``n - 1 - branch`` (``n`` resnets per up
block) from a full pass; the next ``interval - 1`` evaluations run only the shallow
branch: ``conv_in``, the first ``branch`` resnets (with their attention) of the first
down block for the skips ``s_0 .. s_branch``, then the last up block from that resnet
on, starting from the kept state. ``branch`` 1 is DeepCache's default for Stable
Diffusion (its ``cache_layer_id`` 0, ``cache_block_id`` 0): on the SD 1.5 architecture a
shallow evaluation measured 21% of a full one at 256x256 and 30% at 512x512 (bfloat16 on a
CPU; its full-resolution attention dominates).

The rule is per U-Net evaluation, so it holds for every sampler: evaluations
``0, interval, 2 * interval, ...`` of a sampling run are full, the others reuse, and a
batch of another shape (a sub-batch, guidance switched off) is always a full pass.
The approximation changes the picture: it is an opt-in trade of quality for speed.
"""

from __future__ import annotations

from torch import Tensor


class FeatureCache:
    """The kept deep feature of one sampling run; ``interval`` >= 1 (1: every pass is
    full, nothing is reused), ``branch`` >= 1 (see the module doc)."""

    def __init__(self, interval: int, branch: int = 1) -> None:
        for name, value in (("interval", interval), ("branch", branch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureCache {name} must be an integer >= 1, got {value!r}")
        self.interval = interval
        self.branch = branch
        self.feature: Tensor | None = None
        self.calls = 0  # U-Net evaluations so far
        self.full = 0  # of which full passes

    def check_fits(self, layers_per_block: int) -> None:
        """The branch must leave the last up block at least one resnet to start at."""
        if self.branch > layers_per_block:
            raise ValueError(f"feature cache branch {self.branch} is deeper than the U-Net's first level "
                             f"({layers_per_block} resnets per down block)")

    def reuse(self, sample: Tensor) -> bool:
        """Whether this evaluation (of ``sample``) runs the shallow branch on the kept
        feature; counts the evaluation."""
        index, self.calls = self.calls, self.calls + 1
        kept = self.feature
        fits = (kept is not None and kept.shape[0] == sample.shape[0] and kept.device == sample.device
                and kept.dtype == sample.dtype)
        if fits and index % self.interval:
            return True
        self.full += 1
        return False

    def keep(self, feature: Tensor) -> None:
        self.feature = feature

