"""Per-layer sliding windows: HF `layer_types` <-> a spec whose layers cycle through `local` and `global` nodes.

HF lists one type per layer ("sliding_attention" or "full_attention"); a spec
writes the shortest cycle of node names that repeats to them (Gemma-2's
[local, global], Gemma-3's five local layers then a global one). A `global` node
overrides `window_size: null` for its subtree, so the window itself stays one
config field.
"""

from __future__ import annotations

import copy
from typing import Any

from megaspec.errors import SpecError
from megaspec.interop.hf.core import node_at

NODE_FOR = {"sliding_attention": "local", "full_attention": "global"}
HF_FOR = {node: hf for hf, node in NODE_FOR.items()}


def shortest_cycle(names: list[str]) -> list[str]:
    """The shortest prefix that, cycled, gives `names`."""
    for period in range(1, len(names)):
        if all(names[i] == names[i % period] for i in range(len(names))):
            return names[:period]
    return list(names)


def apply_layer_types(spec: dict[str, Any], layer_types: list[str], sliding_window: int | None,
                      architecture: str) -> tuple[int, int] | None:
    """Make the spec's `decoder.layers` follow HF's `layer_types`; return the config's window_size.

    A spec with one layer node keeps it when every layer is alike, and otherwise
    becomes a pattern of that node (`local`) and a copy without the window (`global`).
    """
    unknown = sorted(set(layer_types) - set(NODE_FOR))
    if unknown:
        raise SpecError(f"unsupported {architecture} configuration: layer_types {unknown} "
                        f"(megaspec supports {', '.join(NODE_FOR)})")
    if sliding_window is None or "sliding_attention" not in layer_types:
        names = ["global"] * len(layer_types)
    else:
        names = [NODE_FOR[t] for t in layer_types]
    cycle = shortest_cycle(names)
    block = node_at(spec, "decoder")["submodules"]
    layers = block["layers"]
    if "pattern" in layers:
        layers["pattern"] = cycle
    elif len(set(cycle)) > 1:
        local = layers
        block["layers"] = {"pattern": cycle, "nodes": {"local": local, "global": global_node(local)}}
    return None if "local" not in names else (sliding_window - 1, 0)


def global_node(local: dict[str, Any]) -> dict[str, Any]:
    """A copy of a layer node that attends to the whole context."""
    node = copy.deepcopy(local)
    node["config"] = {**node.get("config", {}), "window_size": None}
    return node


def hf_layer_types(spec: dict[str, Any], num_layers: int, window: tuple[int, int] | None) -> list[str]:
    """The HF `layer_types` a spec's decoder layers and the config's window describe."""
    layers = spec["submodules"]["decoder"]["submodules"]["layers"]
    if window is None:
        return ["full_attention"] * num_layers
    if "pattern" not in layers:
        return ["sliding_attention"] * num_layers
    pattern = layers["pattern"]
    if isinstance(pattern, str) or set(pattern) - set(HF_FOR):
        raise SpecError(f"HF layer_types come from a pattern of 'local' and 'global' layers, got {pattern!r}")
    return [HF_FOR[pattern[i % len(pattern)]] for i in range(num_layers)]


def hf_sliding_window(window: tuple[int, int] | None) -> int | None:
    """config.window_size (W - 1, 0) -> HF's sliding_window W; other windows HF cannot express."""
    if window is None:
        return None
    if window[1] != 0 or window[0] < 0:
        raise SpecError(f"HF's sliding window looks back only: window_size (W - 1, 0), got {window}")
    return window[0] + 1
