#!/usr/bin/env python
"""`permsparse optimize` at LLM scale: wall time, peak memory of the whole process tree, 2:4 validity, fold check,
resume after SIGKILL, and Ray-vs-local-pool identity.

The model is a seeded LLaMA written tensor by tensor into ONNX external data
(:func:`permsparse.models.synthetic.write_llama`), cached in ``--workdir`` (reused when its recorded arguments match):

    --size 7b    LLaMA-2-7B shapes (32 layers, hidden 4096, MLP 11008, 32 heads), fp16: 13.5 GB of weights
    --size 1b    TinyLlama-1.1B shapes (22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads), fp32: 4.4 GB
    --size tiny  2 layers, hidden 64 (to try the bench itself in seconds)
    --layers N   keep the widths, use N layers (e.g. a 4-layer 7B-wide model)

Each variant runs as its own ``python -m permsparse.cli optimize ... --json`` process; a sampler adds up the
resident memory of that process and all its descendants (pool workers, Ray) from /proc every 0.2 s. Reported per
variant: wall time, peak tree RSS and its ratio to the weights' bytes, the fold check the optimizer ran (read from
its JSON), and 2:4 validity counted by an independent streaming checker here (numpy over the external data, no
permsparse code). Variants (``--variants``): ``identity+magnitude``, ``lsa+wanda``, ``lsa+magnitude``, ``default``.

``--resume``: run a variant with a checkpoint work dir to the end (A); run it again in a fresh work dir, SIGKILL the
whole process tree once half of A's units are stored (B), check that no worker survived, then rerun B: it must
reuse every stored unit and write an output byte-identical to A's; the seconds saved are reported.
``--ray-check``: the same variant with ``--workers 2`` on the local pool and on a 2-CPU local Ray instance; the outputs
(hence every permutation) must be byte-identical.

Both experiments use ``optimize --work-dir`` / ``--cluster`` when the CLI has them (it does since 0.2.0); with an
older CLI they run it in a small driver (``python bench/optimize_scale.py _driver ...``) that hands ``solve_all`` a
CheckpointStore / RayExecutor.

    python bench/optimize_scale.py --size 1b --variants identity+magnitude,lsa+wanda --workdir /tmp/perm1b
    python bench/optimize_scale.py --size 7b --variants identity+magnitude --workdir /tmp/perm7b --delete-model
    python bench/optimize_scale.py --size 1b --layers 4 --variants lsa+magnitude --resume --ray-check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SIZES = {
    "tiny": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256},
    "1b": {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000},
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000},
}
DEFAULT_DTYPE = {"tiny": "float32", "1b": "float32", "7b": "float16"}
VARIANTS = {
    "identity+magnitude": ["--method", "identity", "--importance", "magnitude", "--reconstruct", "none"],
    "lsa+wanda": ["--method", "lsa", "--importance", "wanda", "--reconstruct", "none"],
    "lsa+magnitude": ["--method", "lsa", "--importance", "magnitude", "--reconstruct", "none"],
    "default": [],
}
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------ processes


def _pss(pid: int) -> int:
    """Proportional set size (shared pages split between the processes mapping them), from smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peaks of the summed RSS and PSS of a process and all its descendants, sampled every ``interval`` seconds.

    RSS counts a page shared by several processes (memory-mapped weights, page cache of mmapped files) once per
    process; PSS splits it. Both include clean file-backed pages the kernel can drop under pressure.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.pids: set[int] = set()
        self._halt = threading.Event()

    def tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            total, pss, n = 0, 0, 0
            for p in self.tree():
                try:
                    total += p.memory_info().rss
                    pss += _pss(p.pid)
                    n += 1
                    self.pids.add(p.pid)
                except psutil.NoSuchProcess:
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, n
            self.peak_pss = max(self.peak_pss, pss)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def run_tree(cmd: list[str], *, kill_when=None, env: dict | None = None) -> dict:
    """Run ``cmd``; sample its tree's memory; SIGKILL the root when ``kill_when()`` turns true."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    killed = False
    while proc.poll() is None:
        if kill_when is not None and not killed and kill_when():
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    sampler.stop()
    for r in readers:
        r.join(5)
    res = {"rc": proc.returncode, "wall_s": wall, "peak_tree_rss": sampler.peak, "peak_tree_pss": sampler.peak_pss,
           "peak_procs": sampler.peak_procs,
           "stdout": "".join(out), "stderr": "".join(err), "killed": killed, "pids": sorted(sampler.pids)}
    if killed:
        res["orphans_after_5s"] = _survivors(sampler.pids - {proc.pid}, 5.0)
    return res


def _survivors(pids: set[int], wait_s: float) -> list[int]:
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ model


def model_path(workdir: Path, size: str, shapes: dict, dtype: str, seed: int) -> Path:
    return workdir / f"llama_{size}_L{shapes['layers']}_{dtype}_s{seed}.onnx"


def cached_config(path: Path) -> dict | None:
    import onnx

    from permsparse.models.synthetic import CONFIG_KEY

    data = path.with_name(path.name + ".data")
    if not path.is_file() or not data.is_file():
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None


def generate(path: Path, shapes: dict, dtype: str, seed: int) -> dict:
    from permsparse.models.synthetic import GENERATOR_VERSION

    want = {**shapes, "dtype": dtype, "seed": seed, "opset": 18, "generator": GENERATOR_VERSION}
    if cached_config(path) == want:
        return {"cached": True}
    code = (f"from permsparse.models.synthetic import write_llama; "
            f"write_llama({str(path)!r}, dtype={dtype!r}, seed={seed}, **{shapes!r})")
    res = run_tree([sys.executable, "-c", code])
    if res["rc"] != 0:
        raise SystemExit(f"model generation failed:\n{res['stderr'][-4000:]}")
    return {"cached": False, "generate_s": round(res["wall_s"], 1),
            "generate_peak_rss_gb": round(res["peak_tree_rss"] / 1e9, 3),
            "generate_peak_pss_gb": round(res["peak_tree_pss"] / 1e9, 3)}


def weight_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.is_file() else path.stat().st_size


def output_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ N:M checker


def _tensor(model_dir: Path, init, memo: dict) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.BFLOAT16: np.uint16, onnx.TensorProto.DOUBLE: np.float64}.get(init.data_type)
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    info = {kv.key: kv.value for kv in init.external_data}
    loc = model_dir / info["location"]
    if loc not in memo:
        memo[loc] = np.memmap(loc, dtype=np.uint8, mode="r")
    off, n = int(info.get("offset", 0)), int(info["length"])
    return memo[loc][off:off + n].view(dtype).reshape(tuple(init.dims))


def check_nm(path: Path, n: int = 2, m: int = 4) -> dict:
    """Independent N:M count: every 2-D initializer read as MatMul's B (or Gemm's B) with ≤ n non-zeros in each group
    of m consecutive elements along K (axis 0; axis 1 for Gemm transB=1), streamed from external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    memo: dict = {}
    checked, valid, dense = 0, 0, []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2:
            continue
        w = _tensor(path.parent, init, memo)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        if trans_b:
            w = w.T
        checked += 1
        ok = w.shape[0] % m == 0
        for r0 in range(0, w.shape[0], 1024) if ok else ():
            blk = np.asarray(w[r0:r0 + 1024]) != 0
            if (blk.reshape(-1, m, blk.shape[1]).sum(axis=1) > n).any():
                ok = False
                break
        valid += ok
        if not ok:
            dense.append(init.name)
    return {"matmul_weights": checked, "nm_valid": valid, "not_nm": dense[:5], "not_nm_count": len(dense)}


