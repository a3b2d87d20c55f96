#!/usr/bin/env python3
"""cuSPARSELt below torch: do 2:4 GEMMs run on this GPU, how fast, and what exactly fails.

    python bench/gpu/cusparselt_check.py [--md OUT.md] [--json OUT.json] [--iters 50] [--shapes 8192x2048x2048 ...]

Calls the installed ``libcusparseLt.so`` through ctypes (no compiler, no extra package), for fp16 and bf16 with fp32
compute, on aligned shapes ``MxKxN`` (D[M,N] = A[M,K] @ B[K,N], A structured 2:4 along K, everything row-major):
handle init → descriptors → matmul descriptor → algorithm selection → plan init → prune (STRIP) + prune check →
compressed size → compress once → workspace → ``cusparseLtMatmulSearch`` → timed ``cusparseLtMatmul`` (CUDA events),
checked against cuBLAS (``torch.matmul``) on the pruned A, beside torch's own 2:4 paths on the same shapes
(``to_sparse_semi_structured`` and ``torch._cslt_compress`` + ``torch._cslt_sparse_mm``). Each dtype runs in a child
process that writes one JSON line per step as it goes, so a crash (an illegal instruction kills the CUDA context) is
recorded with the last step reached and the signal. Exits 0 with "no CUDA" on a machine without a GPU.

Enum values are those of cuSPARSELt ≥ 0.5 (``cusparseComputeType``: 32I = 0, 16F = 1, 32F = 2; the 0.2–0.4 headers
numbered them differently, so the library version is printed first).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F = 2, 14, 0
OP_N = 0
SPARSITY_50 = 0
COMPUTE_32F = 2
ALG_DEFAULT = 0
PRUNE_STRIP = 1
ALG_CONFIG_ID = 0  # cusparseLtMatmulAlgAttribute_t CUSPARSELT_MATMUL_ALG_CONFIG_ID
OPAQUE_BYTES = 4096  # the opaque structs are 1024 bytes in current headers (512 in old ones); over-allocate
DEFAULT_SHAPES = ("8192x2048x2048", "3072x768x12608", "2048x2048x2048", "8192x8192x8192")
ORDER_COL, ORDER_ROW = 1, 2  # cusparseOrder_t in cusparse.h


def find_library() -> list[str]:
    """Candidate libcusparseLt files: the one torch has loaded (if any), pip's nvidia packages, the loader path."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            found += sorted({line.split()[-1] for line in f if "libcusparseLt" in line})
    except OSError:
        pass
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "**", "libcusparseLt.so*"), recursive=True))
    found += sorted(glob.glob("/usr/local/cuda*/lib64/libcusparseLt.so*")) + sorted(glob.glob("/usr/lib/*/libcusparseLt.so*"))
    return list(dict.fromkeys(found))


