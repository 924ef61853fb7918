"""torch.distributed for the trainer: one object that knows this process's rank and holds the few
collectives the loop needs. With one process (no torchrun) every method is a cheap identity, so the
training loop has no `if distributed` branches.

Design:
- The default process group (gloo) carries control messages: the run plan, per-step flags, metrics,
  per-rank RNG states. Data crosses it as JSON or safetensors bytes, never pickles.
- Gradients go through DDP on a group created once the config is known, with `dist.timeout_s`
  (nccl on CUDA, gloo on CPU). A rank that dies or hangs makes every other rank's next collective
  fail within that timeout; `collective_failure` turns that into one clear line.
"""

from __future__ import annotations

import inspect
import json
import os
from datetime import timedelta

import safetensors.torch
import torch
import torch.distributed as dist

from .errors import ExitCode, UserError

STARTUP_TIMEOUT_S = 600.0  # the default group's timeout, before the run's config is known
_SKELETON = "__skeleton__"  # key of the JSON skeleton in a gathered safetensors blob


class LostRankError(UserError):
    """A collective timed out or lost its peer. Not a usage error: a supervisor should restart the job."""

    exit_code = ExitCode.LOST_RANK


class QuietExit(SystemExit):
    """Leave with this exit code and print nothing: rank 0 already explained why."""


class Distributed:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = STARTUP_TIMEOUT_S
        self.grad_group = None  # gradients (DDP); set by `configure`
        self.control = None  # control messages; None = the default group, until `configure`

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the job torchrun describes in the environment (RANK, WORLD_SIZE, ...), if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        timeout = timedelta(seconds=STARTUP_TIMEOUT_S)
        store = _attempt_store(rank, world_size, timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        return cls(rank, world_size, local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def configure(self, backend: str, device: torch.device, timeout_s: float) -> None:
        """Create the gradient group once the run's config says which backend and timeout."""
        if not self.enabled:
            return
        self.timeout_s = timeout_s
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        self.grad_group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        # Control messages get the same timeout from here on: a peer that hangs is noticed as quickly.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    def sum_(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so flags and losses travel in one message)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control)
        return tensor.tolist()

    def broadcast_json(self, obj=None):
        """Rank 0's `obj` on every rank (JSON: plain data only)."""
        if not self.enabled:
            return obj
        data = json.dumps(obj).encode() if self.is_main else b""
        return json.loads(self._broadcast_bytes(data))

    def _broadcast_bytes(self, data: bytes) -> bytes:
        group = self.control
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else None
        if buffer is None or buffer.numel() != int(size):
            buffer = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=group)
        return buffer.numpy().tobytes()

    def gather_state(self, obj) -> list | None:
        """Every rank's `obj` (tensors, arrays and plain data, as a checkpoint holds them) on rank 0, in
        rank order; None on the other ranks. Sent as safetensors bytes + a JSON skeleton, never pickled."""
        if not self.enabled:
            return [obj]
        from .checkpoint.format import flatten_state, unflatten_state

        tensors, skeleton = flatten_state(obj)
        tensors[_SKELETON] = torch.frombuffer(bytearray(json.dumps(skeleton).encode()), dtype=torch.uint8)
        data = safetensors.torch.save(tensors)
        group = self.control
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(padded, gather_list=gathered, dst=0, group=group)
        if not self.is_main:
            return None
        states = []
        for buffer, size in zip(gathered, sizes, strict=True):
            received = safetensors.torch.load(buffer[: int(size)].numpy().tobytes())
            skeleton = json.loads(received.pop(_SKELETON).numpy().tobytes())
            states.append(unflatten_state(received, skeleton))
        return states

    def main_first(self, work):
        """Run `work()` on rank 0 first (e.g. generating a dataset), then on the others. A UserError on
        rank 0 reaches the others as a quiet exit with the same code, so its message prints once."""
        if not self.enabled:
            return work()
        if self.is_main:
            box = {}

            def first() -> None:
                box["result"] = work()

            self.decide(first)
            return box["result"]
        self.decide(None)  # wait for rank 0 (or leave quietly with its exit code)
        return work()

    def decide(self, decision):
        """Run `decision()` on rank 0 and give its (JSON) result to every rank. A UserError on rank 0
        reaches the others as a quiet exit with the same code, so the message prints once."""
        if not self.enabled:
            return decision()
        if self.is_main:
            try:
                result = decision()
            except UserError as exc:
                self.broadcast_json({"error": exc.exit_code})
                raise
            self.broadcast_json({"ok": result})
            return result
        message = self.broadcast_json()
        if "error" in message:
            raise QuietExit(message["error"])
        return message["ok"]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the forward pass goes through: DDP (gradient all-reduce) or the model itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (BatchNorm statistics) go from rank 0 to all at every forward, so rank 0's copy, the
        # one in the checkpoint, is the one every rank trains with (newer torch renamed the switch).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": True}
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=self.grad_group,
            **sync,
        )

    def collective_failure(self, exc: BaseException, resume_hint: str) -> LostRankError:
        """The one-line error for a collective that timed out or lost its peer."""
        detail = " ".join(str(exc).split())[:200]
        return LostRankError(
            f"rank {self.rank} of {self.world_size}: lost contact with the other ranks (no answer within "
            f"dist.timeout_s={self.timeout_s:g} s, or a peer closed the connection: another rank died or hung; "
            f"{detail}). {resume_hint} (torchrun --max-restarts or train --max-restarts does it by itself)"
        )


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous key-value store, with keys private to this attempt of the job.

    torchrun's agent serves one store for the whole job and, since it stopped prefixing worker keys per
    attempt, a restarted worker can read the previous attempt's process-group addresses and fail with
    "Connection refused" at random. Prefixing by TORCHELASTIC_RESTART_COUNT keeps attempts apart."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0 and not agent_serves, timeout=timeout, multi_tenant=True
    )
    return dist.PrefixStore(f"yolo-resume/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error caused by a peer (timeout, closed connection), not by our code."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset")
    )
