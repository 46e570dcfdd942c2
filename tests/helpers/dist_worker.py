"""Run by tests/test_distributed.py under torchrun: exercises the distributed helpers."""

import json
import sys

import torch

from tinyfusion.distributed import (
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)


def main(out_path: str) -> None:
    env = init_distributed(device="cpu")
    value = torch.tensor([float(env.rank + 1), 10.0 * (env.rank + 1)])
    mean = all_reduce_mean(value)
    total = all_reduce_sum(value)
    token = broadcast_object({"seed": 1234} if env.is_main else None)
    ranks = all_gather_objects(env.rank)
    barrier()
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump({"world_size": env.world_size, "device": str(env.device), "mean": mean.tolist(),
                       "sum": total.tolist(), "token": token, "ranks": ranks,
                       "input_unchanged": value.tolist()}, f)
    barrier()
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
