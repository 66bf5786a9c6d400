"""CIFAR training augmentation as batched tensor ops (docs/papers.md A.3, "CIFAR-100").

The reference applies RandomHorizontalFlip(0.5), then RandomCrop(32, padding 4, reflect)
per image through torchvision; torchvision is unavailable here (docs/design.md), and a whole
batch is augmented at once on whatever device holds it: one flip, one pad, one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_PADDING = 4


def cifar_draws(batch_size: int, generator: torch.Generator,
                padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of one batch, in this order, on the generator's device: `rand(B)`
    (flip where < 0.5), then `randint(0, 2 * padding + 1, (2, B))` (row offsets, then column
    offsets). Returns ``(flip_B, offsets_2B)``."""
    flip_B = torch.rand(batch_size, generator=generator, device=generator.device) < 0.5
    offsets_2B = torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator,
                               device=generator.device)
    return flip_B, offsets_2B


def cifar_augment(x_BCHW: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING,
                  *, global_batch: int | None = None, offset: int = 0) -> torch.Tensor:
    """Flip each image horizontally with p = 0.5, then crop it back to H x W at a random offset
    from its reflect-padded version (draws: :func:`cifar_draws`).

    With several processes ``x_BCHW`` is rows ``offset .. offset + B - 1`` of a global batch
    of ``global_batch`` samples: every rank draws the whole global batch (the same generator
    state on every rank) and applies its own rows, so the draws are the single-process ones
    and the generator stays in step across ranks (docs/design.md, choice 4).
    """
    B, _, H, W = x_BCHW.shape
    flip_G, offsets_2G = cifar_draws(B if global_batch is None else global_batch, generator, padding)
    flip_B = flip_G[offset: offset + B].to(x_BCHW.device)
    offsets_2B = offsets_2G[:, offset: offset + B].to(x_BCHW.device)
    if B == 0:  # an empty share of a global batch smaller than the world: drawn, nothing to apply
        return x_BCHW
    x_BCHW = torch.where(flip_B[:, None, None, None], x_BCHW.flip(-1), x_BCHW)
    padded = F.pad(x_BCHW, (padding, padding, padding, padding), mode="reflect")
    rows_BH = offsets_2B[0, :, None] + torch.arange(H, device=x_BCHW.device)
    cols_BW = offsets_2B[1, :, None] + torch.arange(W, device=x_BCHW.device)
    batch_B = torch.arange(B, device=x_BCHW.device)
    channel_C = torch.arange(x_BCHW.shape[1], device=x_BCHW.device)
    return padded[batch_B[:, None, None, None], channel_C[None, :, None, None],
                  rows_BH[:, None, :, None], cols_BW[:, None, None, :]]
