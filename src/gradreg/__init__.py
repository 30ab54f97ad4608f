"""gradreg: gradient regularization (GR) and GR warmup for PyTorch optimizers.

The core needs only torch: :class:`GradientRegularizer` wraps any ``torch.optim``
optimizer, and :mod:`gradreg.warmup` contains the GR warmup schedules. The training
command line (``gradreg train``) needs the ``vision`` extra (timm, torchvision).
"""

from .regularizer import GradientRegularizer, GRStepStats
from .warmup import (
    WARMUP_STRATEGIES,
    build_gr_schedule,
    constant_schedule,
    lambda_warmup_schedule,
    r_warmup_schedule,
    zero_warmup_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "GradientRegularizer",
    "GRStepStats",
    "WARMUP_STRATEGIES",
    "build_gr_schedule",
    "constant_schedule",
    "lambda_warmup_schedule",
    "r_warmup_schedule",
    "zero_warmup_schedule",
    "__version__",
]
