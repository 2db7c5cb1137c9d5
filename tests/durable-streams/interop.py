"""Interop: the PyPI client (durable-streams, pinned in requirements.txt) follows a typed task
queue of eventqueue through the Durable Streams protocol. Run in two phases around a restart:

    python interop.py follow <base-url> <state-file>   the task's events so far; saves the offset
    python interop.py resume <base-url> <state-file>   after the restart: only the new events,
                                                        following live until the task completes

Events are published with the events API (POST /events/queues/{id}/events). Exits non-zero
on any mismatch.
"""

import json
import sys
import threading
import time
import urllib.request

from durable_streams import stream

TASK = "interop-py-task"


def publish(base: str, events: list[dict]) -> None:
    req = urllib.request.Request(
        f"{base}/events/queues/{TASK}/events",
        data=json.dumps({"events": events}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        assert r.status == 200, r.status


def create(base: str) -> None:
    req = urllib.request.Request(
        f"{base}/events/queues",
        data=json.dumps({"task_id": TASK, "kind": "ingestion"}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        assert r.status == 201, r.status


def progress(n: int) -> dict:
    return {"event_type": "progress", "current": n, "total": 10}


def fail(what: str) -> None:
    print(f"PyPI interop FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    phase, base, state_file = sys.argv[1:4]
    url = f"{base}/v1/stream/{TASK}"
    if phase == "follow":
        create(base)
        publish(base, [progress(1), progress(2), progress(3)])
        with stream(url, offset="-1", live=False) as res:
            events = res.read_json()
            offset = res.offset
        currents = [e["current"] for e in events]
        if currents != [1, 2, 3] or [e["offset"] for e in events] != [0, 1, 2]:
            fail(f"events so far: {events}")
        with open(state_file, "w") as f:
            json.dump({"offset": offset}, f)
        print(f"PyPI interop: read 3 events of the typed queue, next offset {offset}")
    elif phase == "resume":
        with open(state_file) as f:
            offset = json.load(f)["offset"]

        def later() -> None:
            time.sleep(0.5)
            publish(base, [progress(4), progress(5)])
            time.sleep(0.2)
            publish(base, [{"event_type": "complete", "result": {"ok": True}}])

        threading.Thread(target=later, daemon=True).start()
        seen = []
        with stream(url, offset=offset, live="long-poll") as res:
            for event in res.iter_json():
                seen.append(event)
                if event["event_type"] == "complete":
                    break
        kinds = [(e["event_type"], e.get("current")) for e in seen]
        if kinds != [("progress", 4), ("progress", 5), ("complete", None)]:
            fail(f"followed after the restart: {kinds}")
        if [e["offset"] for e in seen] != [3, 4, 5]:
            fail(f"offsets after the restart: {[e['offset'] for e in seen]}")
        print("PyPI interop: followed the task live after the restart, nothing lost or repeated")
    else:
        print("usage: interop.py follow|resume <base-url> <state-file>", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
