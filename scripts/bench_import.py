"""Import-time cost of peft-ext's autoload hook (``peft_ext_autoload.pth``).

Two numbers, each the median of ``--repeats`` fresh interpreters:

* start-up of a process that never imports ``peft`` (``python -c pass``), with the hook on and with it switched off
  by ``PEFT_EXT_NO_AUTOLOAD=1``: what every Python process in the environment pays;
* ``import peft`` with the hook on (which then imports ``peft_ext`` and registers every method) and off: what a PEFT
  user pays for adapters of peft-ext methods loading without ``import peft_ext``.

Wall-clock differences of whole interpreters are noisy on a shared machine, so the precise numbers come from
``python -X importtime``: the hook module's own import at start-up, and the cumulative import time of ``peft_ext``
when the hook imports it right after ``peft`` (median of the repeats).

    .venv/bin/python scripts/bench_import.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def wall(code: str, autoload: bool) -> float:
    """Seconds for a fresh interpreter to run ``code``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if autoload:
        env.pop("PEFT_EXT_NO_AUTOLOAD", None)
    else:
        env["PEFT_EXT_NO_AUTOLOAD"] = "1"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def importtime_us(code: str, module: str) -> int:
    """Cumulative microseconds ``-X importtime`` attributes to the top-level import of ``module`` while running
    ``code`` with the hook on."""
    env = {k: v for k, v in os.environ.items() if k != "PEFT_EXT_NO_AUTOLOAD"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env)
    for line in out.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == module:
            return int(fields[1])
    raise RuntimeError(f"{module} was not imported by {code!r}")


def main() -> None:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rows = []
    for label, code in (("python -c pass", "pass"), ("import peft", "import peft")):
        on, off = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            on.append(wall(code, True))
            off.append(wall(code, False))
        rows.append((label, statistics.median(on), statistics.median(off)))
    hook = statistics.median(importtime_us("pass", "_peft_ext_autoload") for _ in range(args.repeats))
    ext = statistics.median(importtime_us("import peft", "peft_ext") for _ in range(args.repeats))
    peft = statistics.median(importtime_us("import peft", "peft") for _ in range(args.repeats))
    print(f"hook module at start-up of every process (-X importtime): {hook:.0f} us")
    print(f"peft_ext imported by the hook after peft: {ext / 1000:.1f} ms cumulative "
          f"(import peft itself: {peft / 1000:.0f} ms, so +{100 * ext / peft:.1f}%)")
    print("| process | autoload on (s) | autoload off (s) | difference (ms) |")
    print("|---|---|---|---|")
    for label, on, off in rows:
        print(f"| {label} | {on:.3f} | {off:.3f} | {1000 * (on - off):+.0f} |")


if __name__ == "__main__":
    main()
