"""Scaling of ``denuc predict`` over a cohort: one process against several, on one machine.

The cohort is ``--copies`` hard-linked copies of the bundled sample image
(``src/denuc/assets/sample/brca-m2c-sample.png``, 0.5 µm/px) named ``sample-000.png`` ... For
each process count P of ``--procs`` the whole cohort is predicted into a fresh output folder:

* ``--launch shard`` (default): P independent ``python -m denuc predict ... --shard I/P``
  processes, I = 0 .. P-1 (what a SLURM array or a shell loop does);
* ``--launch torchrun``: one ``python -m torch.distributed.run --nproc-per-node P -m denuc
  predict ...`` (the processes share the work through claims in the output folder).

Every process gets ``--threads`` torch/OpenMP threads (default: the machine's cores divided by
the largest P, so the largest run does not oversubscribe the CPU); on CUDA, process I is given
GPU ``I mod --gpus``. Wall time runs from the first start to the last exit and includes each
process's start-up (imports, model loading), as a user sees it. Reported per P: seconds,
images/s, speed-up over the smallest P and efficiency = speed-up / (P / smallest P). The outputs
of every run are compared byte for byte with the first run's (``identical_outputs``), and
``summary.csv`` too when the pipeline writes per-input summaries.

    python benchmarks/cohort_scaling.py [--copies 16] [--procs 1 2] [--launch shard|torchrun]
        [--device cpu] [--threads N] [--gpus 1] [--report]

Prints a table and writes ``benchmarks/results/cohort_scaling[_torchrun][_cuda].json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import run_info, write_result

from denuc.core.files import atomic_copy

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "denuc" / "assets" / "sample" / "brca-m2c-sample.png"
SAMPLE_MPP = 0.5


def make_cohort(folder: Path, copies: int) -> list[Path]:
    """``copies`` hard links (copies where the file system refuses) of the sample image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(copies):
        dst = folder / f"sample-{i:03d}.png"
        atomic_copy(SAMPLE, dst, link=True)
        out.append(dst)
    return out


def child_env(threads: int, gpu: int | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def predict_args(inputs: Path, out: Path, device: str) -> list[str]:
    return [str(inputs), "--out", str(out), "--mpp", str(SAMPLE_MPP), "--device", device]


def run_sharded(procs: int, inputs: Path, out: Path, device: str, threads: int, gpus: int) -> dict[str, Any]:
    """``procs`` independent ``denuc predict --shard I/procs`` processes, started together."""
    t0 = time.perf_counter()
    running = []
    for i in range(procs):
        cmd = [sys.executable, "-m", "denuc", "predict", *predict_args(inputs, out, device)]
        if procs > 1:
            cmd += ["--shard", f"{i}/{procs}"]
        gpu = i % gpus if device.startswith("cuda") else None
        running.append((subprocess.Popen(cmd, env=child_env(threads, gpu), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True), time.perf_counter()))
    per_proc, failed = [], []
    for i, (p, started) in enumerate(running):
        log, _ = p.communicate()
        per_proc.append(round(time.perf_counter() - started, 3))
        if p.returncode != 0:
            failed.append({"process": i, "returncode": p.returncode, "log_tail": log[-2000:]})
    return {"seconds": time.perf_counter() - t0, "process_seconds": per_proc, "failed": failed}


def run_torchrun(procs: int, inputs: Path, out: Path, device: str, threads: int, gpus: int) -> dict[str, Any]:
    """One ``torchrun --nproc-per-node procs -m denuc predict`` (GPU = local rank, set by predict)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone",
           "-m", "denuc", "predict", *predict_args(inputs, out, device)]
    env = child_env(threads, None)
    if device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = [] if p.returncode == 0 else [{"process": "torchrun", "returncode": p.returncode,
                                            "log_tail": p.stdout[-2000:]}]
    return {"seconds": time.perf_counter() - t0, "failed": failed}


LAUNCHERS = {"shard": run_sharded, "torchrun": run_torchrun}


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of every result file in ``out`` (not hidden files, not timing-dependent logs and
    per-input summaries, whose timings differ from run to run: their results are compared
    through ``summary.csv``)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".log", ".jsonl", ".summary.json"))
            and p.name != "summary.csv"}


def summary_bytes(out: Path) -> bytes | None:
    """``summary.csv`` of ``out`` (written now with :func:`write_summary_table` when the run left
    per-input summaries but no table); ``None`` without summaries."""
    from denuc.cohort.summary import SUMMARY_SUFFIX, write_summary_table

    if not list(out.glob(f"*{SUMMARY_SUFFIX}")):
        return None
    table = out / "summary.csv"
    if not table.is_file():
        write_summary_table(out)
    return table.read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=16, help="images in the cohort (copies of the sample)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--launch", choices=tuple(LAUNCHERS), default="shard")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="threads per process (0: cores / max(--procs))")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to spread the processes over (cuda)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted)")
    ap.add_argument("--report", action="store_true", help="also copy the result to benchmarks/reported/")
    args = ap.parse_args()
    procs = sorted(set(args.procs))
    if args.copies < 1 or procs[0] < 1:
        ap.error("--copies and --procs must be >= 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // procs[-1])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="denuc-cohort-"))
    try:
        inputs = work / "inputs"
        make_cohort(inputs, args.copies)
        runs: list[dict[str, Any]] = []
        reference: dict[str, str] | None = None
        ref_summary: bytes | None = None
        for p in procs:
            out = work / f"out-{p}"
            shutil.rmtree(out, ignore_errors=True)
            r = LAUNCHERS[args.launch](p, inputs, out, args.device, threads, args.gpus)
            digests = output_digests(out) if out.is_dir() else {}
            summary = summary_bytes(out) if out.is_dir() else None
            if reference is None:
                reference, ref_summary = digests, summary
            n_csv = sum(1 for name in digests if name.endswith(".csv") and name != "summary.csv")
            runs.append({"processes": p, "seconds": round(r["seconds"], 3),
                         "images_per_s": round(args.copies / r["seconds"], 3),
                         **({"process_seconds": r["process_seconds"]} if "process_seconds" in r else {}),
                         "outputs": n_csv, "complete": n_csv == args.copies and not r["failed"],
                         "identical_outputs": digests == reference,
                         "identical_summary": None if summary is None else summary == ref_summary,
                         "failed": r["failed"]})
            print(f"{p} process(es): {r['seconds']:.1f} s, {args.copies / r['seconds']:.2f} images/s, "
                  f"{n_csv}/{args.copies} outputs" + (f", {len(r['failed'])} failed" if r["failed"] else ""))
        base = runs[0]
        for r in runs:
            speedup = base["seconds"] / r["seconds"]
            r["speedup"] = round(speedup, 3)
            r["efficiency"] = round(speedup / (r["processes"] / base["processes"]), 3)
        print(f"{'procs':>5} {'seconds':>8} {'img/s':>7} {'speed-up':>8} {'efficiency':>10} identical")
        for r in runs:
            print(f"{r['processes']:>5} {r['seconds']:>8.1f} {r['images_per_s']:>7.2f} {r['speedup']:>8.2f} "
                  f"{r['efficiency']:>10.2f} {r['identical_outputs']}")
        name = "cohort_scaling" + ("_torchrun" if args.launch == "torchrun" else "") + (
            "_cuda" if args.device.startswith("cuda") else "")
        write_result(name, {**run_info("cohort_scaling.py"), "copies": args.copies, "launch": args.launch,
                            "device": args.device, "threads_per_process": threads, "cpu_count": os.cpu_count(),
                            "runs": runs}, args.report)
        return 0 if all(r["complete"] and r["identical_outputs"] for r in runs) else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
