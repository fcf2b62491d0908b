"""Resume: a night whose driver is killed at about half its rows, rerun with the same command, against a full run.

For N and 2N images of the demo world in a local folder, three ``clipn score`` processes of the same config
run one after the other on one Ray cluster started here (as a nightly scheduler would submit them):

* ``full``: a clean run, the baseline; its start-up, for the rule below, is everything but the scoring: the
  process wall time less its manifest's ``score_and_write`` (imports, model and class heads, Ray connect,
  listing plan, publish);
* ``killed``: the same command, SIGKILLed once the committed checkpoint names half the rows;
* ``resumed``: the same command again (``output.take_over_lease`` names the dead run, as an operator would),
  which keeps the staged rows and scores the rest.

Times are wall seconds of each process, start-up included. The resumed run must take at most 0.7x the full
run; the run is long enough when start-up is under a fifth of the full run (a shorter one fails the bench:
raise ``--n``). Both published nights are
compared row by row: uri, status, class and flags equal, scores equal up to float32 rounding (at most
``SCORE_ATOL`` apart: a resumed run batches the remaining images differently, and a batch of another size
may round the last bit of a float32 matmul differently; the largest difference is printed).

The lake is written in ``FOLDERS`` sub-folders, as a lake's date or shard prefixes are: a resumable run lists
in blocks of at most one listing page per folder, and each block is one write task, so a kill at 50% leaves
about half of the blocks committed.

Usage: python benchmarks/bench_resume.py [--n 30000] [--kill-at 0.5] [--architecture clipn-cheap224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from jobs.demo.world import World  # noqa: E402
from jobs.score import resume  # noqa: E402

DAY = "2026-11-24"
EXACT = ["uri", "status", "predicted_class", "ood_ctw", "ood_atd", "is_ood"]
SCORES = ["score_ctw", "score_atd", "score_mcm"]
SCORE_ATOL = 1e-6
FOLDERS = 10


def config(lake: Path, out: Path, take_over: str | None = None, architecture: str = "clipn-cheap224") -> dict:
    output = {"uri": str(out), "run_date": DAY, "resume": True}
    if take_over:
        output["take_over_lease"] = take_over
    return {"input": {"kind": "prefix", "uri": str(lake)}, "output": output,
            "model": {"architecture": architecture, "seed": 3}, "classes": {"names": list(World().id_shapes)},
            "templates": "world", "negatives": {"enabled": False},
            # half a CPU for the scorer: on a 2-CPU machine a resumed run needs room for Ray's filter actor
            "runtime": {"batch_size": 32, "decode_batch_size": 32, "cpus_per_actor": 0.5}}


def submit(cfg: dict, work: Path, name: str, address: str) -> subprocess.Popen:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run_id": name}))
    return subprocess.Popen([sys.executable, "-m", "jobs", "score", "--config", str(path)], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, what: str) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter()


def committed_rows(out: Path) -> int:
    """Rows named by committed checkpoint files (what a rerun keeps), from their Parquet footers."""
    n = 0
    for p in out.glob(f"_staging/*/{resume.CHECKPOINT}/*.parquet"):
        if not p.name.endswith(".pending.parquet"):
            try:
                n += pq.ParquetFile(p).metadata.num_rows
            except OSError:  # renamed or being written this instant
                pass
    return n


def manifest(out: Path) -> dict:
    return json.loads((out / f"run_date={DAY}" / "_manifest.json").read_text())


def night(out: Path):
    return pq.read_table(out / f"run_date={DAY}").select(EXACT + SCORES).sort_by("uri")


def compare(a, b) -> tuple[bool, float]:
    """(same rows, largest score difference): EXACT columns equal, SCORES within SCORE_ATOL."""
    if a.num_rows != b.num_rows or not a.select(EXACT).equals(b.select(EXACT)):
        return False, float("nan")
    diff = max(float(np.max(np.abs(a[c].to_numpy(zero_copy_only=False) - b[c].to_numpy(zero_copy_only=False)),
                            initial=0.0)) for c in SCORES)
    return diff <= SCORE_ATOL, diff


def one_size(n: int, kill_at: float, work: Path, address: str, architecture: str) -> dict:
    lake = work / f"lake-{n}"
    for i in range(FOLDERS):
        World(seed=11 + i).write_lake(str(lake / f"shard={i:02d}"), n // FOLDERS)
    full_out, out = work / f"full-{n}", work / f"resumed-{n}"

    t = time.perf_counter()
    full = finished(submit(config(lake, full_out, architecture=architecture), work, f"full{n}", address), "full run") - t

    t = time.perf_counter()
    proc = submit(config(lake, out, architecture=architecture), work, f"killed{n}", address)
    while committed_rows(out) < kill_at * n and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        raise SystemExit(f"the run to kill ended before {kill_at:.0%} of its rows were committed: "
                         f"{proc.communicate()[1][-3000:]}")
    proc.kill()
    proc.communicate()
    killed, staged = time.perf_counter() - t, committed_rows(out)

    t = time.perf_counter()
    resumed = finished(submit(config(lake, out, take_over=f"killed{n}", architecture=architecture), work, f"resumed{n}", address),
                       "resumed run") - t
    same, score_diff = compare(night(out), night(full_out))
    m_full, m_res = manifest(full_out), manifest(out)
    return {"n": n, "full": full, "setup": full - m_full["timings_s"]["score_and_write"], "killed": killed, "staged": staged,
            "resumed": resumed, "resumed_rows": m_res["resumed_rows"], "rows": m_res["rows"], "same": same,
            "score_diff": score_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30000)
    # the 224-pixel model: decode and resize to 224 dominate the per-image cost, as in a night of photos (on
    # clipn-tiny's 32 pixels a run of 48,000 images is still mostly fixed costs: process, actors, checkpoint load)
    ap.add_argument("--architecture", default="clipn-cheap224")
    ap.add_argument("--kill-at", type=float, default=0.5)
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        results = [one_size(n, args.kill_at, work, address, args.architecture) for n in (args.n, 2 * args.n)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, Ray {ray.__version__}; {args.architecture}, CPU, local folders; "
          f"driver killed at {args.kill_at:.0%} of the rows committed")
    head = ("images", "full run s (baseline)", "start-up s (all but scoring)", "start-up share", "killed after s", "rows staged",
            "resumed run s", "rows resumed", "resumed / full", "same rows", "max score diff")
    rows = [(r["n"], f"{r['full']:.1f}", f"{r['setup']:.1f}", f"{r['setup'] / r['full']:.2f}", f"{r['killed']:.1f}",
             r["staged"], f"{r['resumed']:.1f}", f"{r['resumed_rows']}/{r['rows']}", f"{r['resumed'] / r['full']:.2f}",
             "yes" if r["same"] else "NO", f"{r['score_diff']:.1e}") for r in results]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    for line in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    short = [r["n"] for r in results if r["setup"] >= 0.2 * r["full"]]
    bad = [r["n"] for r in results if not r["same"] or r["resumed"] > 0.7 * r["full"]]
    if short:
        raise SystemExit(f"start-up is not under a fifth of the full run for N = {short}: raise --n")
    if bad:
        raise SystemExit(f"resume did not hold (same rows, at most 0.7x a full run) for N = {bad}")


if __name__ == "__main__":
    main()
