"""The `megaspec build` summary: slot tree, parameter counts, FLOPs and memory."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megaspec.record import registered_modules


@dataclass
class Row:
    """One line of the slot tree."""

    depth: int
    label: str
    name: str
    params: int
    repeat: int = 1
    tied: bool = False


def _slot_children(module: nn.Module, names: dict[nn.Module, str]) -> list[tuple[str, nn.Module]]:
    """Children that fill spec slots (registered modules, or lists of them)."""
    out = []
    for attr, child in module.named_children():
        if child in names:
            out.append((attr, child))
        elif isinstance(child, nn.ModuleList):
            out += [(f"{attr}[{i}]", c) for i, c in enumerate(child) if c in names]
    return out


def _signature(module: nn.Module, names: dict[nn.Module, str]) -> tuple:
    """What makes two layers print the same: names in every slot and every shape."""
    kinds = tuple(names.get(m, type(m).__name__) for m in module.modules())
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return kinds, shapes


def slot_rows(model: nn.Module) -> list[Row]:
    """Rows of the slot tree; identical consecutive list items collapse into one."""
    names = {m: entry.name for m, entry in registered_modules(model).items()}
    rows: list[Row] = []
    claimed: set[int] = set()

    def visit(label: str, module: nn.Module, depth: int, repeat: int = 1) -> None:
        params = list(module.parameters())
        own = sum(p.numel() for p in params if id(p) not in claimed)
        total = sum(p.numel() for p in params)
        # Tied: its weights were counted elsewhere, or it borrows them at forward (a tied LM head).
        tied = (own == 0 and total > 0) or getattr(module, "tied", False) is True
        rows.append(Row(depth, label, names.get(module, type(module).__name__), own, repeat, tied))
        children = _slot_children(module, names)
        i = 0
        while i < len(children):
            attr, child = children[i]
            j = i + 1
            if "[" in attr:  # a list slot: fold a run of identical layers into one row
                while j < len(children) and children[j][0].split("[")[0] == attr.split("[")[0] \
                        and _signature(children[j][1], names) == _signature(child, names):
                    j += 1
            if j - i > 1:
                base = attr.split("[")[0]
                visit(f"{base}[{i_index(attr)}..{i_index(children[j - 1][0])}]", child, depth + 1, j - i)
                for _, same in children[i + 1:j]:
                    claimed.update(id(p) for p in same.parameters())
            else:
                visit(attr, child, depth + 1)
            i = j
        claimed.update(id(p) for p in params)

    visit("model", model, 0)
    return rows


def i_index(attr: str) -> int:
    """The index in 'layers[3]'."""
    return int(attr.split("[")[1].rstrip("]"))


def format_tree(rows: list[Row]) -> str:
    """Render rows as an indented table: slot: registered name, parameters."""
    lines = []
    width = max(len("  " * r.depth + r.label + ": " + r.name + (f" x{r.repeat}" if r.repeat > 1 else "")) for r in rows)
    for r in rows:
        head = "  " * r.depth + (f"{r.label}: " if r.depth else "") + r.name
        if r.repeat > 1:
            head += f" x{r.repeat}"
        if r.tied:
            count = "tied (shared weights)"
        elif r.repeat > 1:
            count = f"{r.params:,} each"
        else:
            count = f"{r.params:,}"
        lines.append(f"{head:<{width}}  {count:>22}")
    return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Unique parameter count (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, seq: int) -> int | None:
    """FLOPs of one forward pass over `seq` tokens, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from megaspec.build import meta_forward

    if getattr(model, "example_inputs", None) is None or not _is_meta(model):
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        meta_forward(model, 1, seq)  # a SpecError naming the module, if the slots' shapes do not fit
    return int(counter.get_total_flops())


def _is_meta(model: nn.Module) -> bool:
    return next(model.parameters()).is_meta
