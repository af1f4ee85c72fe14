"""This process's place in a torchrun job, and what ranks agree on: sums, all-ok votes, rank-0 writes, stops."""

from __future__ import annotations

import os
import signal
from typing import Callable

import torch

from pipeline.errors import UserError
from pipeline.osutil import SignalScope


class Dist:
    """Rank and world of this process (rank 0 of 1 without torchrun). Every collective is a no-op alone."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.device = torch.device("cpu")  # where the agreement tensors live (set by `init`)

    def init(self, device: torch.device) -> torch.device:
        """Join the process group (nccl on CUDA, gloo on CPU); -> this rank's device (its own GPU under CUDA)."""
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(self.local_rank)
                device = torch.device("cuda", self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place (summed over ranks) and return it."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def all_ok(self, ok: bool) -> bool:
        """False on every rank if any rank failed (so no rank waits forever for a dead peer)."""
        if self.world == 1:
            return ok
        return bool(self.sum(torch.tensor([0.0 if ok else 1.0], device=self.device)).item() == 0)

    def on_main(self, action: Callable[..., object], *args,
                failure: str = "rank 0 could not write to the run folder (its own error line says why)") -> None:
        """Run `action(*args)` on rank 0 only (a write, a lock); every rank learns whether it worked, so no rank
        waits in a collective for a rank 0 that left: its `error:` line there, `failure` here."""
        err = None
        if self.main:
            try:
                action(*args)
            except UserError as e:
                err = e
        if not self.all_ok(err is None):
            raise err or UserError(failure)

    def gather(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's picklable `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class StopRequest(SignalScope):
    """SIGINT / SIGTERM ask a loop to stop at its next step boundary (after a checkpoint) instead of dying
    mid-step and losing the steps since the last checkpoint. A second Ctrl-C aborts at once."""

    def __init__(self, say):
        super().__init__()
        self.say, self.requested = say, False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.say(f"[yellow]{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                 "(Ctrl-C again to abort without one)[/]", highlight=False)

    def agreed(self, dist: Dist) -> bool:
        """Whether to stop now, the same answer on every rank (a DDP rank stopping alone would hang the rest)."""
        if dist.world == 1:
            return self.requested
        return not dist.all_ok(not self.requested)
