"""Data-parallel training on PyTorch's own engine: torchrun launches, DistributedDataParallel syncs.

A job is N processes (ranks). Each builds the same model from the same seed, trains on its own
slice of every global batch, and DistributedDataParallel averages the gradients, so the weights stay
equal on every rank. Only rank 0 writes the run directory; the others wait at barriers.

Processes come from torchrun, either launched here (`cnnlab train --nproc N`, which calls torchrun's
own entry point) or by the user (`torchrun ... -m cnnlab train ...`). torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/MASTER_PORT and, after an elastic restart, TORCHELASTIC_RESTART_COUNT.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from cnnlab.errors import UserError

T = TypeVar("T")
TIMEOUT_S = float(os.environ.get("CNNLAB_DIST_TIMEOUT", "600"))  # a collective that waits longer fails, never hangs


class DeviceError(UserError, ValueError):
    """A device that was asked for but is not there."""


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present) -> a torch.device; one GPU per local rank."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"train.device is {choice!r} but this torch sees no CUDA GPU "
                              f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                              "use --device cpu or auto")
        index = int(choice.split(":")[1]) if ":" in choice else local_rank
        if index >= torch.cuda.device_count():
            raise DeviceError(f"train.device asks for GPU {index} but only {torch.cuda.device_count()} are visible")
        return torch.device("cuda", index)
    raise DeviceError(f"train.device: expected cpu, cuda, cuda:N or auto, found {choice!r}")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: its rank among `world` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    restarts: int = 0  # elastic restarts of the job so far (torchrun's TORCHELASTIC_RESTART_COUNT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ collectives (no-ops alone)
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64, so counts stay exact)."""
        if not self.parallel:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_reduce_tensor(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all ranks in place, on its device (no host sync where the backend is NCCL)."""
        if not self.parallel:
            return
        if tensor.device == self.collective_device:
            dist.all_reduce(tensor)
            return
        moved = tensor.to(self.collective_device)
        dist.all_reduce(moved)
        tensor.copy_(moved)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world, *tensor.shape): every rank's tensor, in rank order; shapes must match."""
        if not self.parallel:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor, device=self.collective_device) for _ in range(self.world)]
        dist.all_gather(parts, tensor.to(self.collective_device))
        return torch.stack(parts).cpu()

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's string on every rank (run names, error messages): sent as bytes, never pickled."""
        if not self.parallel:
            return text or ""
        device = self.collective_device
        data = torch.tensor(list((text or "").encode()), dtype=torch.uint8, device=device) if self.is_main else None
        length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
        dist.broadcast(length, src=0)
        if data is None:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.broadcast(data, src=0)
        return bytes(data.cpu().tolist()).decode()

    def gather_json(self, value: object) -> list:
        """Every rank's JSON-able value, in rank order (padded byte tensors, no pickle)."""
        if not self.parallel:
            return [value]
        raw = json.dumps(value).encode()
        lengths = self.all_gather(torch.tensor([len(raw)], dtype=torch.int64)).flatten().tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        rows = self.all_gather(padded)
        return [json.loads(bytes(row[:n].tolist()).decode()) for row, n in zip(rows, lengths)]

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank: each rank's last forward
        updated its own copy from its own slice of the batch."""
        if self.parallel:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    @property
    def collective_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Context()


# ------------------------------------------------------------------------------ rank 0 first
class RankZeroFailed(UserError, RuntimeError):
    """Rank 0 failed a step the other ranks depend on; they stop with its message."""


def on_main(context: Context, work: Callable[[], str]) -> str:
    """Run `work` (returning a string, e.g. a run path) on rank 0 only; every rank gets its result."""
    if not context.parallel:
        return work()
    if context.is_main:
        try:
            result = work()
        except Exception as exc:
            context.broadcast_text(f"\0{type(exc).__name__}: {exc}")
            raise
        return context.broadcast_text(result)
    answer = context.broadcast_text(None)
    if answer.startswith("\0"):
        raise RankZeroFailed(f"rank 0 failed: {answer[1:]}")
    return answer


def first_on_main(context: Context, work: Callable[[], T]) -> T:
    """Run `work` on rank 0, then on the other ranks; a failure on rank 0 is raised on every rank."""
    if not context.parallel:
        return work()
    result: list[T] = []

    def on_rank_zero() -> str:
        result.append(work())
        return ""

    on_main(context, on_rank_zero)  # the others wait here until rank 0 succeeded (or raise its error)
    return result[0] if context.is_main else work()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_choice: str = "auto") -> Context:
    """This process's Context; joins the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    if not launched_by_torchrun():
        return Context(device=resolve_device(device_choice))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world > 1 and ":" in device_choice:
        raise DeviceError(f"train.device {device_choice!r} names one GPU for all {world} processes; "
                          "use cuda (rank i takes GPU i of its machine)")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) == 1:
            # torchrun's agent store outlives a restart: without a prefix per attempt, a restarted rank
            # can read the dead rank's address from the previous attempt and fail to connect to it
            # (pytorch/pytorch#167288). On one machine every rank has the same restart count; across
            # machines a node that rejoins resets others without counting, so no prefix there.
            store = dist.PrefixStore(f"cnnlab/attempt-{restarts}", store)
        # torch.distributed.nn.functional takes `group=group.WORLD` as default arguments: imported after
        # the group exists (DDP imports it through torch._dynamo), it holds the group for good, and the
        # group's worker threads are never joined. Imported first, its defaults are None.
        # (by name: a local `import torch.distributed...` would make `torch` a local name of this function)
        importlib.import_module("torch.distributed.nn.functional")

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout)
        atexit.register(shutdown)
    return Context(rank, world, local_rank, device, restarts)


def shutdown() -> None:
    """Leave the process group and join its worker threads while the interpreter is still whole.

    Registered with atexit by `init`. Left to interpreter shutdown, a gloo worker thread that drops
    the last reference to a collective's tensor needs the GIL, is ended by the finalizing interpreter
    mid-destructor, and the process dies of SIGABRT ("terminate called without an active exception")
    after its work is done. The group is destroyed, and its threads joined, once nothing holds it:
    the collection frees a finished trainer's DDP wrapper, which lives in reference cycles.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run `python -m cnnlab <argv>` as `nproc` ranks on this machine with torchrun's own launcher.

    Returns the exit code: 0 when every rank finished, 130 when stopped by a signal, 1 when the job
    failed (torchrun prints which rank failed and why).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
         "--monitor-interval=0.5", "-m", "cnnlab", *argv])
    try:
        run(args)
    except ChildFailedError:
        return 1
    except SignalException:  # Ctrl-C or SIGTERM: the ranks stopped and saved a checkpoint
        return 130
    return 0
