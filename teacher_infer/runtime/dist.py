"""torchrun support: rank/world from the environment, gloo on CPU, nccl on CUDA.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never initialises a process
group; every collective below is then a local no-op, so there is one code path. The teacher
pass, dedup, training and eval all take their rank from here (``Dist.from_env().is_main`` is
also how a command decides to print its summary).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        def read(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(value) if value else default
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") \
                    from None

        world = read("WORLD_SIZE", 1)
        rank = read("RANK", 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, read("LOCAL_RANK", 0), read("LOCAL_WORLD_SIZE", 1))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device, *, timeout: datetime.timedelta | None = None) -> bool:
        """Join the process group (nccl for a CUDA ``device``, gloo otherwise); True when this
        call created it (the caller then closes it), False when there was nothing to do."""
        if not self.enabled:
            return False
        import torch.distributed as dist

        if dist.is_initialized():
            return False
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend=backend, **kwargs)
        return True

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, make: Callable[[], Any]) -> Any:
        """``make()`` on rank 0, and its result — or its error, raised again — on every rank
        (a single process just calls it). What one rank decides (the listing of a data
        source, the store's plan, a lock) and every rank must share; an error reaches every
        rank, so no rank waits for a broadcast that never comes."""
        result, error = None, None
        if self.is_main:
            try:
                result = make()
            except (ValueError, OSError, ImportError, RuntimeError) as exc:  # LockedError too
                error = exc
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out
