"""What the benchmarks read from /proc: a process's CPU seconds and its resident memory."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (0.0 once it has gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; fields after it are space-separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle, not waiting for I/O) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def status_kb(pid: int, field: str) -> int | None:
    """A `kB` line of /proc/<pid>/status, e.g. VmRSS or VmHWM (peak RSS)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def rss_mb(pid: int) -> float | None:
    found = status_kb(pid, "VmRSS")
    return None if found is None else found / 1024


def peak_rss_mb(pid: int) -> float | None:
    found = status_kb(pid, "VmHWM")
    return None if found is None else found / 1024


OTHER = "other processes"


class CpuMeter:
    """CPU seconds used by a set of processes between `start()` and `stop()`.

    `stop()` also reports OTHER: what the rest of the machine used meanwhile (other people's
    test runs share these two cores and the disk, and make a figure lower than it should be).
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float] = {}
        self._machine_before = 0.0
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine_before = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        self.used = {
            name: cpu_seconds(pid) - self._before.get(name, 0.0) for name, pid in self.pids.items()
        }
        machine = machine_busy_seconds() - self._machine_before
        self.used[OTHER] = max(0.0, machine - sum(self.used.values()))
        return self.used
