"""The world a run trains in: this process's rank, its local rank, how many processes, its device, the collective
backend. Made once from torchrun's environment (the only place RANK, LOCAL_RANK and WORLD_SIZE are read) and passed
to everything that needs to know.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastpretrain.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # "nccl" or "gloo" in a multi-process world, None alone
    # gloo over the same processes, for the trainer's own small messages (metrics, stop requests, the data stream's
    # state): on CPU tensors, so that none of them waits for a GPU's queue (NCCL carries the gradients).
    control: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all processes (float64)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=self.control)
        return total.tolist()

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable builtins), in rank order, on every process."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def agree(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so that all stop together, or none)."""
        return bool(self.sum([float(flag)])[0])

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    index = int(name[5:]) if name.startswith("cuda:") else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPUs "
                        f"(torchrun --nproc-per-node at most that many)")
    return torch.device("cuda", index)


def init_world(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """The world of this process; joins the process group when torchrun started several (NCCL on GPUs, gloo on CPUs),
    with ``timeout_s`` for every collective, so a dead peer ends the job with an error rather than a hang."""
    rank = _environment_int("RANK", 0)
    world_size = _environment_int("WORLD_SIZE", 1)
    local_rank = _environment_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size} do not make a world")
    chosen = _device(device, local_rank)
    backend = None
    if world_size > 1:
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        timeout = datetime.timedelta(seconds=timeout_s)
        # Each attempt of a torchrun job (--max-restarts) under a key prefix of its own: torchrun's agent keeps one
        # store for all attempts, and without it a rank of the new attempt can read the dead attempt's addresses
        # there (gloo: "connectFullMesh failed ... Connection refused" when rank 0 was the one that died).
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = _environment_int("TORCHELASTIC_RESTART_COUNT", 0)
        dist.init_process_group(backend, store=dist.PrefixStore(f"fastpretrain/attempt-{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": chosen} if chosen.type == "cuda" else {}))
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        return World(rank, local_rank, world_size, chosen, backend, control)
    return World(rank, local_rank, world_size, chosen, backend)
