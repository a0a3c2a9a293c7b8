"""``distgrad.workers``: what runs inside a worker (a Ray actor, or a thread of the driver
with ``backend="local"``): ``worker.Worker`` runs the driver's programs on its own engine,
``bucketing`` all-reduces gradient buckets on a communication thread, ``actor`` wraps a
worker for Ray, ``sources`` reads worker-side datasets, ``collective/`` holds the
communicators. Importing this package imports nothing (and never Ray).
"""
