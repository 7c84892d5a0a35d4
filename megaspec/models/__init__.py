"""The built-in models; importing this package registers them all."""

from megaspec.models import (  # noqa: F401  (imported for registration)  # noqa: F401  (imported for registration)
    bert,
    gpt,
    llava,
    t5,
    vision,
)
from megaspec.models.output import ModelOutput

__all__ = ["ModelOutput"]
