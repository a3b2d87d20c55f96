"""Solve many independent permutation problems (units) on any ``concurrent.futures.Executor``, with checkpoints.

:func:`solve_all` turns each problem into one task ``_solve_task(payload) -> SolveResult``: a pure function of the
problem's content, the configured method object (whose seed is the caller's ``seed``; per-unit time budgets aside,
nothing else is random) and a fixed thread count (torch and BLAS are limited to ``torch_threads`` inside the task,
so reductions split the same way wherever it runs). Hence the same permutations, bit for bit, in this process, in
the local pool (:func:`permsparse.optimizer.executors.shared_pool`) or on Ray.

Transport: on a local process pool, arrays of a problem above :data:`MMAP_MIN_BYTES` travel as ``.npy`` files in a
private temporary folder that the worker opens with ``np.load(mmap_mode="r")`` (pickled with a ``persistent_id``
hook, so every array field of any problem class is covered); a file is removed as soon as its task finished, the
folder when the call returns or raises (KeyboardInterrupt included); folders left by a killed process are swept by
the next call. Other executors (Ray, threads) receive the problem object itself (Ray keeps big arrays in its object
store). Arrays always reach the method read-only, in-process too, so a method that writes its input fails everywhere
alike instead of only on some executors.

Checkpoints: with a :class:`~permsparse.optimizer.checkpoint.CheckpointStore`, every problem whose key is stored is
not solved again, and every new result is stored the moment it arrives, so SIGKILL loses only the units in flight.

Interrupts: SIGINT (and SIGTERM where the CLI maps it to KeyboardInterrupt) cancel the queued tasks, kill the local
pool's workers (a fresh pool starts on the next call) or cancel the Ray tasks, remove the temporary files and re-raise,
within about :data:`~permsparse.optimizer.executors.TERMINATE_GRACE_S` seconds. Workers also die with this process.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.optimizer.base import (
    PermutationProblem,
    SolveResult,
    check_permutation,
    efficacy,
    retained_share,
    unstructured_bound,
)
from permsparse.optimizer.checkpoint import CheckpointStore, problem_digest, unit_key
from permsparse.optimizer.executors import (
    LocalPool,
    RayExecutor,
    default_workers,
    discard_shared_pool,
    executor_workers,
    shared_pool,
)

log = logging.getLogger(__name__)

#: Problems whose arrays total at least this many bytes go to a local pool as memory-mapped .npy files.
MMAP_MIN_BYTES = 1 << 20
#: Within such a problem, arrays of at least this many bytes are written to files (smaller ones are pickled).
MMAP_ARRAY_MIN_BYTES = 1 << 16
TMP_PREFIX = "permsparse-solve-"


# ------------------------------------------------------------------------------------------------ the task


def _read_only(obj: Any) -> Any:
    """``obj`` with every array (in dataclass fields, tuples, lists) replaced by a read-only view; no copies."""
    if isinstance(obj, np.ndarray):
        v = obj.view()
        v.flags.writeable = False
        return v
    if isinstance(obj, (tuple, list)):
        return type(obj)(_read_only(x) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _read_only(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        new = object.__new__(type(obj))
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, changes.get(f.name, getattr(obj, f.name)))
        return new
    return obj


def _blas_threads(n: int):
    """Limit BLAS/OpenMP threads (numpy, scipy) to ``n`` for the duration (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's usual stacks
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


def _solve_task(problem_or_blob: Any, method_name: str, method: Any, threads: int) -> SolveResult:
    """Solve one problem (given as an object or as a blob from :func:`_dump`); runs in any process."""
    import torch

    problem = _load(problem_or_blob) if isinstance(problem_or_blob, bytes) else _read_only(problem_or_blob)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _blas_threads(threads):
            t0 = time.perf_counter()
            perm = np.asarray(method.solve(problem), dtype=np.int64)
            seconds = time.perf_counter() - t0
            check_permutation(perm, problem.k, problem.block)
            ident = retained_share(problem, None)
            kept = retained_share(problem, perm)
            if getattr(problem, "outputs", None):  # judged by the output error the mask causes, not kept importance
                from permsparse.optimizer.objectives import output_losses

                loss_ident, loss_perm = output_losses(problem, [None, perm])
                worse = loss_perm > loss_ident
            else:
                worse = kept < ident
            if worse:  # belt and braces: never hand back something worse than plain N:M
                perm, kept = np.arange(problem.k, dtype=np.int64), ident
            bound = unstructured_bound(problem)
    finally:
        torch.set_num_threads(previous)
    return SolveResult(problem.name, perm, seconds, ident, kept, bound, efficacy(ident, kept, bound))


# ------------------------------------------------------------------------------------------------ transport


class _FilePickler(pickle.Pickler):
    def __init__(self, buf: io.BytesIO, folder: Path, stem: str) -> None:
        super().__init__(buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder, self.stem, self.files = folder, stem, []

    def persistent_id(self, obj: Any) -> str | None:
        if isinstance(obj, np.ndarray) and obj.nbytes >= MMAP_ARRAY_MIN_BYTES and not obj.dtype.hasobject:
            path = self.folder / f"{self.stem}-{len(self.files)}.npy"
            np.save(path, obj, allow_pickle=False)
            self.files.append(path)
            return str(path)
        return None


class _FileUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: str) -> np.ndarray:
        return np.load(pid, mmap_mode="r", allow_pickle=False)


def _array_bytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_array_bytes(x) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_array_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _dump(problem: Any, folder: Path, stem: str) -> tuple[bytes, list[Path]]:
    buf = io.BytesIO()
    p = _FilePickler(buf, folder, stem)
    p.dump(problem)
    return buf.getvalue(), p.files


def _load(blob: bytes) -> Any:
    return _FileUnpickler(io.BytesIO(blob)).load()


def _sweep_stale(root: Path) -> None:
    """Remove temp folders of solve calls whose process is gone (killed before its cleanup ran)."""
    for d in root.glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(d.name[len(TMP_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(d, ignore_errors=True)


class _Transport:
    """Payloads for one solve call; owns the temporary folder of memory-mapped arrays."""

    def __init__(self, use_files: bool) -> None:
        self.use_files = use_files
        self.folder: Path | None = None
        self.files: dict[int, list[Path]] = {}

    def payload(self, i: int, problem: Any) -> Any:
        if not self.use_files or _array_bytes(problem) < MMAP_MIN_BYTES:
            return problem
        if self.folder is None:
            root = Path(tempfile.gettempdir())
            _sweep_stale(root)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=root))
        blob, files = _dump(problem, self.folder, f"u{i}")
        self.files[i] = files
        return blob

    def done(self, i: int) -> None:
        for f in self.files.pop(i, []):
            f.unlink(missing_ok=True)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.files.clear()


# ------------------------------------------------------------------------------------------------ progress


def solve_progress(total: int, desc: str = "permutations", *, disable: bool = False):
    """One overall progress bar (units done / total, time left) to pass as ``progress=`` to several calls."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="unit", disable=disable, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ solve_all


def _methods(method_name: str, budgets: Sequence[float | None], seed: int, learned_config: Any) -> list[Any]:
    from permsparse.optimizer.methods import make_method

    return [make_method(method_name, seed=seed, budget_s=b, learned=learned_config) for b in budgets]


def solve_all(
    problems: Sequence[PermutationProblem],
    method_name: str,
    *,
    executor: Executor | None = None,
    workers: int | None = None,
    seed: int = 0,
    budget_s: float | None = None,
    learned_config: Any = None,
    progress: Any = True,
    checkpoint: CheckpointStore | None = None,
    torch_threads: int = 1,
) -> list[SolveResult]:
    """Solve every problem independently with ``method_name``; results in input order.

    ``executor``: where tasks run (any ``concurrent.futures.Executor``; :class:`RayExecutor` for a cluster); None →
    this process's reusable local pool, or in this process when ``workers == 1`` or only one problem is left to
    solve. ``workers``: concurrency (None: the executor's, or the usable CPUs). ``budget_s``: total seconds for all
    problems, split in proportion to their size (``k * columns``) and scaled by the concurrency (a budget makes results
    depend on machine speed). ``progress``: True for a bar of this call, False for none, or a bar from
    :func:`solve_progress` shared by several calls (updated, not closed). ``checkpoint``: reuse and store results.
    ``torch_threads``: threads per task (the same everywhere, so results do not depend on the executor).
    """
    problems = list(problems)
    if not problems:
        return []
    if workers is not None and int(workers) < 1:
        raise PermsparseError(f"workers must be >= 1, got {workers}")
    if executor is not None:
        concurrency = int(workers) if workers is not None else executor_workers(executor)
    else:
        concurrency = int(workers) if workers is not None else default_workers()
    if budget_s is None:
        budgets: list[float | None] = [None] * len(problems)
    else:
        sizes = np.array([p.k * sum(imp.shape[1] for imp in p.importances) for p in problems], dtype=np.float64)
        busy = min(concurrency, len(problems))
        budgets = [float(b) for b in sizes / sizes.sum() * float(budget_s) * busy]
    methods = _methods(method_name, budgets, seed, learned_config)

    results: list[SolveResult | None] = [None] * len(problems)
    keys: list[str | None] = [None] * len(problems)
    if checkpoint is not None:
        for i, (prob, method) in enumerate(zip(problems, methods)):
            keys[i] = unit_key(problem_digest(prob), method_name, method)
            hit = checkpoint.get(keys[i])
            if hit is not None and hit.perm.shape == (prob.k,):
                check_permutation(hit.perm, prob.k, prob.block)
                results[i] = replace(hit, name=prob.name)
    todo = [i for i, r in enumerate(results) if r is None]
    reused = len(problems) - len(todo)
    if reused:
        log.info("%d of %d units reused from %s", reused, len(problems), checkpoint.root)

    own_bar = progress is True
    if own_bar:
        bar = solve_progress(len(problems), f"permutations ({method_name})")
    else:
        bar = None if progress is False or progress is None else progress
    if bar is not None and reused:
        bar.update(reused)

    def finish(i: int, res: SolveResult) -> None:
        check_permutation(res.perm, problems[i].k, problems[i].block)
        results[i] = res
        if checkpoint is not None:
            checkpoint.put(keys[i], res)
        if bar is not None:
            bar.update(1)

    try:
        if todo and executor is None and (concurrency == 1 or len(todo) == 1):
            for i in todo:
                finish(i, _solve_task(problems[i], method_name, methods[i], torch_threads))
        elif todo:
            _run_on(executor, problems, methods, method_name, todo, concurrency, torch_threads, finish)
    finally:
        if own_bar:
            bar.close()
    return [r for r in results if r is not None]


def _run_on(executor: Executor | None, problems: list[Any], methods: list[Any], method_name: str, todo: list[int],
            concurrency: int, threads: int, finish) -> None:
    """Submit ``todo`` with at most ``2 * concurrency`` in flight; ``finish(i, result)`` as each one completes.

    The shared pool's size is the requested concurrency, never the number of problems of this call, so calls with
    few problems (the last chunk) reuse the same pool instead of restarting it."""
    ex = executor if executor is not None else shared_pool(concurrency)
    transport = _Transport(use_files=isinstance(ex, (LocalPool, ProcessPoolExecutor)))
    inflight: dict[Future, int] = {}
    queue = list(reversed(todo))
    window = 2 * concurrency
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                i = queue.pop()
                fut = ex.submit(_solve_task, transport.payload(i, problems[i]), method_name, methods[i], threads)
                inflight[fut] = i
            done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                i = inflight.pop(fut)
                transport.done(i)
                finish(i, fut.result())
    except BrokenProcessPool as exc:
        _abort(ex, executor, inflight, kill=True)
        raise PermsparseError("a permutation worker process died (out of memory?): rerun with fewer --workers, or "
                              "--workers 1; with --work-dir, finished units are reused") from exc
    except BaseException as exc:
        # Interrupts stop running tasks too; on a task's error the shared pool is simply replaced next call.
        _abort(ex, executor, inflight, kill=executor is None or isinstance(exc, (KeyboardInterrupt, SystemExit)))
        raise
    finally:
        transport.close()


def _abort(ex: Executor, given: Executor | None, inflight: dict[Future, int], *, kill: bool) -> None:
    """Stop what is queued or running for this call (interrupt or error)."""
    for fut in inflight:
        fut.cancel()
    if isinstance(ex, RayExecutor):
        if kill:
            ex.cancel_all()
    elif isinstance(ex, LocalPool) and kill and any(not f.done() for f in inflight):
        if given is None:
            discard_shared_pool(ex, kill=True)
        else:
            ex.terminate()
