"""Data-parallel training under ``torchrun`` (DistributedDataParallel); a no-op otherwise.

``synergen train`` started by ``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``) trains one model with N processes: gloo on the CPU, nccl on CUDA (process r on GPU
``LOCAL_RANK``). Every rank builds the same model (same seed; DDP also broadcasts rank 0's weights),
cuts the same seeded batch order of an epoch and takes every N-th batch of it, padded by wrapping around
so that all ranks take the same number of steps (``shard``). DDP averages the gradients, so the weights
stay identical on every rank. Rank 0 alone validates, writes ``model.pt``, ``checkpoint.pt`` and
``train.json`` and tells the others its early-stopping state; all ranks meet at a barrier at every epoch
end. Started any other way (or with ``WORLD_SIZE=1``) nothing here changes what ``train`` does.

Randomness: each rank draws dropout masks and negatives from its own stream (seeded by ``(seed, rank)``);
a checkpoint keeps every rank's RNG state and running epoch loss, so a resumed run (same number of
processes: it is part of the checkpoint's fingerprint) ends with the same weights and losses as one never
stopped. The mean epoch loss is over all ranks' steps. ``find_unused_parameters`` is on because a batch
may leave some heads unused; torch warns once per process when a run happens not to.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Rank 0 validates while the others wait in a collective: the timeout must cover a validation pass.
TIMEOUT = timedelta(hours=2)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; ``Ranks()`` is a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Ranks | None:
    """The ranks ``torchrun`` put in the environment; None when it did not start this process."""
    environ = os.environ if environ is None else environ
    if not all(k in environ for k in _ENV):
        return None
    return Ranks(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """True under ``torchrun`` with more than one process."""
    r = from_env(environ)
    return r is not None and r.active


def current() -> Ranks:
    """The ranks of the initialized process group, or ``Ranks()`` without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    env = from_env()
    local = env.local_rank if env is not None else dist.get_rank()
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def backend(device_setting: str) -> str:
    """nccl when training on CUDA (``train.device`` auto with a GPU, or cuda), gloo otherwise."""
    cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


@contextlib.contextmanager
def session(tcfg) -> Iterator[Ranks]:
    """Initialize the process group when launched by ``torchrun`` and not yet done; destroy it on exit
    (only the session that created it does, so sessions nest)."""
    created = False
    if launched() and not dist.is_initialized():
        be = backend(tcfg.device)
        env = from_env()
        if be == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(be, timeout=TIMEOUT)
        created = True
    try:
        yield current()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def device(base: torch.device, ranks: Ranks) -> torch.device:
    """A rank's device: its own GPU (``LOCAL_RANK``) on CUDA, else ``base``."""
    if ranks.active and base.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return base


def shard(batches: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th batch from ``rank`` on, wrapped around so that every rank gets
    ceil(len / world_size) of them (all ranks step together; every batch is seen at least once)."""
    n = len(batches)
    if world_size == 1 or n == 0:
        return list(batches)
    per_rank = -(-n // world_size)
    return [batches[(rank + i * world_size) % n] for i in range(per_rank)]


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Give each rank its own RNG stream for dropout and negatives (after the shared model init)."""
    torch.manual_seed(int(np.random.SeedSequence((seed, ranks.rank)).generate_state(1, np.uint64)[0] >> 1))


class _Step(nn.Module):
    """The whole loss of a step as one module: DDP sees every parameter use inside its forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable, tcfg, sampler):
        super().__init__()
        self.model = model
        self.loss_fn, self.tcfg, self.sampler = loss_fn, tcfg, sampler

    def forward(self, batch: dict) -> dict:
        return self.loss_fn(self.model, batch, self.tcfg, self.sampler)


def wrap_step(model: nn.Module, loss_fn: Callable, tcfg, sampler, dev: torch.device) -> Callable[[dict], dict]:
    """``batch -> losses`` through DistributedDataParallel (gradients averaged over ranks in backward).

    Unused parameters are expected (a batch without search events does not touch the search heads);
    buffers (text vectors, semantic IDs) never change, so they are not re-broadcast every step.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers warns); buffers are synced once at init.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(
        _Step(model, loss_fn, tcfg, sampler), device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=True, **no_buffer_sync,
    )


def mean_over_ranks(total: float, count: int) -> float:
    """sum(total) / sum(count) over all ranks (every rank gets it)."""
    t = torch.tensor([float(total), float(count)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to write a cache), the others after it (reading the cache)."""
    if ranks.active and not ranks.is_main:
        barrier()
    try:
        yield
    finally:  # also when rank 0 fails: the others then try on their own instead of waiting for the timeout
        if ranks.active and ranks.is_main:
            barrier()


def digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and bytes: equal on every rank when the weights are."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The weights' digest, after checking that every rank has the same (a diverged rank is a bug)."""
    mine = digest(state_dict)
    every = gather(mine)
    if len(set(every)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {every}")
    return mine
