"""Per-process parameter memory under FSDP2: `torchrun --nproc-per-node 2 tools/fsdp_memory.py [model=gpt2 ...]`."""

import sys

import torch.distributed as dist

import megaspec
from megaspec.parallel import ParallelConfig, parallelize


def main() -> None:
    dist.init_process_group("gloo")
    model = megaspec.build_model(megaspec.compose(sys.argv[1:] or ["model=gpt2"]), device="meta")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model = parallelize(model, ParallelConfig(), seed=0)
    mine = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    each = [0] * dist.get_world_size()
    dist.all_gather_object(each, mine)
    if dist.get_rank() == 0:
        print(f"one process: {total:,} bytes; per process under FSDP x {len(each)}: "
              + ", ".join(f"{b:,} ({b / total:.1%})" for b in each))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
