"""Running `wrk` (C, one thread) as the load generator of an HTTP benchmark.

A benchmark supplies the Lua that builds its requests (`request()`); this module adds the
`done()` that prints one JSON line of totals and latency percentiles, runs wrk, and reads it.
wrk counts a non-2xx/3xx answer as an error, so `accepted` is every answer that was not one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

# Appended to every benchmark's script: one JSON line for run_wrk to read.
DONE_LUA = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def installed() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, request_lua: str, connections: int, seconds: float, workdir: Path, name: str
) -> dict[str, float]:
    """Drive `url` with `request_lua` from `connections` connections for `seconds`."""
    script = workdir / f"{name}.lua"
    script.write_text(request_lua + DONE_LUA)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
    finished = subprocess.run([*argv, url], capture_output=True, text=True, check=True)
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    return {
        "requests": summary["requests"],
        "accepted": summary["requests"] - summary["errors"],
        "elapsed_s": summary["duration_us"] / 1e6,
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
        "errors": summary["errors"],
    }
