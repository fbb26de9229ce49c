"""Every GPU figure of hookmix in one run (``make bench-gpu``), prepared so that the first minutes of a lent GPU
answer all of them: each part runs in its own process under its own time cap (a part that fails or runs out of
time prints its error and the next one starts), and the whole run stays under ``--budget`` seconds (default 540).

* ``host-sync``     — ``benchmarks/host_sync.py``: ``fit`` on the GPU under ``torch.cuda.set_sync_debug_mode("warn")``,
  fits of 1x and 4x the steps, in memory and streamed: the host synchronisations per step (goal 0) and the call
  site of each one that grows with the steps;
* ``cache-stream``  — ``benchmarks/cache_stream.py``: a 6 GB synthetic cache written to a local disk (not tmpfs),
  one streamed epoch against a cold sequential read of it (goal <= 1.25), blocks of 2 and 4 shards, and the
  in-memory epoch (same loss?);
* ``head-only``     — ``benchmarks/gpu_head_only.py``: extraction vs inference throughput, head epochs per second,
  hooked loop / cache path;
* ``sweep``         — ``benchmarks/sweep.py --device cuda --epochs 5``: 24 heads trained together vs one by one
  (goal <= 0.1);
* ``step-overhead`` — ``benchmarks/step_overhead.py --device cuda``: hooked / plain ResNet50 train step (goal <= 1.02).

Prints every part's output as it comes, then a summary with the card's name, and writes it all to ``--json``.
On a machine without CUDA it says "no CUDA device: nothing measured" and exits 0; ``--smoke`` runs every part tiny
on the CPU instead (a check that the script works, no figure worth keeping).

    python benchmarks/bench_gpu.py [--json bench_gpu.json] [--dir DIR] [--budget 540] [--only PART ...] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = "RESULT "  # starts the line on which a part prints its figures as JSON (host_sync.py)
CACHE_GB = 7.0  # free space the 6 GB cache of cache-stream needs


@dataclass(frozen=True)
class Part:
    """One measure: the command (``gpu`` on a GPU, ``smoke`` on the CPU), its time cap, and the figures read off
    its output (name -> regular expression with one group; each figure is the list of every match)."""

    name: str
    cap_s: int
    gpu: tuple[str, ...]
    smoke: tuple[str, ...]
    figures: dict[str, str]


NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
PARTS = (
    Part("host-sync", 75, ("host_sync.py", "--rows", "4096"), ("host_sync.py", "--rows", "64", "--device", "cpu"), {}),
    Part(
        "cache-stream",
        200,
        ("cache_stream.py", "--rows", "30000", "--block-shards", "2", "4", "--device", "cuda", "--in-memory"),
        ("cache_stream.py", "--rows", "64", "--shard-size", "16", "--batch", "16", "--device", "cpu", "--in-memory"),
        {
            "epoch_over_read": rf"epoch time / plain read time: {NUMBER}",
            "read_s": rf"plain sequential read \(cold\): {NUMBER} s",
            "epoch_s": rf"streamed epoch on \S+ \(cold.*?\): {NUMBER} s",
            "epoch_peak_rss_gb": rf"peak RSS of the epoch: {NUMBER} GB",
            "epoch_peak_gpu_gb": rf"peak GPU memory of the epoch: {NUMBER} GB",
            "same_loss_in_memory": r"streamed loss == in-memory loss: (True|False)",
        },
    ),
    Part(
        "head-only",
        100,
        ("gpu_head_only.py",),
        (
            "gpu_head_only.py",
            "--device",
            "cpu",
            "--images",
            "8",
            "--epochs",
            "1",
            "--hooked-epochs",
            "1",
            "--batch",
            "8",
        ),
        {
            "b_over_a": rf"b / a = {NUMBER}",
            "c_over_b": rf"c / b = {NUMBER}",
            "extraction_over_inference": rf"extraction / plain inference throughput = {NUMBER}",
            "head_epochs_per_s": rf"head epochs per second = {NUMBER}",
        },
    ),
    Part(
        "sweep",
        90,
        ("sweep.py", "--device", "cuda", "--epochs", "5"),
        ("sweep.py", "--device", "cpu", "--n", "200", "--epochs", "1"),
        {
            "together_over_one_by_one": rf"ratio {NUMBER}",
            "largest_nll_difference": rf"over the cells: {NUMBER}",
        },
    ),
    Part(
        "step-overhead",
        75,
        ("step_overhead.py", "--device", "cuda", "--rounds", "30"),
        ("step_overhead.py", "--device", "cpu", "--batch", "2", "--size", "64", "--rounds", "1"),
        {
            "hooked_over_plain": rf"hooked / plain\s+= {NUMBER}",
            "hooked_over_timm_input": rf"hooked / timm-input = {NUMBER}",
            "graph_breaks": rf"explain, hook armed: {NUMBER} graph breaks",
        },
    ),
)


def file_system(directory: Path) -> str:
    """The type of the file system ``directory`` lies on (``/proc/mounts``: the longest mount point above it)."""
    real = str(directory.resolve()).rstrip("/") + "/"
    mounts = Path("/proc/mounts").read_text().splitlines() if Path("/proc/mounts").exists() else []
    above = [line.split()[1:3] for line in mounts if real.startswith(line.split()[1].rstrip("/") + "/")]
    return max(above, key=lambda mount: len(mount[0]))[1] if above else "unknown"


def local_disk(wanted: str | None) -> Path:
    """``wanted``, else the first of the temporary directory, /var/tmp and the repository's parent that is not in
    memory (tmpfs, ramfs) and has room for the cache: the streamed epoch must read a real disk."""
    if wanted:
        return Path(wanted)
    for candidate in (Path(tempfile.gettempdir()), Path("/var/tmp"), ROOT.parent):
        roomy = candidate.is_dir() and shutil.disk_usage(candidate).free > CACHE_GB * 1e9
        if roomy and file_system(candidate) not in ("tmpfs", "ramfs"):
            return candidate
    return Path(tempfile.gettempdir())


def run_part(part: Part, smoke: bool, cap_s: float, scratch: Path) -> dict[str, Any]:
    """Run one part in its own process group, echoing its output; kill the group at ``cap_s``."""
    script, *arguments = part.smoke if smoke else part.gpu
    if part.name == "cache-stream":
        arguments += ["--dir", str(scratch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, str(HERE / script), *arguments]
    print(f"\n=== {part.name} (cap {cap_s:.0f} s): {' '.join(command[1:])}", flush=True)
    start, lines = time.perf_counter(), []
    process = subprocess.Popen(
        command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def echo() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))
            print(f"  {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        process.wait(timeout=cap_s)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the part and every process it started
        process.wait()
        status = f"timed out after {cap_s:.0f} s"
    reader.join(timeout=5)
    text = "\n".join(lines)
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), **read_figures(part, text)}


def read_figures(part: Part, text: str) -> dict[str, Any]:
    """The part's figures (its ``RESULT`` line's, and each pattern's matches) and the last 25 lines it printed."""
    results = [line[len(RESULT) :] for line in text.splitlines() if line.startswith(RESULT)]
    figures: dict[str, Any] = json.loads(results[-1]) if results else {}
    for name, pattern in part.figures.items():
        found = re.findall(pattern, text)
        figures[name] = [v if v in ("True", "False") else float(v) for v in found]
    return {"figures": figures, "output_tail": text.splitlines()[-25:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_gpu.json", help="where the results are written")
    parser.add_argument("--dir", help="a directory on a local disk for the 6 GB cache (default: found)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run these parts only")
    parser.add_argument("--smoke", action="store_true", help="every part tiny on the CPU: checks the script")
    args = parser.parse_args()

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        Path(args.json).write_text(json.dumps({"device": None, "torch": torch.__version__, "parts": {}}))
        return
    card = "CPU (smoke run: not a GPU figure)" if args.smoke else torch.cuda.get_device_name(0)
    disk = local_disk(args.dir)
    report: dict[str, Any] = {
        "device": card,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "scratch_disk": f"{disk} ({file_system(disk)}, {shutil.disk_usage(disk).free / 1e9:.0f} GB free)",
        "parts": {},
    }
    print(f"{card}, torch {torch.__version__}; the cache of cache-stream goes to {report['scratch_disk']}")
    deadline = time.perf_counter() + args.budget
    for part in PARTS:
        if args.only and part.name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            report["parts"][part.name] = {"status": "skipped: the run's budget is spent", "figures": {}}
            continue
        scratch = Path(tempfile.mkdtemp(prefix="hookmix-bench-gpu-", dir=disk))
        try:
            report["parts"][part.name] = run_part(part, args.smoke, min(part.cap_s, left), scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        Path(args.json).write_text(json.dumps(report, indent=1))  # what is measured so far survives a kill
    summarize(report)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"written to {args.json}")


def summarize(report: dict[str, Any]) -> None:
    print(f"\n=== summary: {report['device']}, torch {report['torch']} (scratch disk {report['scratch_disk']})")
    for name, part in report["parts"].items():
        print(f"{name}: {part['status']} in {part.get('seconds', 0)} s")
        for key, value in part["figures"].items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
