"""Where permutation units run: a reusable local process pool whose workers die with their parent, or Ray.

- :class:`LocalPool`: a ``concurrent.futures`` executor over a spawn-context ``ProcessPoolExecutor``. Its workers
  start once (all at creation, from the creating thread) and are reused by every later call; :func:`shared_pool`
  keeps one per process and shuts it down at exit. Each worker ignores SIGINT (the parent decides), asks the kernel
  to SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux; only when the pool is created from the
  main thread, because the kernel ties the signal to the creating *thread*) and, as a fallback on every platform,
  polls its parent's pid from a daemon thread and exits when it changed. :meth:`LocalPool.terminate` cancels what is
  queued and kills the workers now (SIGTERM, then SIGKILL after a grace period).
- :class:`RayExecutor`: the same interface on Ray tasks (``submit`` returns a ``concurrent.futures.Future`` resolved
  from the task's ObjectRef). ``address="auto"``: the running cluster if there is one, else a local instance;
  ``"ray://HOST:PORT"``: Ray client. Ray is imported only here, lazily (``pip install 'permsparse[ray]'``).
- :func:`make_executor`: the ``--cluster`` option's meaning.

Invariant: an executor only decides *where* a task runs; every task is a pure function of its arguments (see
:mod:`permsparse.optimizer.solve`), so any executor gives the same results.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from permsparse.errors import PermsparseError, UsageError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
#: Seconds between the worker's checks that its parent is still alive (the fallback to PR_SET_PDEATHSIG).
PARENT_POLL_S = 0.5
#: Seconds a terminated worker gets before SIGKILL.
TERMINATE_GRACE_S = 2.0


# ------------------------------------------------------------------------------------------------ worker side


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_init(parent_pid: int, use_pdeathsig: bool) -> None:
    """Runs first in every pool worker: die with the parent, leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if use_pdeathsig:
        _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="permsparse-parent-watch", daemon=True).start()


def _pid() -> int:
    return os.getpid()


# ------------------------------------------------------------------------------------------------ local pool