# ------------------------------------------------------------------------------------------------ optimize runs


def cli_supports(flag: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "permsparse.cli", "optimize", "--help"], check=False, capture_output=True,
                         text=True).stdout
    return flag in out


def optimize_cmd(model: Path, out: Path, variant: str, workers: int | None, *, work_dir: Path | None = None,
                 cluster: str | None = None, extra: list[str] = ()) -> list[str]:
    args = ["optimize", str(model), "-o", str(out), "--json", *VARIANTS[variant], *extra]
    if workers:
        args += ["--workers", str(workers)]
    native = (work_dir is None or cli_supports("--work-dir")) and (cluster is None or cli_supports("--cluster"))
    if native:
        if work_dir is not None:
            args += ["--work-dir", str(work_dir)]
        if cluster is not None:
            args += ["--cluster", cluster]
        return [sys.executable, "-m", "permsparse.cli", *args]
    return [sys.executable, str(HERE), "_driver", str(work_dir or ""), cluster or "", str(workers or ""), "--", *args]


def parse_json(res: dict) -> dict:
    for line in reversed(res["stdout"].strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {"ok": False, "error": res["stderr"][-2000:]}


def run_variant(model: Path, out: Path, variant: str, workers: int | None, extra: list[str], wbytes: int) -> dict:
    res = run_tree(optimize_cmd(model, out, variant, workers, extra=extra))
    info = parse_json(res)
    row = {"variant": variant, "rc": res["rc"], "wall_s": round(res["wall_s"], 1),
           "peak_tree_rss_gb": round(res["peak_tree_rss"] / 1e9, 2),
           "peak_over_weights": round(res["peak_tree_rss"] / wbytes, 2),
           "peak_tree_pss_gb": round(res["peak_tree_pss"] / 1e9, 2), "processes_at_peak": res["peak_procs"]}
    if not info.get("ok"):
        row["error"] = info.get("error") or info.get("message") or res["stderr"][-1000:]
        return row
    row.update({k: info.get(k) for k in ("weights_pruned", "nm_valid", "permutations", "gathers", "fold_check")})
    row["timings"] = {k: round(v, 1) for k, v in (info.get("timings") or {}).items()}
    row["independent_check"] = check_nm(out)
    return row


def units_in(work_dir: Path) -> int:
    return sum(1 for _ in (work_dir / "units").glob("*/*.json")) if work_dir.is_dir() else 0


def unit_seconds(work_dir: Path) -> float:
    total = 0.0
    for p in (work_dir / "units").glob("*/*.json"):
        try:
            total += float(json.loads(p.read_text())["result"]["seconds"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def resume_experiment(model: Path, root: Path, variant: str, workers: int | None, extra: list[str]) -> dict:
    for d in ("resume_a", "resume_b", "out_a", "out_b"):
        shutil.rmtree(root / d, ignore_errors=True)
    # the same file name in two folders: the .onnx names its .data file, so only then can the bytes be equal
    out_a, out_b = root / "out_a" / "model.sparse.onnx", root / "out_b" / "model.sparse.onnx"
    a = run_tree(optimize_cmd(model, out_a, variant, workers, work_dir=root / "resume_a", extra=extra))
    if a["rc"] != 0:
        return {"error": f"uninterrupted run failed: {parse_json(a).get('error', a['stderr'][-1000:])}"}
    total = units_in(root / "resume_a")
    half = max(1, total // 2)
    b = root / "resume_b"
    killed = run_tree(optimize_cmd(model, out_b, variant, workers, work_dir=b, extra=extra),
                      kill_when=lambda: units_in(b) >= half)
    stored = units_in(b)
    saved_solver_s = unit_seconds(b)
    again = run_tree(optimize_cmd(model, out_b, variant, workers, work_dir=b, extra=extra))
    info = parse_json(again)
    return {
        "variant": variant, "units": total, "killed_after_units": stored, "killed": killed["killed"],
        "killed_at_s": round(killed["wall_s"], 1), "orphans_5s_after_kill": killed.get("orphans_after_5s"),
        "uninterrupted_s": round(a["wall_s"], 1), "resumed_s": round(again["wall_s"], 1),
        "seconds_saved_wall": round(a["wall_s"] - again["wall_s"], 1),
        "solver_seconds_of_reused_units": round(saved_solver_s, 1), "rerun_ok": bool(info.get("ok")),
        "byte_identical": again["rc"] == 0 and output_sha256(out_a) == output_sha256(out_b),
        "units_after_rerun": units_in(b),
    }


def ray_check(model: Path, root: Path, variant: str, extra: list[str]) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"error": "ray is not installed: pip install 'permsparse[ray]'"}
    out_p, out_r = root / "out_pool" / "model.sparse.onnx", root / "out_ray" / "model.sparse.onnx"
    pool = run_tree(optimize_cmd(model, out_p, variant, 2, extra=extra))
    ray_run = run_tree(optimize_cmd(model, out_r, variant, 2, cluster="local", extra=extra))
    ok = pool["rc"] == 0 and ray_run["rc"] == 0
    return {"variant": variant, "pool_s": round(pool["wall_s"], 1), "ray_s": round(ray_run["wall_s"], 1),
            "ray_peak_tree_rss_gb": round(ray_run["peak_tree_rss"] / 1e9, 2),
            "byte_identical": ok and output_sha256(out_p) == output_sha256(out_r),
            "error": None if ok else (pool["stderr"] + ray_run["stderr"])[-2000:]}


# ------------------------------------------------------------------------------------------------ driver


def driver(argv: list[str]) -> int:
    """Run the permsparse CLI with solve_all given a CheckpointStore and/or an executor (until the CLI has them)."""
    sep = argv.index("--")
    work_dir, cluster, workers = (argv[:sep] + ["", "", ""])[:3]
    from permsparse.cli import main as cli_main
    from permsparse.optimizer import solve
    from permsparse.optimizer.checkpoint import CheckpointStore
    from permsparse.optimizer.executors import RayExecutor, make_executor

    store = CheckpointStore(work_dir) if work_dir else None
    if cluster == "local":
        executor = RayExecutor("local", num_cpus=int(workers) if workers else None)
    else:
        executor = make_executor(cluster or None, int(workers) if workers else None)
    original = solve.solve_all

    def solve_all(problems, method_name, **kw):
        if store is not None:
            kw.setdefault("checkpoint", store)
        if executor is not None:
            kw.setdefault("executor", executor)
        return original(problems, method_name, **kw)

    solve.solve_all = solve_all
    try:
        return cli_main(argv[sep + 1:])
    finally:
        if executor is not None:
            executor.shutdown()


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_driver":
        return driver(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/permsparse-scale"))
    ap.add_argument("--size", choices=tuple(SIZES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="identity+magnitude,lsa+wanda,default",
                    help=f"comma-separated, from: {', '.join(VARIANTS)} ('' for none)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="the SIGKILL/resume experiment")
    ap.add_argument("--ray-check", action="store_true", help="local pool vs 2-CPU local Ray, byte for byte")
    ap.add_argument("--experiment-variant", default="lsa+magnitude", choices=tuple(VARIANTS))
    ap.add_argument("--delete-model", action="store_true", help="remove the generated model at the end")
    ap.add_argument("--results", type=Path, default=None, help="append the JSON result to this file")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more optimize arguments")
    args = ap.parse_args()

    shapes = dict(SIZES[args.size])
    if args.layers:
        shapes["layers"] = args.layers
    dtype = args.dtype or DEFAULT_DTYPE[args.size]
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = model_path(args.workdir, args.size, shapes, dtype, args.seed)
    result: dict = {"size": args.size, "shapes": shapes, "dtype": dtype, "model": str(model)}
    result.update(generate(model, shapes, dtype, args.seed))
    wbytes = weight_bytes(model)
    result["weights_gb"] = round(wbytes / 1e9, 3)
    print(json.dumps({k: v for k, v in result.items()}), flush=True)
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        row = run_variant(model, args.workdir / f"{model.stem}.{variant}.sparse.onnx", variant, args.workers,
                          args.extra, wbytes)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result["variants"] = rows
    if args.resume:
        result["resume"] = resume_experiment(model, args.workdir, args.experiment_variant, args.workers, args.extra)
        print(json.dumps(result["resume"]), flush=True)
    if args.ray_check:
        result["ray_check"] = ray_check(model, args.workdir, args.experiment_variant, args.extra)
        print(json.dumps(result["ray_check"]), flush=True)
    if args.delete_model:
        for p in (model, model.with_name(model.name + ".data")):
            p.unlink(missing_ok=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
