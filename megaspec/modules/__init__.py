"""The built-in modules; importing this package registers them all."""

from megaspec.modules import (  # noqa: F401  (imported for registration)
    activation,
    attention,
    block,
    core_attention,
    embedding,
    heads,
    layer,
    linear,
    mlp,
    norm,
)
