"""A decode step compiles as one graph (torch.compile(fullgraph=True)), once for a whole generation."""

from __future__ import annotations

import pytest
import torch
from generate_cases import prompts, tiny
from torch._dynamo.utils import counters

from megaspec.generation import Generation, generate


@pytest.mark.parametrize("name", ["gpt2", "llama", "mixtral"])
def test_a_decode_step_traces_with_no_graph_break(name: str) -> None:
    model = tiny(name)
    ids, mask = prompts()
    run = Generation(model, ids, attention_mask=mask, max_new_tokens=4)
    first = next(iter(run))  # the prompt fills the cache
    run.cache.step(1)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**run.decode_inputs(first.tokens))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])
def test_compiled_decode_steps_give_the_same_tokens_and_compile_once(name: str) -> None:
    model = tiny(name)
    ids, mask = prompts()
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # a second generation reuses the graph
        compiled = generate(model, ids, attention_mask=mask, max_new_tokens=8, compile="eager")
        assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
