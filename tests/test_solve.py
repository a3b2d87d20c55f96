"""solve_all on every executor, memory-mapped transport, checkpoints that survive SIGKILL, worker lifetime, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from permsparse.errors import PermsparseError, UsageError
from permsparse.optimizer.base import (
    OutputTerm,
    PermutationProblem,
    check_permutation,
    retained_share,
)
from permsparse.optimizer.checkpoint import (
    CheckpointStore,
    config_digest,
    problem_digest,
    unit_key,
)
from permsparse.optimizer.executors import make_executor, shared_pool
from permsparse.optimizer.learned import LearnedConfig
from permsparse.optimizer.methods import make_method
from permsparse.optimizer.solve import (
    MMAP_MIN_BYTES,
    TMP_PREFIX,
    SolveResult,
    _load,
    _Transport,
    solve_all,
)

FAST_LEARNED = LearnedConfig(rounds=2, iterations=4, samples=4, device="cpu")


def problems(n: int, k: int = 128, cols: int = 96, seed: int = 0, block: int | None = None) -> list[PermutationProblem]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.abs(rng.standard_normal((k, cols))).astype(np.float32) * rng.uniform(0.5, 2.0, size=(k, 1)).astype(
            np.float32)
        out.append(PermutationProblem(f"u{i}", (a, a[:, : cols // 2].copy()), block=block or k))
    return out


def big_problem(seed: int = 0) -> PermutationProblem:
    """Above MMAP_MIN_BYTES: travels to a local pool as memory-mapped .npy files."""
    (p,) = problems(1, k=512, cols=344, seed=seed, block=64)
    assert sum(a.nbytes for a in p.importances) >= MMAP_MIN_BYTES
    return p


def perms(results: list[SolveResult]) -> list[np.ndarray]:
    return [r.perm for r in results]


def same(a: list[SolveResult], b: list[SolveResult]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.perm, y.perm) and x.perm.dtype == y.perm.dtype for x, y in zip(a, b))


def my_tmp_dirs() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}{os.getpid()}-*"))


# ------------------------------------------------------------------------------------------------ executors


@pytest.mark.parametrize("method", ["lsa", "learned"])
def test_same_permutations_in_process_pool_and_threads(method):
    probs = problems(3) + [big_problem(1)]
    cfg = FAST_LEARNED if method == "learned" else None
    ref = solve_all(probs, method, workers=1, learned_config=cfg, progress=False)
    pool = solve_all(probs, method, workers=2, learned_config=cfg, progress=False)
    with ThreadPoolExecutor(2) as ex:
        threads = solve_all(probs, method, executor=ex, learned_config=cfg, progress=False)
    assert same(ref, pool) and same(ref, threads)
    assert [r.name for r in pool] == [p.name for p in probs]  # input order
    for p, r in zip(probs, pool):
        check_permutation(r.perm, p.k, p.block)
        assert r.retained >= r.retained_identity
        assert r.retained == pytest.approx(retained_share(p, r.perm), abs=1e-12)
        assert not r.reused
    assert sum(r.retained > r.retained_identity + 1e-4 for r in pool) >= 3  # the permutations do something
    assert my_tmp_dirs() == []  # memory-mapped transport cleaned up


def test_pool_is_reused_across_calls():
    probs = problems(2)
    solve_all(probs, "lsa", workers=2, progress=False)
    pids = shared_pool(2).pids()
    assert len(pids) == 2
    t = time.perf_counter()
    solve_all(probs, "lsa", workers=2, progress=False)
    assert shared_pool(2).pids() == pids  # same processes: no start-up per call
    assert time.perf_counter() - t < 30


def test_memmap_transport_roundtrip(tmp_path):
    p = big_problem()
    small = problems(1)[0]
    tr = _Transport(use_files=True)
    try:
        assert tr.payload(0, small) is small  # small problems are pickled as they are
        blob = tr.payload(1, p)
        assert isinstance(blob, bytes) and len(blob) < 10_000
        files = list(tr.folder.glob("*.npy"))
        assert len(files) == 2
        q = _load(blob)
        assert q.name == p.name and q.block == p.block
        for a, b in zip(p.importances, q.importances):
            assert isinstance(b, np.memmap) and not b.flags.writeable
            assert np.array_equal(a, b) and a.dtype == b.dtype
        del q, b
        tr.done(1)
        assert not any(f.exists() for f in files)
    finally:
        folder = tr.folder
        tr.close()
    assert not folder.exists()


def test_generic_problem_fields_are_transported_and_hashed():
    """Optional array fields (here OutputTerm arrays) are memory-mapped and part of the checkpoint key."""
    rng = np.random.default_rng(3)
    k, n = 256, 320
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((64, k)).astype(np.float32)
    h = x.T @ x
    term = OutputTerm(weight=w, hessian=h, score=np.abs(w))
    p = PermutationProblem("o", (np.abs(w),), block=k, outputs=(term,))
    tr = _Transport(use_files=True)
    try:
        q = _load(tr.payload(0, p))
        assert isinstance(q.outputs[0].hessian, np.memmap) and np.array_equal(q.outputs[0].hessian, h)
    finally:
        tr.close()
    h2 = h.copy()
    h2[0, 0] += 1
    p2 = PermutationProblem("o", (np.abs(w),), block=k, outputs=(OutputTerm(weight=w, hessian=h2, score=np.abs(w)),))
    assert problem_digest(p) != problem_digest(p2)


def test_shared_progress_bar_counts_all_calls(tmp_path):
    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    store = CheckpointStore(tmp_path)
    probs = problems(3)
    solve_all(probs[:2], "lsa", workers=1, progress=bar, checkpoint=store)
    solve_all(probs, "lsa", workers=1, progress=bar, checkpoint=store)  # 2 reused + 1 solved
    assert bar.n == 5


def test_make_executor_options(monkeypatch):
    assert make_executor(None) is None and make_executor("local", 2) is None
    with pytest.raises(UsageError, match="ray://HOST:PORT"):
        make_executor("spark://x")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PermsparseError, match=r"permsparse\[ray\]"):
        make_executor("auto")


def test_dead_worker_gives_clear_error_and_next_call_recovers():
    pool = shared_pool(2)
    fut = pool.submit(os._exit, 3)
    with pytest.raises(BrokenProcessPool):
        fut.result(timeout=60)
    assert pool.broken
    fresh = shared_pool(2)  # what the next solve_all gets
    assert fresh is not pool and not fresh.broken and fresh.submit(abs, -3).result(timeout=60) == 3


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_key_covers_content_method_config_seed():
    p = problems(1)[0]
    base = unit_key(problem_digest(p), "lsa", make_method("lsa", seed=0))
    renamed = PermutationProblem("other", p.importances, block=p.block)
    assert unit_key(problem_digest(renamed), "lsa", make_method("lsa", seed=0)) == base  # name is not content
    changed = p.importances[0].copy()
    changed[5, 5] = np.nextafter(changed[5, 5], np.float32(np.inf))
    variants = [
        unit_key(problem_digest(PermutationProblem("u0", (changed, p.importances[1]), block=p.block)), "lsa",
                 make_method("lsa", seed=0)),
        unit_key(problem_digest(PermutationProblem("u0", tuple(a.astype(np.float64) for a in p.importances),
                                                   block=p.block)), "lsa", make_method("lsa", seed=0)),
        unit_key(problem_digest(PermutationProblem("u0", p.importances, block=p.block // 2)), "lsa",
                 make_method("lsa", seed=0)),
        unit_key(problem_digest(p), "lsa", make_method("lsa", seed=1)),
        unit_key(problem_digest(p), "lsa", make_method("lsa", seed=0, budget_s=3.0)),
        unit_key(problem_digest(p), "channel_swap", make_method("channel_swap", seed=0)),
        unit_key(problem_digest(p), "learned", make_method("learned", learned=FAST_LEARNED)),
        unit_key(problem_digest(p), "learned", make_method("learned", learned=LearnedConfig(rounds=3))),
    ]
    assert len(set(variants + [base])) == len(variants) + 1
    assert config_digest(make_method("lsa", seed=0)) == config_digest(make_method("lsa", seed=0))


def test_checkpoint_store_roundtrip_and_corruption(tmp_path):
    store = CheckpointStore(tmp_path)
    perm = np.random.default_rng(0).permutation(64)
    r = SolveResult("x", perm, 1.5, 0.7, 0.75, 0.8, 0.5)
    store.put("ab" * 32, r)
    got = store.get("ab" * 32)
    assert got.reused and np.array_equal(got.perm, perm) and got.perm.dtype == np.int64
    assert (got.seconds, got.retained, got.efficacy) == (1.5, 0.75, 0.5)
    assert len(store) == 1 and "ab" * 32 in store and store.get("cd" * 32) is None
    npy = next(tmp_path.glob("units/*/*.npy"))
    np.save(npy, perm[::-1].copy())  # not what the JSON's hash says
    assert store.get("ab" * 32) is None
    meta = next(tmp_path.glob("units/*/*.json"))
    meta.write_text(meta.read_text()[:10])  # truncated
    assert store.get("ab" * 32) is None
    assert not list(tmp_path.glob("units/*/.*.tmp"))


def test_checkpointed_solve_reuses_everything(tmp_path):
    probs = problems(3)
    store = CheckpointStore(tmp_path)
    first = solve_all(probs, "lsa", workers=1, progress=False, checkpoint=store)
    assert len(store) == 3 and not any(r.reused for r in first)
    again = solve_all(probs, "lsa", workers=2, progress=False, checkpoint=store)
    assert all(r.reused for r in again) and same(first, again)
    assert [r.name for r in again] == [p.name for p in probs]
    other_seed = solve_all(probs, "lsa", workers=1, seed=1, progress=False, checkpoint=store)
    assert not any(r.reused for r in other_seed) and len(store) == 6


# ------------------------------------------------------------------------------------------------ processes

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from permsparse.optimizer.base import PermutationProblem
    from permsparse.optimizer.checkpoint import CheckpointStore
    from permsparse.optimizer.executors import shared_pool
    from permsparse.optimizer.solve import solve_all

    def problems(n, k, cols):
        rng = np.random.default_rng(7)
        return [PermutationProblem(f"u{i}", (np.abs(rng.standard_normal((k, cols))).astype(np.float32),), block=64)
                for i in range(n)]

    if __name__ == "__main__":
        mode, n, k, cols, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        store = CheckpointStore(sys.argv[6]) if len(sys.argv) > 6 else None
        if workers > 1:
            print(json.dumps({"pids": shared_pool(workers).pids()}), flush=True)
        res = solve_all(problems(n, k, cols), "lsa", workers=workers, progress=False, checkpoint=store)
        print(json.dumps({"perms": [r.perm.tolist() for r in res], "reused": sum(r.reused for r in res)}), flush=True)
""")


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "solve_script.py"
    path.write_text(SCRIPT)
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # an orphan zombie nobody reaps is dead too


