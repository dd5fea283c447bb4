"""Multi-process training under torchrun: the process group, who writes, and summing metrics.

The library never reads the environment on its own: the CLI calls :func:`from_environment` (which
reads the variables torchrun sets) and passes the resulting :class:`DistContext` to the engine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from binarize.errors import ConfigError

__all__ = ["DistContext", "from_environment", "all_reduce_sum", "broadcast_buffers", "broadcast_parameters"]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """One process's place in the job.

    Args:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and draws progress."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device of this process: ``cuda:<local_rank>`` for ``cuda`` / ``auto`` with GPUs."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device: '{requested}' asked for, but no CUDA device is available; use cpu or auto")
        if requested == "cuda":
            return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return torch.device(requested)

    def init_process_group(self, device: torch.device) -> None:
        """Joins the process group (NCCL on CUDA, gloo on the CPU) unless single-process or joined."""
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def shutdown(self) -> None:
        """Leaves the process group, all processes together.

        Without the barrier a process that finishes first tears down its gloo connections while its
        peer is still working, and the peer can abort at exit ("terminate called without an active
        exception", seen once in a 2-process CI run).
        """
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def from_environment(env: Mapping[str, str] | None = None) -> DistContext:
    """The context torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (single process without)."""
    env = os.environ if env is None else env
    return DistContext(
        rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)), local_rank=int(env.get("LOCAL_RANK", 0))
    )


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sums a tensor over all processes (in place); a no-op in a single process."""
    if ctx.enabled and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copies the main process's buffers (BatchNorm statistics) to every process; a no-op in a single process.

    Each process updates BatchNorm statistics from its own shard; evaluating with the main process's
    (the ones checkpointed) makes the summed validation metrics those of the saved model.
    """
    if ctx.enabled and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copies the main process's parameters to every process (after a calibration from each process's own
    shard, before DistributedDataParallel wraps the model); a no-op in a single process."""
    if ctx.enabled and dist.is_initialized():
        with torch.no_grad():
            for param in module.parameters():
                dist.broadcast(param, src=0)
