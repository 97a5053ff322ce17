"""Wiring to a Dask cluster through Prefect's DaskTaskRunner: open it, place shards on workers,
submit tasks pinned to them.

Why this is not `@flow(task_runner=...)`: whether a run uses a cluster is part of its config
(`--workers`, `--dask-address`, or a deployment's parameters), so the flow opens the runner
itself; tasks it calls directly still run in the flow's process as before.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from layerquant.config import RunConfig
from layerquant.infra.memory import allocator_environment


class Cluster:
    """An open DaskTaskRunner and the shard count of the run on it."""

    def __init__(self, runner, n_shards: int):
        self.runner = runner
        self.n_shards = n_shards

    def workers(self) -> list[str]:
        """Addresses of the workers alive now, in a stable order."""
        return sorted(self.runner.client.scheduler_info()["workers"])

    def placement(self) -> list[str]:
        """Shard -> worker, round robin over the workers alive now: the same worker for a shard
        from block to block while the cluster is unchanged, so its activations stay there."""
        workers = self.workers()
        return [workers[shard % len(workers)] for shard in range(self.n_shards)]

    def spread(self, chunks: list[list[int]]) -> list[list[int] | None]:
        """A unit's row chunks ([start, stop) each, in order) cut into one contiguous row range
        per worker alive now, at most one per chunk; None: the whole unit in one task."""
        parts = min(len(self.workers()), len(chunks))
        if parts <= 1:
            return [None]
        cuts = [round(i * len(chunks) / parts) for i in range(parts + 1)]
        return [[chunks[a][0], chunks[b - 1][1]] for a, b in zip(cuts, cuts[1:])]

    def submit(self, task, worker: str | None = None, **parameters: Any):
        """Submit `task` to the cluster; `worker` pins it there, unless that worker is gone
        (then the scheduler picks another, and the task rebuilds what it lost from the store)."""
        import dask

        if worker is None:
            return self.runner.submit(task, parameters)
        # prefect-dask's client.submit merges dask's annotations into the task's
        with dask.annotate(workers=[worker], allow_other_workers=True):
            return self.runner.submit(task, parameters)


    def gather(self, calls: list[tuple[Any, str | None, dict[str, Any]]]) -> list[Any]:
        """Submit every (task, worker, parameters) at once and wait for all their results, in
        order. A task whose worker was lost for good (Dask gave up rescheduling it, or its run
        crashed with the process) is submitted once more, unpinned; its stage rebuilds what
        the lost worker held from the store. A task that failed on its own (after Prefect's
        retries) fails the run as before."""
        futures = [self.submit(task, worker, **parameters) for task, worker, parameters in calls]
        results = []
        for (task, _, parameters), future in zip(calls, futures):
            for attempt in range(LOST_WORKER_RESUBMITS + 1):
                try:
                    results.append(future.result())
                    break
                except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lost worker
                    if attempt == LOST_WORKER_RESUBMITS or not lost_worker(exc):
                        raise
                    future = self.submit(task, None, **parameters)
        return results


# how many times a task whose worker died is submitted again (Dask itself reschedules a lost
# task up to its distributed.scheduler.allowed-failures first)
LOST_WORKER_RESUBMITS = 2


def lost_worker(exc: BaseException) -> bool:
    """Whether `exc` says the task's worker went away, not that the task itself failed."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    from distributed.comm import CommClosedError
    from prefect.exceptions import CrashedRun

    return isinstance(exc, (KilledWorker, CommClosedError, CancelledError, CrashedRun))


def import_task_code() -> None:
    """Run on each worker when the cluster opens (a module-level function: workers import it)."""
    import importlib

    importlib.import_module("layerquant.tasks.shards")


def flow_api_environment() -> dict[str, str]:
    """What a local worker process needs to report its task runs to the flow's Prefect API.

    A run from the CLI without a server talks to a temporary server the CLI started; a worker
    process does not inherit it (it is not in the environment) and would boot a temporary server
    of its own per worker: seconds of CPU at its first task, a few hundred MB beside it, and its
    shard and solve task runs recorded where no one sees them. A configured PREFECT_API_URL is
    inherited anyway; passing the flow client's URL covers both."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = None if context is None else context.client
    return {} if client is None else {"PREFECT_API_URL": str(client.api_url)}


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@contextmanager
def open_cluster(run_config: RunConfig) -> Iterator[Cluster | None]:
    """The run's cluster (None for an in-process run): a LocalCluster of `workers` processes,
    or the scheduler at `dask_address`; closed (a local one shut down) when the run ends."""
    if not run_config.on_cluster():
        yield None
        return
    run_config.check_cluster_support()
    import dask
    from prefect_dask import DaskTaskRunner

    if run_config.dask_address is not None:
        runner = DaskTaskRunner(address=run_config.dask_address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": run_config.workers, "threads_per_worker": run_config.threads_per_worker, "processes": True,
            # no dashboard port to collide with another run's; the memory a worker may use is
            # the machine's, not 1/N of it: one block's weights and a shard's activations
            "dashboard_address": None, "memory_limit": 0, "env": flow_api_environment()})
    # Dask's sampling profiler walks every thread's frames and trips over the greenlets a
    # shard's paused forwards live in (KeyError tracebacks in the worker logs); it profiles
    # nothing a run needs. A LocalCluster's workers get this config, a remote cluster's
    # workers are told in infra/dask_stack.sh
    # the allocator's settings must be in a worker's environment when it starts (glibc reads
    # them once): Dask sets "pre-spawn" variables before it spawns, `env` only afterwards
    pre_spawn = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) | allocator_environment()
    with dask.config.set({"distributed.worker.profile.enabled": False, "distributed.nanny.pre-spawn-environ": pre_spawn}), runner:
        runner.client.wait_for_workers(1, timeout=120)
        # every worker imports the task code (torch, transformers) now, all at once, rather
        # than inside block 0's first stage, where it would read as that block's time
        runner.client.run(import_task_code)
        n_workers = len(runner.client.scheduler_info()["workers"])
        n_shards = run_config.shards or next_power_of_two(max(1, run_config.workers or n_workers))
        yield Cluster(runner, n_shards)