class LocalPool(Executor):
    """``workers`` spawn-context processes, started once and reused; they die with this process."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise UsageError(f"a local pool needs at least 1 worker, got {workers}")
        self.max_workers = int(workers)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=self.max_workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(), main))
        # Spawn every worker now, from this thread (with "spawn", ProcessPoolExecutor starts one per submit while
        # none is idle), so PR_SET_PDEATHSIG refers to a thread that lives as long as the pool's owner.
        for f in [pool.submit(_pid) for _ in range(self.max_workers)]:
            f.result()
        self._pool = pool
        log.debug("local pool: %d workers %s started in %.1f s", self.max_workers, self.pids(), time.perf_counter() - t0)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        pool = self._pool
        return sorted(p.pid for p in (pool._processes or {}).values() if p.is_alive()) if pool else []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._pool is None:
                raise RuntimeError("cannot submit to a LocalPool after shutdown")
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                log.warning("a solver worker died; starting a fresh local pool")
                self._kill(self._pool)
                self._start()
                return self._pool.submit(fn, *args, **kwargs)

    @property
    def broken(self) -> bool:
        return self._pool is None or bool(getattr(self._pool, "_broken", False))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def terminate(self) -> None:
        """Cancel queued tasks and kill the workers now (SIGTERM, SIGKILL after a grace period); the pool is closed."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            self._kill(pool)

    @staticmethod
    def _kill(pool: ProcessPoolExecutor) -> None:
        procs = list((pool._processes or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        pool.shutdown(wait=False, cancel_futures=True)


_SHARED: LocalPool | None = None
_SHARED_LOCK = threading.Lock()


def default_workers() -> int:
    """Processes to use when none is asked for: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def shared_pool(workers: int | None = None) -> LocalPool:
    """This process's reusable local pool with ``workers`` processes (default: the usable CPUs).

    Created on first use; a call with another worker count replaces it. Shut down at interpreter exit.
    """
    global _SHARED
    n = default_workers() if workers is None else max(1, int(workers))
    with _SHARED_LOCK:
        if _SHARED is not None and (_SHARED.max_workers != n or _SHARED.broken):
            _SHARED.terminate()
            _SHARED = None
        if _SHARED is None:
            _SHARED = LocalPool(n)
        return _SHARED


def discard_shared_pool(pool: LocalPool | None = None, *, kill: bool = True) -> None:
    """Close the shared pool (only if it is ``pool`` when given): kill its workers, or shut it down gracefully."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or (pool is not None and _SHARED is not pool):
            return
        victim, _SHARED = _SHARED, None
    if kill:
        victim.terminate()
    else:
        victim.shutdown(wait=True, cancel_futures=True)


atexit.register(lambda: discard_shared_pool(kill=False))


# ------------------------------------------------------------------------------------------------ Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PermsparseError("--cluster needs Ray, which is not installed: pip install 'permsparse[ray]' "
                              "(or pip install ray)") from None
    return ray


def _ray_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


class RayExecutor(Executor):
    """Tasks on a Ray cluster (each asks for ``num_cpus_per_task`` CPUs), behind the ``Executor`` interface.

    ``address``: None or ``"auto"`` (a running cluster, else a local instance with ``num_cpus`` CPUs), ``"local"``
    (always a new local instance),
    ``"ray://HOST:PORT"`` (Ray client) or a cluster's ``HOST:PORT``. If Ray is already initialized in this process,
    that session is used and left running at :meth:`shutdown`; a session started here is shut down there.
    Workers of a remote cluster must be able to ``import permsparse`` (install it there, or pass
    ``runtime_env={"py_modules": [...]}``).
    """

    def __init__(self, address: str | None = "auto", *, num_cpus: int | None = None, num_cpus_per_task: float = 1,
                 runtime_env: dict[str, Any] | None = None) -> None:
        ray = _import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            common = {"include_dashboard": False, "logging_level": logging.WARNING, "runtime_env": runtime_env,
                      "configure_logging": False}
            t0 = time.perf_counter()
            if address == "local":
                ray.init(address="local", num_cpus=num_cpus, **common)
            elif address in (None, "auto"):
                try:
                    ray.init(address="auto", **common)
                except ConnectionError:
                    ray.init(address="local", num_cpus=num_cpus, **common)
            else:
                try:
                    ray.init(address=address, **common)
                except ConnectionError as exc:
                    raise PermsparseError(f"cannot reach the Ray cluster at {address}: {exc}. Start it with "
                                          "`ray start --head` (client port 10001) or use --cluster auto.") from exc
            self._started = True
            log.info("Ray: %s CPUs (%s) in %.1f s", self.max_workers, address or "auto", time.perf_counter() - t0)
        self._remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(_ray_call)
        self._refs: dict[Future, Any] = {}
        self._lock = threading.Lock()

    @property
    def max_workers(self) -> int:
        """CPUs of the cluster (how many one-CPU tasks run at once)."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        ref = self._remote.remote(fn, args, kwargs)
        fut = ref.future()
        with self._lock:
            self._refs[fut] = ref
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._refs.pop(fut, None)

    def cancel_all(self) -> None:
        """Cancel (force-kill) every task submitted here that has not finished."""
        with self._lock:
            refs = list(self._refs.values())
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception as exc:
                log.debug("ray.cancel: %s", exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self.cancel_all()
        elif wait:
            with self._lock:
                refs = list(self._refs.values())
            if refs:
                self._ray.wait(refs, num_returns=len(refs))
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


# ------------------------------------------------------------------------------------------------ option


def make_executor(cluster: str | None, workers: int | None = None) -> Executor | None:
    """The executor for ``--cluster``: None/``local`` → None (``solve_all`` uses :func:`shared_pool`, or runs
    in-process for one worker); ``auto`` → :class:`RayExecutor` on the running cluster or a local instance with
    ``workers`` CPUs; ``ray://HOST:PORT`` → Ray client. The caller shuts a Ray executor down when done."""
    if cluster in (None, "", "local"):
        return None
    if cluster == "auto" or cluster.startswith("ray://"):
        return RayExecutor(cluster, num_cpus=workers)
    raise UsageError(f"--cluster {cluster!r}: use 'local', 'auto' (Ray: running cluster or a local instance) "
                     "or 'ray://HOST:PORT' (Ray client)")


def executor_workers(executor: Executor) -> int:
    """How many tasks ``executor`` runs at once (``max_workers`` / ``_max_workers``; else the usable CPUs)."""
    for attr in ("max_workers", "_max_workers"):
        n = getattr(executor, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return default_workers()
