"""The built-in modules; importing this package registers them all."""

from megaspec.modules import (  # noqa: F401  (imported for registration)
    activation,
    attention,
    bert_heads,
    block,
    core_attention,
    cross_attention,
    embedding,
    heads,
    layer,
    linear,
    mlp,
    moe,
    norm,
    patch_embedding,
    projector,
    relative_position,
)
