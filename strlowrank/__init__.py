"""strlowrank: learnable sparsity and learnable rank through Soft Threshold Reparameterization.

The public core is re-exported here; importing the package does no work beyond imports.
"""

from strlowrank.threshold import (
    SoftThreshold,
    apply_soft_threshold,
    remove_soft_threshold,
    soft_threshold,
    thresholded_modules,
)

__all__ = [
    "SoftThreshold",
    "apply_soft_threshold",
    "remove_soft_threshold",
    "soft_threshold",
    "thresholded_modules",
]
