"""One DeviceMesh for the whole job, built from the ParallelConfig's sizes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megaspec.parallel.config import ParallelConfig, validate_parallel

# Outer to inner: pipeline stages talk least, tensor-parallel ranks most, so TP ranks are
# neighbours (the same node on GPUs). Experts are split over a slice of data parallel:
# dp = edp x ep, and "dp" is the flattened (edp, ep).
DIMS = ("pp", "edp", "ep", "tp")


def default_device_type() -> str:
    """cuda when a GPU is visible (NCCL), else cpu (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def world_size() -> int:
    """The job's process count: the process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_mesh(cfg: ParallelConfig, device_type: str | None = None, model_config: object = None) -> DeviceMesh | None:
    """The job's mesh with dims pp, edp, ep, tp (and dp = edp x ep); None for one process.

    Starts the process group when torchrun launched us and none exists yet.
    """
    world = world_size()
    validate_parallel(model_config, cfg, world)
    if world == 1:
        return None
    s = cfg.sizes(world)
    shape = (s["pp"], s["dp"] // s["ep"], s["ep"], s["tp"])
    mesh = init_device_mesh(device_type or default_device_type(), shape, mesh_dim_names=DIMS)
    mesh["edp", "ep"]._flatten("dp")  # the data-parallel group: every rank with the same (pp, tp)
    return mesh


def dim_size(mesh: DeviceMesh | None, name: str) -> int:
    """Size of one mesh dimension (1 without a mesh)."""
    return 1 if mesh is None else mesh[name].size()


def dim_rank(mesh: DeviceMesh | None, name: str) -> int:
    """This process's coordinate along one mesh dimension (0 without a mesh)."""
    return 0 if mesh is None else mesh[name].get_local_rank()
