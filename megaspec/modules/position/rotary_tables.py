"""Several RoPE tables for one model: layers that rotate queries and keys differently.

Gemma-3's sliding-window (local) layers use RoPE base 10,000 while its global
layers use 1,000,000 and, in the larger models, a scaled table. The position
embedding computes every table once per forward, as `{name: (cos, sin)}`, and
each self-attention picks its own with the `rotary_table` param.
"""

from typing import ClassVar

from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.modules.position.rotary import RotaryEmbedding
from megaspec.registry import register


def select_rotary(rotary: Rotary, table: str | None) -> tuple[Tensor, Tensor]:
    """The (cos, sin) an attention uses: the one table given, or its named table among several."""
    if isinstance(rotary, dict):
        if table not in rotary:
            raise ValueError(f"the position embedding gives RoPE tables {sorted(rotary)}; set the self-attention's "
                             f"rotary_table param to one of them (it is {table!r})")
        return rotary[table]
    if table is not None:
        raise ValueError(f"rotary_table is {table!r} but the position embedding gives a single RoPE table; "
                         "use local_global_rotary_embedding, or leave rotary_table unset")
    return rotary


@register("position_embedding", "local_global_rotary_embedding")
class LocalGlobalRotaryEmbedding(nn.Module):
    """Two RoPE tables: 'global' as `rotary_embedding` computes it, 'local' with base `rotary_base_local`, unscaled.

    The global table follows config.rotary_base and config.rope_scaling; the local one
    differs only in its base (Gemma-3: `rope_local_base_freq`).
    """

    config_fields: ClassVar[dict] = {"rotary_base_local": (float, 10000.0)}

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({
            "global": RotaryEmbedding(config),
            "local": RotaryEmbedding(config.updated(rotary_base=config.rotary_base_local, rope_scaling=None)),
        })

    def forward(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        # Each table is [b, s, 1, rot]; the hidden states pass through unchanged.
        return hidden_states, {name: table(hidden_states, position_ids)[1] for name, table in self.tables.items()}
