"""The Chrome trace of recent steps (chrome://tracing, Perfetto): one track per worker
with its spans (decode, forward, backward, each all-reduce bucket, the optimizer step),
plus the driver's waits.

Example::

    write_trace("trace.json", driver_spans=[(0.0, 0.01)],
                worker_spans=[[("forward", 0.0, 0.004, "main")]], world_size=1)
"""
import json
import os


def write_trace(path, driver_spans, worker_spans, world_size):
    """Write the trace atomically (a temporary file, then a rename); returns ``path``.

    ``driver_spans``: (start, end) of each wait of the driver; ``worker_spans[r]``:
    (name, start, end, thread) of worker r, times in seconds."""
    events, threads = [], {}

    def add(pid, name, start, end, thread):
        tid = threads.setdefault((pid, thread), len(threads))
        events.append({"name": name, "ph": "X", "pid": pid, "tid": tid,
                       "ts": start * 1e6, "dur": max(end - start, 0) * 1e6})
    for start, end in driver_spans:
        add(0, "driver wait", start, end, "driver")
    for rank, spans in enumerate(worker_spans):
        for name, start, end, thread in spans:
            add(rank + 1, name, start, end, thread)
    meta = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "driver"}}]
    meta += [{"name": "process_name", "ph": "M", "pid": r + 1, "args": {"name": f"worker {r}"}}
             for r in range(world_size)]
    meta += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": t}}
             for (pid, t), tid in threads.items()]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)
    return path