class Opaque(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * (OPAQUE_BYTES // 8))]


def _err(lib: ctypes.CDLL, status: int) -> str:
    for fn in ("cusparseLtGetErrorName", "cusparseLtGetErrorString"):
        f = getattr(lib, fn, None)
        if f is not None:
            f.restype = ctypes.c_char_p
            try:
                return f"{status} ({f(status).decode()})"
            except Exception:
                pass
    names = {0: "SUCCESS", 1: "NOT_INITIALIZED", 2: "ALLOC_FAILED", 3: "INVALID_VALUE", 4: "ARCH_MISMATCH",
             6: "EXECUTION_FAILED", 7: "INTERNAL_ERROR", 8: "MATRIX_TYPE_NOT_SUPPORTED", 10: "NOT_SUPPORTED",
             11: "INSUFFICIENT_RESOURCES"}
    return f"{status} (CUSPARSE_STATUS_{names.get(status, '?')})"


def child(dtype: str, shapes: list[str], iters: int, lib_path: str) -> None:
    """Run every step for one dtype, printing one JSON line per step (flushed)."""
    import torch

    def emit(**rec: object) -> None:
        print(json.dumps(rec), flush=True)

    torch.zeros(1, device="cuda")  # the CUDA context and torch's CUDA libraries first, then cuSPARSELt
    lib = ctypes.CDLL(lib_path)
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cdt = {"fp16": CUDA_R_16F, "bf16": CUDA_R_16BF}[dtype]
    handle = Opaque()
    st = lib.cusparseLtInit(ctypes.byref(handle))
    emit(step="init", status=_err(lib, st))
    if st:
        return
    ver = ctypes.c_int(0)
    if hasattr(lib, "cusparseLtGetVersion"):
        lib.cusparseLtGetVersion(ctypes.byref(handle), ctypes.byref(ver))
    emit(step="version", version=ver.value)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for text in shapes:
        m, k, n = (int(v) for v in text.lower().split("x"))
        rec: dict[str, object] = {"shape": text, "dtype": dtype}

        def call(step: str, fn: str, *args: object) -> bool:
            status = getattr(lib, fn)(*args)
            rec[step] = _err(lib, status)
            emit(step=step, shape=text, status=rec[step])
            return status == 0

        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(m, k, device="cuda", dtype=tdt, generator=g)
        b = torch.randn(k, n, device="cuda", dtype=tdt, generator=g)
        c = torch.zeros(m, n, device="cuda", dtype=tdt)
        d = torch.zeros(m, n, device="cuda", dtype=tdt)
        ma, mb, mc, mm, sel, plan = Opaque(), Opaque(), Opaque(), Opaque(), Opaque(), Opaque()
        H = ctypes.byref(handle)
        ok = (call("descA", "cusparseLtStructuredDescriptorInit", H, ctypes.byref(ma), ctypes.c_int64(m), ctypes.c_int64(k),
                   ctypes.c_int64(k), ctypes.c_uint32(16), cdt, ORDER_ROW, SPARSITY_50)
              and call("descB", "cusparseLtDenseDescriptorInit", H, ctypes.byref(mb), ctypes.c_int64(k), ctypes.c_int64(n),
                       ctypes.c_int64(n), ctypes.c_uint32(16), cdt, ORDER_ROW)
              and call("descC", "cusparseLtDenseDescriptorInit", H, ctypes.byref(mc), ctypes.c_int64(m), ctypes.c_int64(n),
                       ctypes.c_int64(n), ctypes.c_uint32(16), cdt, ORDER_ROW)
              and call("matmul_desc", "cusparseLtMatmulDescriptorInit", H, ctypes.byref(mm), OP_N, OP_N, ctypes.byref(ma),
                       ctypes.byref(mb), ctypes.byref(mc), ctypes.byref(mc), COMPUTE_32F)
              and call("alg_selection", "cusparseLtMatmulAlgSelectionInit", H, ctypes.byref(sel), ctypes.byref(mm), ALG_DEFAULT)
              and call("plan_init", "cusparseLtMatmulPlanInit", H, ctypes.byref(plan), ctypes.byref(mm), ctypes.byref(sel)))
        if ok:
            pruned = torch.empty_like(a)
            valid = torch.ones(1, device="cuda", dtype=torch.int32)
            ok = (call("prune", "cusparseLtSpMMAPrune", H, ctypes.byref(mm), ctypes.c_void_p(a.data_ptr()),
                       ctypes.c_void_p(pruned.data_ptr()), PRUNE_STRIP, stream)
                  and call("prune_check", "cusparseLtSpMMAPruneCheck", H, ctypes.byref(mm), ctypes.c_void_p(pruned.data_ptr()),
                           ctypes.c_void_p(valid.data_ptr()), stream))
            torch.cuda.synchronize()
            rec["prune_check_valid"] = int(valid.item()) == 0  # 0 means the matrix is correctly pruned
        if ok:
            size, bufsize, ws = ctypes.c_size_t(0), ctypes.c_size_t(0), ctypes.c_size_t(0)
            ok = call("compressed_size", "cusparseLtSpMMACompressedSize", H, ctypes.byref(plan), ctypes.byref(size),
                      ctypes.byref(bufsize))
        if ok:
            comp = torch.empty(max(1, size.value), dtype=torch.uint8, device="cuda")
            cbuf = torch.empty(max(1, bufsize.value), dtype=torch.uint8, device="cuda")
            ok = (call("compress", "cusparseLtSpMMACompress", H, ctypes.byref(plan), ctypes.c_void_p(pruned.data_ptr()),
                       ctypes.c_void_p(comp.data_ptr()), ctypes.c_void_p(cbuf.data_ptr()), stream)
                  and call("workspace", "cusparseLtMatmulGetWorkspace", H, ctypes.byref(plan), ctypes.byref(ws)))
        if ok:
            work = torch.empty(max(1, ws.value), dtype=torch.uint8, device="cuda")
            alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
            streams = (ctypes.c_void_p * 1)(stream)
            args = (H, ctypes.byref(plan), ctypes.byref(alpha), ctypes.c_void_p(comp.data_ptr()),
                    ctypes.c_void_p(b.data_ptr()), ctypes.byref(beta), ctypes.c_void_p(c.data_ptr()),
                    ctypes.c_void_p(d.data_ptr()), ctypes.c_void_p(work.data_ptr()), streams, ctypes.c_int32(1))
            ok = call("search", "cusparseLtMatmulSearch", *args)
            if ok:
                alg = ctypes.c_int(-1)
                lib.cusparseLtMatmulAlgGetAttribute(H, ctypes.byref(sel), ALG_CONFIG_ID, ctypes.byref(alg),
                                                    ctypes.c_size_t(ctypes.sizeof(alg)))
                rec["alg_id"] = alg.value
                ok = call("matmul", "cusparseLtMatmul", *args)
                torch.cuda.synchronize()
            if ok:
                ref = (pruned.float() @ b.float())
                rec["rel_err"] = float((d.float() - ref).norm() / ref.norm().clamp_min(1e-12))
                rec["sparse_ms"] = _time(lambda: lib.cusparseLtMatmul(*args), iters)
                rec["dense_ms"] = _time(lambda: torch.matmul(pruned, b), iters)
                rec["speedup"] = rec["dense_ms"] / rec["sparse_ms"] if rec["sparse_ms"] else None
                rec["tflops_sparse_dense_equiv"] = 2 * m * n * k / rec["sparse_ms"] / 1e9
        for desc in (ma, mb, mc):
            lib.cusparseLtMatDescriptorDestroy(ctypes.byref(desc))
        if "plan_init" in rec and str(rec["plan_init"]).startswith("0 "):
            lib.cusparseLtMatmulPlanDestroy(ctypes.byref(plan))
        if "prune" not in rec or not str(rec["prune"]).startswith("0 "):  # torch's paths still run, on a host mask
            g4 = a.reshape(m, k // 4, 4)
            keep = torch.zeros_like(g4, dtype=torch.bool).scatter_(-1, g4.abs().topk(2, dim=-1).indices, True)
            pruned = (g4 * keep).reshape(m, k)
        rec.update(_torch_paths(pruned, b, iters))
        emit(step="result", **rec)
    lib.cusparseLtDestroy(ctypes.byref(handle))


def _time(fn, iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def _torch_paths(a_pruned, b, iters: int) -> dict[str, object]:
    """torch's 2:4 paths on the same operands: ``to_sparse_semi_structured`` and ``_cslt_sparse_mm``."""
    import torch

    out: dict[str, object] = {}
    ref = a_pruned.float() @ b.float()
    for name in ("torch_semi", "torch_cslt"):
        try:
            if name == "torch_semi":
                from torch.sparse import to_sparse_semi_structured

                sa = to_sparse_semi_structured(a_pruned)
                fn = lambda: torch.mm(sa, b)
            else:
                ca = torch._cslt_compress(a_pruned)
                fn = lambda: torch._cslt_sparse_mm(ca, b)
            y = fn()
            torch.cuda.synchronize()
            out[f"{name}_rel_err"] = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
            out[f"{name}_ms"] = _time(fn, iters)
        except Exception as exc:
            out[f"{name}_error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="MxKxN")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--md", type=Path, default=None, help="append the Markdown section to this file")
    ap.add_argument("--json", type=Path, default=None, help="write every step's record (JSON lines) here")
    ap.add_argument("--lib", default=None, help="path of libcusparseLt.so (default: found automatically)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per dtype (default 240)")
    args = ap.parse_args(argv)
    for s in args.shapes:
        parts = s.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) % 16 == 0 for p in parts):
            ap.error(f"shape '{s}': MxKxN with every dimension a multiple of 16")
    if args.child:
        child(args.child, args.shapes, args.iters, args.lib)
        return 0
    lines = ["## cuSPARSELt below torch (ctypes)", ""]
    try:
        import torch

        has_cuda = torch.cuda.is_available()
        if has_cuda:
            torch.cuda.init()
    except Exception as exc:
        has_cuda, torch = False, None
        lines.append(f"torch not importable: {exc}")
    libs = find_library()
    lines.append(f"- libcusparseLt candidates: {', '.join(libs) if libs else 'none found'}")
    if not has_cuda:
        lines.append("- no CUDA: torch.cuda.is_available() is False, nothing run (this is the CPU rehearsal)")
        _write(lines, args.md)
        return 0
    if not libs:
        lines.append("- no libcusparseLt found: install nvidia-cusparselt (pip) or give --lib")
        _write(lines, args.md)
        return 0
    lib = args.lib or libs[0]
    lines.append(f"- using {lib}; GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    records: list[dict] = []
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--child", dtype, "--lib", lib, "--iters", str(args.iters), "--shapes", *args.shapes]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out, rc, err = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            out, rc, err = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout", ""
        steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for s in steps:
            s.setdefault("dtype", dtype)
        records += steps
        version = next((s.get("version") for s in steps if s.get("step") == "version"), None)
        lines.append(f"- {dtype}: child exit {rc} after {time.perf_counter() - t0:.1f} s, cuSPARSELt version {version}"
                     + (f"; last step {steps[-1].get('step')} {steps[-1].get('shape', '')}" if steps else "; no step ran")
                     + (f"; stderr: {err.strip().splitlines()[-1][:200]}" if rc not in (0,) and err.strip() else ""))
        for s in steps:
            if s.get("step") not in ("result", "version") and not str(s.get("status", "0 ")).startswith("0 "):
                lines.append(f"  - {dtype} {s.get('shape', '')}: {s['step']} failed with status {s['status']}")
    lines += ["", "| dtype | MxKxN | prune ok | alg | cuSPARSELt ms | cuBLAS dense ms | speed-up | rel.err | "
              "torch semi ms | torch cslt ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r.get("step") == "result"):
        lines.append("| " + " | ".join(_cells(r)) + " |")
    errors = [(r["dtype"], r["shape"], k, v) for r in records if r.get("step") == "result"
              for k, v in r.items() if k.endswith("_error")]
    lines += [""] + [f"- {d} {s} {k[:-6]}: {v}" for d, s, k, v in errors]
    _write(lines, args.md)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return 0


def _cells(r: dict) -> list[str]:
    def ms(key: str) -> str:
        v = r.get(key)
        return f"{v:.4f}" if isinstance(v, float) else ("fails" if r.get(key[:-3] + "_error") else "—")

    sp, err = r.get("speedup"), r.get("rel_err")
    return [str(r["dtype"]), str(r["shape"]), str(r.get("prune_check_valid", "—")), str(r.get("alg_id", "—")),
            ms("sparse_ms"), ms("dense_ms"), f"{sp:.2f}×" if isinstance(sp, float) else "—",
            f"{err:.1e}" if isinstance(err, float) else "—", ms("torch_semi_ms"), ms("torch_cslt_ms")]


def _write(lines: list[str], md: Path | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if md:
        with md.open("a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
