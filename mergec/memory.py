"""Peak memory of a stretch of work, for the report's per-pass figures.

On Linux the host figure is the process's peak resident set (``VmHWM``), reset at the start of
each stretch by writing 5 to ``/proc/self/clear_refs``: it counts everything the process holds
(weights, activations, statistics, the Python heap), not only torch's allocations. Where the
peak cannot be reset or read (other systems, restricted containers) the host figure is None.
On CUDA the figure is the caching allocator's peak of allocated bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _resident_peak() -> int | None:
    """The process's peak resident set in bytes, or None where /proc does not say."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_resident_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Measures the peak memory between :meth:`start` and :meth:`stop`.

    >>> meter = PeakMemory()
    >>> meter.start()
    >>> _ = torch.ones(1 << 20)
    >>> peak = meter.stop()
    >>> sorted(peak)
    ['cuda', 'host']
    """

    _host_resettable: bool = False

    def start(self) -> None:
        self._host_resettable = _reset_resident_peak()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, int | None]:
        """``{"host": bytes or None, "cuda": bytes or None}``, once the GPU's queued work is
        done."""
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            cuda = int(torch.cuda.max_memory_allocated())
        return {"host": _resident_peak() if self._host_resettable else None, "cuda": cuda}
