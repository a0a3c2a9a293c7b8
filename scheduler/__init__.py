"""The driver-side scheduler: starts and places workers and drives them.

Gangs start the workers: ``local.LocalGang`` runs them as threads; ``ray_gang.RayGang``
as Ray actors in one placement group. Both expose ``run(payloads) -> replies``,
``stats()`` and ``shutdown()``. ``distgrad.distributed.Cluster`` drives a gang through
one part per job: ``execution`` (send programs, mirror the workers' caches, retry, roll
back), ``recovery`` (lost workers, resize), ``sizing`` (shard sizes), ``checkpoint``
(gather, checkpoints, values home at shutdown), ``timeline`` (the Chrome trace).
Only ``ray_gang`` and ``ray_data`` import Ray.
"""
