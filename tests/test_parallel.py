"""megaspec.parallel: config checks without processes, then 2- and 4-process gloo runs against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY

import megaspec
from megaspec import SpecError, TransformerConfig
from megaspec.parallel import ParallelConfig, check_parallel, parallel_config, parallelize, register_tp_plan, tp_plan_of
from megaspec.parallel.pipeline import stage_layers
from megaspec.parallel.plans import _PLANS

WORKER = Path(__file__).parent / "parallel_worker.py"
LLAMA = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                          ffn_hidden_size=96, vocab_size=102)


def messages(problems: list) -> list[str]:
    return [str(p) for p in problems]


def test_check_parallel_accepts_a_good_layout():
    assert check_parallel(LLAMA, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), 4) == []


def test_check_parallel_names_every_problem():
    pc = ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=4)
    assert messages(check_parallel(LLAMA, pc, 16)) == [
        ("parallel.tensor_model_parallel_size: model.config.num_query_groups (2) is not divisible by "
        "tensor_model_parallel_size (4): each rank holds whole query groups"),
        ("parallel.tensor_model_parallel_size: model.config.vocab_size (102) is not divisible by "
        "tensor_model_parallel_size (4): the embedding and output layer are split over the vocabulary"),
        ("parallel.pipeline_model_parallel_size: model.config.num_layers (2) is fewer than "
        "pipeline_model_parallel_size (4): every stage needs at least one layer"),
    ]


def test_check_parallel_world_size_and_experts():
    assert messages(check_parallel(None, ParallelConfig(tensor_model_parallel_size=3), 4)) == [
        ("parallel: the world size (4) is not divisible by tensor_model_parallel_size (3) x "
        "pipeline_model_parallel_size (1)")]
    assert messages(check_parallel(LLAMA, ParallelConfig(data_parallel_size=4), 2)) == [
        ("parallel.data_parallel_size: data_parallel_size (4) x tensor_model_parallel_size (1) x "
        "pipeline_model_parallel_size (1) = 4, but the world size is 2")]
    assert messages(check_parallel(LLAMA, ParallelConfig(expert_model_parallel_size=2), 2)) == [
        ("parallel.expert_model_parallel_size: expert_model_parallel_size (2) needs a mixture-of-experts model "
        "(num_moe_experts is not set)")]
    moe = LLAMA.updated(num_moe_experts=6)
    assert messages(check_parallel(moe, ParallelConfig(expert_model_parallel_size=4), 4)) == [
        ("parallel.expert_model_parallel_size: model.config.num_moe_experts (6) is not divisible by "
        "expert_model_parallel_size (4): each rank holds num_moe_experts / 4 experts")]


def test_parallelize_refuses_before_anything_starts():
    model = megaspec.build_model(megaspec.compose(["model=llama", "model.config.num_layers=2"]), device="meta")
    with pytest.raises(SpecError, match=r"world size \(1\) is not divisible by tensor_model_parallel_size \(2\)"):
        parallelize(model, ParallelConfig(tensor_model_parallel_size=2))


def test_parallel_group_composes_to_a_config():
    assert parallel_config(megaspec.compose(["parallel=tp"])) == ParallelConfig(
        tensor_model_parallel_size=2, sequence_parallel=True)
    assert parallel_config(megaspec.compose([])) == ParallelConfig()
    with pytest.raises(SpecError, match="parallel.pipeline_schedule"):
        parallel_config({"pipeline_schedule": "zigzag"})


def test_modules_declare_their_tp_plans():
    model = megaspec.build_model(megaspec.compose(["model=llama", "model.config.num_layers=1"]), device="meta")
    attention = model.decoder.layers[0].self_attention
    assert tp_plan_of(attention)["linear_qkv"] == "colwise"
    assert tp_plan_of(model.decoder.layers[0].mlp)["linear_fc1"] == "colwise_gated"  # SwiGLU's [gate | up]
    assert tp_plan_of(model.embedding) == {"": "vocab_parallel_embedding"}
    register_tp_plan("rms_norm", {"": "sequence_parallel"})  # a plug-in's way, by registered name
    try:
        assert tp_plan_of(model.decoder.final_layernorm, "rms_norm") == {"": "sequence_parallel"}
    finally:
        _PLANS.pop("rms_norm")
    with pytest.raises(SpecError, match="unknown style"):
        register_tp_plan("rms_norm", {"": "diagonal"})


def test_stage_layers_split_evenly():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]


# ---- multi-process: one launch per world size, every scenario inside it ----

def launch(world: int, scenarios: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), "--world", str(world), "--out", str(out), *scenarios],
                          check=False, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, str(WORKER.parent))
    import parallel_worker

    out = tmp_path_factory.mktemp("parallel")
    parallel_worker.run_scenario("ep", out)  # one process saves a checkpoint that the EP run resumes
    two = [n for n, (_, _, w) in parallel_worker.SCENARIOS.items() if w == 2]
    results = launch(2, two, out)
    results.update(launch(4, ["fsdp_tp"], out))
    return parallel_worker, out, results


@pytest.mark.parametrize("name", ["fsdp", "tp", "tp_sp", "fsdp_tp", "pp_gpipe", "pp_1f1b", "ep", "t5_tp"])
def test_losses_match_one_process(runs, name):
    worker, _, results = runs
    reference = worker.run_scenario(name)["losses"]
    assert results[name]["losses"] == pytest.approx(reference, abs=1e-5)


def test_init_is_layout_independent(runs):
    worker, out, _ = runs
    reference = parallelize(worker.build("llama"), ParallelConfig(), seed=7).state_dict()
    gathered = torch.load(out / "fsdp_tp_init.pt")  # full tensors from the 2 x 2 run
    assert gathered.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(gathered[name], tensor), name


def test_fsdp_halves_parameter_memory(runs):
    _, _, results = runs
    single = runs[0].run_scenario("tp")["param_bytes"]  # one process holds every parameter
    per_rank = results["fsdp"]["param_bytes_per_rank"]
    assert all(0.45 < b / single < 0.55 for b in per_rank), (per_rank, single)


def test_checkpoint_from_two_ranks_resumes_on_one(runs):
    worker, out, results = runs
    from megaspec.train.checkpoint import TrainState, load

    model = parallelize(worker.build("llama"), ParallelConfig(), seed=0)  # other weights: all come from the file
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState(model, optimizer)
    load(state, out / "ckpt")
    assert state.step == worker.STEPS - 1
    loss = worker.step(model, "llama", worker.batches("llama")[worker.STEPS - 1])
    assert float(loss) == pytest.approx(results["fsdp"]["losses"][-1], abs=1e-5)


def test_expert_parallel_checkpoints_resume_across_layouts(runs):
    worker, out, results = runs
    # Saved with EP=2 (each rank holding 2 of 4 experts), resumed in one process holding all 4.
    assert worker.resume("ep", out / "ep_ckpt_world2") == pytest.approx(results["ep"]["losses"][-1], abs=1e-5)
    # And back: saved in one process, resumed with EP=2.
    reference = worker.run_scenario("ep")["losses"][-1]
    assert results["ep"]["resumed_from_world1"] == pytest.approx(reference, abs=1e-5)


def test_tensor_parallel_refuses_qk_norm_before_any_process_group():
    attn = "model.spec.submodules.decoder.submodules.layers.submodules.self_attention.submodules"
    model = megaspec.build_model(megaspec.compose([*TINY["llama"], f"+{attn}.q_layernorm=rms_norm",
                                                   f"+{attn}.k_layernorm=rms_norm"]), device="meta")
    with pytest.raises(SpecError, match=r"QK-norm \(decoder.layers.0.self_attention.q_layernorm\) is not "
                                        r"supported with tensor_model_parallel_size > 1 yet"):
        parallelize(model, ParallelConfig(tensor_model_parallel_size=2))
