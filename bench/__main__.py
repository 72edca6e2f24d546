"""The performance figures in one command: durable intake (small requests over 1 and 50
connections, 1 MB img2img, small requests with the MongoDB mirror on) with a profile summary,
restarts with a large backlog, the dispatch gap with 1 and 8 backends, and end-to-end no-op
jobs per second with the CPU per job and a profile summary; each beside its peer in the same
run (the benches themselves say which). Runs them one after another, each in a process of
its own, so none measures another's leftovers.

Usage: .venv/bin/python -m bench [--quick]
  --quick: fewer requests and repeats (a few minutes instead of about half an hour); the
           numbers are noisier, the comparisons still side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

FULL = [
    ["bench.intake", "--repeats", "3", "--profile"],
    ["bench.restart", "--images", "10000", "--small", "100000"],
    ["bench.core"],
    ["bench.e2e", "--repeats", "3", "--profile"],
]
QUICK = [
    ["bench.intake", "--repeats", "1", "--requests", "3000", "--images", "300"],
    ["bench.restart", "--images", "1000", "--small", "20000"],
    ["bench.core", "--requests", "2000", "--jobs", "200"],
    ["bench.e2e", "--repeats", "1", "--jobs", "1000"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failed = []
    for command in QUICK if args.quick else FULL:
        print(f"\n=== python -m {' '.join(command)}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", *command], check=False)
        print(f"=== {command[0]}: {time.monotonic() - started:.0f} s", flush=True)
        if result.returncode:
            failed.append(f"{command[0]} (exit {result.returncode})")
    if failed:
        sys.exit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
