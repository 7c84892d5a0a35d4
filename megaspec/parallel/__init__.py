"""Scale-out on torch.distributed: data (FSDP2), tensor (DTensor), expert and pipeline parallelism from config.

    mesh = build_mesh(ParallelConfig(tensor_model_parallel_size=2))  # under torchrun
    model = parallelize(megaspec.build_model(cfg, device="meta"), cfg)
    loss = train_step(model, local_batch(model, tokens))  # forward + backward, any layout
    val = eval_step(model, local_batch(model, tokens))    # forward only, for a pipelined model
"""

from megaspec.parallel.config import ParallelConfig, check_parallel, parallel_config, validate_parallel
from megaspec.parallel.mesh import build_mesh
from megaspec.parallel.parallelize import (ParallelState, eval_step, local_batch, parallel_state, parallelize,
                                           train_step)
from megaspec.parallel.plans import register_tp_plan, tp_plan_of

__all__ = [
    "ParallelConfig",
    "ParallelState",
    "build_mesh",
    "check_parallel",
    "eval_step",
    "local_batch",
    "parallel_config",
    "parallel_state",
    "parallelize",
    "register_tp_plan",
    "tp_plan_of",
    "train_step",
    "validate_parallel",
]
