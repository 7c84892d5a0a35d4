"""Run by torchrun from test_train_data.py: prepare the data alongside the other process, save this rank's batches."""

import json
import os
import sys

import torch

from megaspec.train.data import TokenData, micro_batches, prepare_data

options, out = json.loads(sys.argv[1]), sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
log: list[str] = []
data = TokenData(prepare_data(options, log.append).train, 16, seed=0)
batches = [micro_batches(data, step, 4, 1, rank, world) for step in range(3)]
torch.save({"log": log, "batches": batches}, os.path.join(out, f"rank{rank}.pt"))