def _wait_dead(pids: list[int], timeout: float) -> float:
    t0 = time.monotonic()
    while any(_alive(p) for p in pids):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"workers still alive after {timeout} s: {[p for p in pids if _alive(p)]}")
        time.sleep(0.1)
    return time.monotonic() - t0


def _start(tmp_path: Path, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(_script(tmp_path)), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    """In the child before exec: SIGINT/SIGTERM with their default action, as from a shell (an ignored SIGINT would be
    inherited across exec, and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_workers_die_with_sigkilled_parent(tmp_path):
    proc = _start(tmp_path, "x", 40, 512, 1024, 2)
    try:
        pids = json.loads(proc.stdout.readline())["pids"]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(1.0)  # solving
        proc.kill()
        proc.wait(10)
        assert _wait_dead(pids, timeout=5.0) < 5.0
    finally:
        proc.kill()


def test_sigint_stops_a_pool_solve_within_seconds(tmp_path):
    proc = _start(tmp_path, "x", 40, 512, 1024, 2)
    try:
        pids = json.loads(proc.stdout.readline())["pids"]
        time.sleep(1.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        stopped = time.monotonic() - t0
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()
        assert stopped < 6.0
        _wait_dead(pids, timeout=3.0)
    finally:
        proc.kill()


def test_resume_after_sigkill_reuses_finished_units(tmp_path):
    n, k, cols = 6, 512, 512  # each problem is 1 MB: the pool gets memory-mapped files
    store_dir = tmp_path / "work"
    store = CheckpointStore(store_dir)
    proc = _start(tmp_path, "x", n, k, cols, 2, store_dir)
    try:
        json.loads(proc.stdout.readline())  # pool up
        deadline = time.monotonic() + 240
        while len(store) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    finished = len(store)
    assert 2 <= finished < n
    killed_tmp = list(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}{proc.pid}-*"))
    rerun = subprocess.run([sys.executable, str(_script(tmp_path)), *map(str, ("x", n, k, cols, 2, store_dir))],
                           check=False, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    out = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert out["reused"] >= finished and len(store) == n
    # the same permutations as an uninterrupted run without checkpoints, solved here in-process
    rng = np.random.default_rng(7)
    probs = [PermutationProblem(f"u{i}", (np.abs(rng.standard_normal((k, cols))).astype(np.float32),), block=64)
             for i in range(n)]
    ref = solve_all(probs, "lsa", workers=1, progress=False)
    assert [np.asarray(p).tolist() for p in out["perms"]] == [r.perm.tolist() for r in ref]
    assert not any(d.exists() for d in killed_tmp)  # the killed run's temp folder was swept


# ------------------------------------------------------------------------------------------------ Ray


def test_ray_local_instance_matches_pool_bit_for_bit():
    pytest.importorskip("ray")
    from permsparse.optimizer.executors import RayExecutor

    probs = problems(2) + [big_problem(2)]
    ref = solve_all(probs, "learned", workers=2, learned_config=FAST_LEARNED, progress=False)
    ex = RayExecutor("local", num_cpus=2)
    try:
        assert ex.max_workers == 2
        got = solve_all(probs, "learned", executor=ex, learned_config=FAST_LEARNED, progress=False)
    finally:
        ex.shutdown()
    assert same(ref, got)


# ------------------------------------------------------------------------------------------- the optimize verb


def test_optimize_work_dir_resumes_with_the_same_output(exported, tmp_path: Path) -> None:
    """``--work-dir`` keeps every solved unit; a second run reuses them all and writes the same bytes."""
    from conftest import sha256

    from permsparse.cli import main

    src = exported("llama", "legacy")
    work = tmp_path / "work"
    argv = ["--method", "lsa", "--reconstruct", "none", "-q", "--workers", "1", "--work-dir", str(work)]
    assert main(["optimize", str(src), "-o", str(tmp_path / "a.onnx"), *argv]) == 0
    kept = sorted(work.glob("units/*/*.npy"))
    assert len(kept) == 8  # llama tiny: 8 units (q/k/v, o, gate/up, down per layer)
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    assert main(["optimize", str(src), "-o", str(tmp_path / "b.onnx"), *argv]) == 0
    assert {p: p.stat().st_mtime_ns for p in sorted(work.glob("units/*/*.npy"))} == stamps  # reused, not rewritten
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")
    plain = tmp_path / "c.onnx"
    assert main(["optimize", str(src), "-o", str(plain), "--method", "lsa", "--reconstruct", "none", "-q",
                 "--workers", "1"]) == 0
    assert sha256(plain) == sha256(tmp_path / "a.onnx")  # the checkpoint changes nothing in the result


def test_optimize_bad_cluster_is_a_usage_error(exported, tmp_path: Path, capsys) -> None:
    from permsparse.cli import main

    code = main(["optimize", str(exported("llama", "legacy")), "-o", str(tmp_path / "o.onnx"), "--cluster", "mars"])
    assert code == 2 and "--cluster" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()
