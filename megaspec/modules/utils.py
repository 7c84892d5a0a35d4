"""Small helpers shared by the built-in modules."""

import torch

from megaspec.config import DTYPES, TransformerConfig
from megaspec.init import init_normal_

__all__ = ["init_normal_", "params_dtype"]


def params_dtype(config: TransformerConfig) -> torch.dtype:
    """The torch dtype parameters are created in (`config.params_dtype`)."""
    return DTYPES[config.params_dtype]
