"""Images -> token vectors for a vision transformer (ViT, CLIP)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.errors import SpecError
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("embedding", "patch_embedding")
class PatchEmbedding(nn.Module):
    """Non-overlapping patches through one strided conv, a learned class token in front, learned positions added.

    Sizes come from the config (`image_size`, `patch_size`, `num_channels`). CLIP's
    conv has no bias (`bias: false`, the default); the original ViT's has one.
    """

    def __init__(self, config: TransformerConfig, *, add_class_token: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.init_std = config.init_method_std
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_patches = config.num_patches
        self.num_class_tokens = int(add_class_token)
        h, c, p = config.hidden_size, config.num_channels, config.patch_size
        dtype = params_dtype(config)
        # The conv kernel: each patch [c, p, p] is flattened and projected to h channels.
        self.weight = nn.Parameter(torch.empty(h, c, p, p, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(h, dtype=dtype)) if bias else None
        self.class_embedding = nn.Parameter(torch.empty(h, dtype=dtype)) if add_class_token else None
        self.position_embedding = nn.Parameter(torch.empty(self.num_class_tokens + self.num_patches, h, dtype=dtype))

    def init_weights(self) -> None:
        """Kernel, class token and positions ~ N(0, init_method_std); bias zeros."""
        init_normal_(self.weight, self.init_std)
        init_normal_(self.position_embedding, self.init_std)
        if self.class_embedding is not None:
            init_normal_(self.class_embedding, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, pixel_values: Tensor) -> Tensor:  # [b, c, H, W] -> [b, cls + patches, h]
        b, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            # Positions are learned per patch, so another size has no position table.
            raise SpecError(
                f"images are {height}x{width} but the patch embedding was built for "
                f"{self.image_size}x{self.image_size} (config.image_size)"
            )
        x = F.conv2d(pixel_values.to(self.weight.dtype), self.weight, self.bias, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2)  # [b, h, H/p, W/p] -> [b, patches, h], row-major patch order
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(b, 1, -1), x], dim=1)  # [b, 1 + patches, h]
        return x + self.position_embedding

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, "
            f"class_tokens={self.num_class_tokens}, bias={self.bias is not None}"
        )
