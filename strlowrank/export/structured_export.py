"""Export a channel-pruned CNN as a physically smaller dense network.

``export_pruned_cnn`` bakes every parametrization (group thresholds and their BatchNorm gates,
soft thresholds, masks) into plain tensors (:func:`strlowrank.export.bake`), then removes every
channel that the coupled layers all output as zero (:mod:`strlowrank.method.channel_groups`, through
torch-pruning's dependency graph: residual adds and depthwise convs stay consistent). A removed
channel contributed exactly zero everywhere, so the smaller network's outputs equal the pruned
model's in eval mode up to float rounding; its convs, norms and linear layers are stock modules
with fewer channels, which any runtime (eager torch, ONNX Runtime) runs at the smaller cost.
"""

from __future__ import annotations

import torch
from torch import nn

from strlowrank.export import bake
from strlowrank.method.channel_groups import remove_zero_channels


def export_pruned_cnn(
    model: nn.Module, example: torch.Tensor, round_to: int | None = None
) -> nn.Module:
    """A plain eval-mode copy of ``model`` without its dead channels.

    Args:
        model: a CNN pruned by channels (group soft thresholds, or any model whose removed
            output channels have zero filters, biases and BatchNorm gamma and beta).
        example: an input for tracing the layers' coupling (any batch size).
        round_to: keep zero channels so that every layer's width is a multiple of it (ONNX
            Runtime's blocked convs run odd widths slowly; the outputs stay the same).
    Returns:
        an ``nn.Module`` of the same classes with smaller convs, norms and linear layers;
        ``model`` is left unchanged.
    """
    smaller = bake(model)
    for p in smaller.parameters():  # the dependency graph is traced through autograd
        p.requires_grad_(True)
    remove_zero_channels(smaller, example.to(next(smaller.parameters()).device), round_to)
    for p in smaller.parameters():
        p.requires_grad_(False)
    return smaller.eval()


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv of ``model``: the learned widths of an exported network."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
