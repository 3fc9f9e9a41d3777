"""Data-parallel training under ``torchrun`` (DistributedDataParallel); a no-op otherwise.

``synergen train`` started by ``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``) trains one model with N processes: gloo on the CPU, nccl on CUDA (process r on GPU
``LOCAL_RANK``). Every rank builds the same model (same seed; DDP also broadcasts rank 0's weights) and
takes the same steps as one process: at each step the batch one process would take (the seeded
``batch_order``, ``train.batch_size`` windows) is split into N contiguous parts, one per rank (``part``;
a rank left without rows by a short last batch forwards a stand-in row with no targets, because DDP needs
every rank's backward). Every loss term is a sum over the rank's targets divided by the whole batch's
count of them (counts, and the in-batch positives of sampled InfoNCE, are gathered from all ranks each
step: ``train.gather_targets``), so the ranks' losses add up to one process's mean loss; each rank
back-propagates N times its loss, so DDP's average of the gradients is their sum: one process's gradient.
Steps per epoch, the learning-rate schedule, the epoch loss (the sum of the ranks' shares), validation
(rank 0 alone, which tells the others its early-stopping state) and early stopping are one process's.
Rank 0 alone writes ``model.pt``, ``checkpoint.pt`` and ``train.json``; all ranks meet at a barrier at
every epoch end. Started any other way (or with ``WORLD_SIZE=1``) nothing here changes what ``train`` does.

Randomness: the negatives (retrieval's sampled negatives, ranking's popularity-sampled ones) are drawn
for the whole batch from a stream seeded by ``(seed, step)`` on every rank, which keeps its rows' share:
the ones one process draws. Dropout cannot match one process (a rank's masks are drawn for its part of
the batch): each rank draws them from its own stream (seeded by ``(seed, rank)``). So with
``model.dropout`` 0 the N ranks train one process's model, to float rounding (sums in another order;
tests/test_distributed.py checks the loss curve and weights); with dropout, the same model up to the
masks. Hard ranking negatives (nearest items) follow the weights, so a near-tie may break differently.
A checkpoint keeps every rank's dropout RNG state and share of the running epoch loss, so a resumed
run (same number of processes: it is part of the checkpoint's fingerprint) ends with the same weights
and losses as one never stopped. ``find_unused_parameters`` is on because a part may leave some heads
unused; torch warns once per process when a run happens not to.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

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


def part(n: int, ranks: Ranks) -> tuple[int, int]:
    """This rank's rows [lo, hi) of a batch of ``n``: contiguous, in rank order (so the parts' targets, put
    together in rank order, are the batch's, in its order), sizes differing by at most one
    (``np.array_split``'s); empty for the last ranks when ``n`` < world size."""
    q, r = divmod(n, ranks.world_size)
    lo = ranks.rank * q + min(ranks.rank, r)
    return lo, lo + q + int(ranks.rank < r)


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Give each rank its own RNG stream for dropout (after the shared model init)."""
    torch.manual_seed(int(np.random.SeedSequence((seed, ranks.rank)).generate_state(1, np.uint64)[0] >> 1))


class _Step(nn.Module):
    """The whole loss of a step as one module: DDP sees every parameter use inside its forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable, tcfg, sampler):
        super().__init__()
        self.model = model
        self.loss_fn, self.tcfg, self.sampler = loss_fn, tcfg, sampler

    def forward(self, batch: dict, whole: dict) -> dict:
        return self.loss_fn(self.model, batch, self.tcfg, self.sampler, whole)


def wrap_step(model: nn.Module, loss_fn: Callable, tcfg, sampler, dev: torch.device) -> Callable[[dict, dict], dict]:
    """``(batch, whole) -> losses`` through DistributedDataParallel (gradients averaged over ranks in backward).

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


def sum_over_ranks(value: float) -> float:
    """The sum of ``value`` over all ranks (every rank gets it)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0])


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
