"""Every built-in module and model: importing this module registers them all.

The registry itself imports none of them (it is a leaf that modules import to
register themselves); this list is the one place that names the built-ins.
"""

from megaspec.models import bert, gpt, llava, t5, vision  # noqa: F401
from megaspec.modules import activation, linear, norm  # noqa: F401
from megaspec.modules.attention import core, cross_attention, latent, self_attention  # noqa: F401
from megaspec.modules.embedding import patch, vocab  # noqa: F401
from megaspec.modules.head import bert as bert_heads  # noqa: F401
from megaspec.modules.head import lm_head  # noqa: F401
from megaspec.modules.layer import parallel_layer, transformer_block, transformer_layer  # noqa: F401
from megaspec.modules.mlp import mlp, projector  # noqa: F401
from megaspec.modules.moe import experts, layer, router, shared  # noqa: F401
from megaspec.modules.position import alibi, learned, relative, rotary, rotary_tables  # noqa: F401
