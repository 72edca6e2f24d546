"""The peer for end-to-end job throughput: huey (SqliteHuey, one worker thread) running a
no-op task. Enqueues N tasks, then starts the consumer and times until the queue is empty.
Prints: enqueues per second, then no-op tasks run per second.

Usage: python bench/huey_peer.py DATABASE N   (huey is installed for benchmarks only:
pip install -r bench/requirements.txt)
"""

from __future__ import annotations

import os
import sys
import threading
import time

from huey import SqliteHuey

huey = SqliteHuey(filename=sys.argv[1] if len(sys.argv) > 1 else ":memory:")


@huey.task()
def noop(number: int) -> None:
    return None


def main() -> None:
    count = int(sys.argv[2])
    started = time.perf_counter()
    for number in range(count):
        noop(number)
    enqueue_rate = count / (time.perf_counter() - started)
    consumer = huey.create_consumer(workers=1, periodic=False, worker_type="thread", check_worker_health=False)

    def watch() -> None:
        begun = time.perf_counter()
        while huey.pending_count() > 0:
            time.sleep(0.002)
        print(f"{enqueue_rate:.0f} {count / (time.perf_counter() - begun):.0f}", flush=True)
        os._exit(0)  # the consumer has no stop-from-another-thread; the numbers are out

    threading.Thread(target=watch, daemon=True).start()
    consumer.start()  # starts the worker thread and returns
    threading.Event().wait()  # until watch() ends the process


if __name__ == "__main__":
    main()
