"""Fill a JsonlRetryStore-backed retry queue past its capacity, then die without closing it.

Usage::

    python -m tests.shared.programs.retry_queue_writer --path FILE --items N --capacity C

Prints one JSON line ``{"ids": [...], "in_memory": M}`` on stdout and exits
with ``os._exit(0)``: no close, no flush beyond what ``put`` already did, the
way a crash ends a process. The test then loads the file in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from shared.retry_queue import JsonlRetryStore, RetryQueue


async def fill(path: Path, items: int, capacity: int) -> dict[str, object]:
    store = JsonlRetryStore(path)
    queue = RetryQueue(name="subprocess_writer", store=store, capacity=capacity, base_delay=60.0)
    ids = []
    for number in range(items):
        item = await queue.put("send_message", {"number": number}, error="TransientError: outage")
        ids.append(item.id)
    return {"ids": ids, "in_memory": queue.get_status()["in_memory"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--capacity", type=int, required=True)
    args = parser.parse_args()
    result = asyncio.run(fill(args.path, args.items, args.capacity))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
