"""Process-group primitives for data-parallel work (torch.distributed; docs/architecture.md,
"Data-parallel processes").

Each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, joins a process group (NCCL on
GPUs, gloo on CPUs) and uses the helpers here to sum, broadcast and synchronise; outside a launch they
are no-ops for one process. Starting the processes (torchrun) is `pipeline.parallel.launch`, one layer up: this
module imports nothing from the training code.
"""

from __future__ import annotations

import os


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return env_world_size() > 1


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return env_rank() if under_launcher() else 0


def world_size() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return env_world_size()


def backend_for(device) -> str:
    return "nccl" if getattr(device, "type", str(device)).startswith("cuda") else "gloo"


def init_from_env(device=None) -> bool:
    """Join the process group described by the environment (no-op for a single process or when joined).

    Returns True when running with more than one process.
    """
    if env_world_size() <= 1:
        return is_initialized() and world_size() > 1
    if not is_initialized():
        import datetime

        import torch
        import torch.distributed as dist

        if device is None:
            device = torch.device("cpu")
        kwargs = {}
        if backend_for(device) == "nccl":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend_for(device), timeout=datetime.timedelta(minutes=30), **kwargs)
    return True


def shutdown() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard() -> tuple[int, int]:
    """(rank, world size) of a joined process group of more than one process, else (0, 1): the analysis
    shares the same list of batches out over the ranks (`share`)."""
    if is_initialized() and world_size() > 1:
        return rank(), world_size()
    return 0, 1


def share(costs, rank_world: tuple[int, int] | None = None) -> list[int]:
    """The indices of the batches (with costs `costs`, in order) that this rank runs: each batch in turn goes
    to the rank with the least cost so far, the lower rank on a tie (longest-processing-time-first over
    batches sorted longest first); every rank computes the same assignment, and one process runs them all.
    A batch's cost is its padded tokens (rows x width): every rank ends with about the same work where
    `batches[rank::world]` gives rank 0 the longer batch of every pair, and the odd one. `rank_world`:
    (rank, world size) instead of the process group's (`shard`)."""
    rank_, world = shard() if rank_world is None else rank_world
    if world == 1:
        return list(range(len(costs)))
    load, mine = [0.0] * world, []
    for i, cost in enumerate(costs):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += float(cost)
        if owner == rank_:
            mine.append(i)
    return mine


def batch_cost(batch, lengths) -> int:
    """Padded tokens of a batch of cells (indices into `lengths`): rows x the longest."""
    import numpy as np

    batch = np.asarray(batch, dtype=np.int64)
    return int(len(batch) * (int(np.max(np.asarray(lengths)[batch])) if len(batch) else 0))


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` for one process)."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        out: list = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def all_reduce_max(tensor):
    """Maximum of a tensor over ranks in place (identity for one process); returns it."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_parameters(parameters, src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (e.g. a randomly initialised head)."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        for p in parameters:
            dist.broadcast(p.data, src=src)
