"""Resume: a night whose driver is killed at about half its rows, rerun with the same command, against a full run.

For N and 2N images of the demo world in a local folder, ``clipn score`` processes of the same config run one
after the other on one Ray cluster started here (as a nightly scheduler would submit them):

* a warm-up, untimed: a full run over a lake of ``WARMUP`` images, so that no timed run is the first on the
  fresh Ray (worker processes, imports and file caches are warm for all of them);
* ``full before``: a clean run; its start-up, for the rule below, is everything but the scoring: the process
  wall time less its manifest's ``score_and_write`` (imports, model and class heads, Ray connect, listing
  plan, publish);
* ``killed``: the same command, SIGKILLed once the committed checkpoint names half the rows;
* ``resumed``: the same command again (``output.take_over_lease`` names the dead run, as an operator would),
  which keeps the staged rows and scores the rest;
* ``full after``: a clean run again, after the kill/resume pair, so that neither side of the comparison has
  the machine's earlier or later state to itself.

The baseline is the mean of the two full runs' wall times (both are printed). Times are wall seconds of each
process, start-up included. The resumed run (the job's own driver-side loader) must take at most 0.7x the
baseline; the run is long enough when start-up is under a fifth of the baseline (a shorter one fails the
bench: raise ``--n``).

``--ab``: the killed run's output folder (staging, checkpoint, lease) is copied once the files stop changing,
and the SAME dead state is resumed twice: once by the job as it is (``jobs/score/checkpoint_ids.py`` loads the
committed ids on the driver) and once through ``benchmarks/ray_loader_cli.py``, which points the job at Ray's
own ``IdColumnCheckpointManager``. Which arm goes first alternates between N and 2N (the driver loader first
at N). Each arm's stderr is checked for its loader's log line and not the other's, so that an arm
cannot silently run the other loader.

Every resumed night is compared row by row with the first full night (and the two full nights with each
other): uri, status, class and flags equal, scores equal up to float32 rounding (at most ``SCORE_ATOL`` apart:
a resumed run batches the remaining images differently, and a batch of another size may round the last bit of
a float32 matmul differently; the largest difference is printed).

The lake is written in ``FOLDERS`` sub-folders, as a lake's date or shard prefixes are: a resumable run lists
in blocks of at most one listing page per folder, and each block is one write task, so a kill at 50% leaves
about half of the blocks committed.

Usage: python benchmarks/bench_resume.py [--n 30000] [--sizes n,2n] [--ab] [--kill-at 0.5]
       [--architecture clipn-cheap224]
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
WARMUP = 1000
# what each resumed arm runs: the CLI as shipped, or the bench's wrapper that swaps in Ray's loader
ARMS = {"driver": ["-m", "jobs"], "ray": [str(ROOT / "benchmarks" / "ray_loader_cli.py")]}
LOADER_NAMES = {"driver": "driver (jobs/score/checkpoint_ids.py)", "ray": "Ray's IdColumnCheckpointManager"}
# what each loader logs to the process's stderr: Ray's IdColumnCheckpointManager.load_checkpoint through the
# ray.data logger (console, INFO), the driver loader through clipn.score (the CLI logs clipn at INFO)
LOADER_LINES = {"ray": "Loading checkpoint from", "driver": "committed ids loaded from"}


def config(lake: Path, out: Path, take_over: str | None = None, architecture: str = "clipn-cheap224") -> dict:
    output = {"uri": str(out), "run_date": DAY, "resume": True}
    if take_over:
        output["take_over_lease"] = take_over
    return {"input": {"kind": "prefix", "uri": str(lake)}, "output": output,
            "model": {"architecture": architecture, "seed": 3}, "classes": {"names": list(World().id_shapes)},
            "templates": "world", "negatives": {"enabled": False},
            # half a CPU for the scorer: on a 2-CPU machine a resumed run needs room for Ray's filter actor
            "runtime": {"batch_size": 32, "decode_batch_size": 32, "cpus_per_actor": 0.5}}


def submit(cfg: dict, work: Path, name: str, address: str, arm: str = "driver") -> subprocess.Popen:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run_id": name}))
    return subprocess.Popen([sys.executable, *ARMS[arm], "score", "--config", str(path)], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, what: str) -> tuple[float, str]:
    """(time.perf_counter() when ``proc`` ended, its stderr); exits the bench if it failed."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter(), err


def timed_run(cfg: dict, work: Path, name: str, address: str, arm: str = "driver") -> tuple[float, str]:
    """(wall seconds of one ``clipn score`` process, its stderr)."""
    t = time.perf_counter()
    end, err = finished(submit(cfg, work, name, address, arm), name)
    return end - t, err


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


def files_settled(folder: Path, quiet_s: float = 1.0, timeout_s: float = 15.0) -> None:
    """Wait until no file under ``folder`` appears, goes or changes size for ``quiet_s`` (a killed driver's
    tasks are ended by Ray shortly after it, not at once), at most ``timeout_s``."""
    def state():
        return sorted((str(p), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    last, since, deadline = state(), time.perf_counter(), time.perf_counter() + timeout_s
    while time.perf_counter() - since < quiet_s and time.perf_counter() < deadline:
        time.sleep(0.2)
        now = state()
        if now != last:
            last, since = now, time.perf_counter()


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


def write_lake(lake: Path, n: int) -> None:
    for i in range(FOLDERS):
        World(seed=11 + i).write_lake(str(lake / f"shard={i:02d}"), n // FOLDERS)


def warm_up(work: Path, address: str, architecture: str) -> None:
    """An untimed full run over a small lake, same config: the fresh Ray's first run pays its cold costs."""
    lake = work / "lake-warmup"
    write_lake(lake, WARMUP)
    finished(submit(config(lake, work / "warmup-out", architecture=architecture), work, "warmup", address), "warm-up run")


def one_size(n: int, arms: list[str], kill_at: float, work: Path, address: str, architecture: str) -> dict:
    lake = work / f"lake-{n}"
    write_lake(lake, n)
    full_out, full_after_out, out = work / f"full-{n}", work / f"full-after-{n}", work / f"resumed-{n}"

    full_before, _ = timed_run(config(lake, full_out, architecture=architecture), work, f"full{n}", address)

    t = time.perf_counter()
    proc = submit(config(lake, out, architecture=architecture), work, f"killed{n}", address)
    while committed_rows(out) < kill_at * n and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        raise SystemExit(f"the run to kill ended before {kill_at:.0%} of its rows were committed: "
                         f"{proc.communicate()[1][-3000:]}")
    proc.kill()
    proc.communicate()
    killed = time.perf_counter() - t
    files_settled(out)
    staged = committed_rows(out)
    dead = work / f"dead-{n}"
    if len(arms) > 1:
        shutil.copytree(out, dead)

    reference = night(full_out)
    by_arm = {}
    for i, arm in enumerate(arms):
        if i:  # the next arm resumes the same dead state, at the same output URI (the staging key names it)
            shutil.move(out, work / f"resumed-{n}-{arms[i - 1]}")
            shutil.copytree(dead, out)
        cfg = config(lake, out, take_over=f"killed{n}", architecture=architecture)
        wall, err = timed_run(cfg, work, f"resumed{n}{arm}", address, arm)
        ran = [a for a, line in LOADER_LINES.items() if line in err]
        if ran != [arm]:
            raise SystemExit(f"the {arm} arm at N = {n} did not run only the loader it names: its stderr shows {ran}")
        same, diff = compare(night(out), reference)
        m = manifest(out)
        by_arm[arm] = {"resumed": wall, "resumed_rows": m["resumed_rows"], "rows": m["rows"], "same": same,
                       "score_diff": diff, "order": i + 1}

    full_after, _ = timed_run(config(lake, full_after_out, architecture=architecture), work, f"fullafter{n}", address)
    fulls_same, _ = compare(night(full_after_out), reference)
    setups = [wall - manifest(o)["timings_s"]["score_and_write"]
              for wall, o in ((full_before, full_out), (full_after, full_after_out))]
    for p in (lake, full_out, full_after_out, dead, *work.glob(f"resumed-{n}*")):
        shutil.rmtree(p, ignore_errors=True)  # 2N's lake and outputs next: keep the disk to one size's
    return {"n": n, "full_before": full_before, "full_after": full_after, "baseline": (full_before + full_after) / 2,
            "setup": sum(setups) / 2, "killed": killed, "staged": staged, "fulls_same": fulls_same, "arms": by_arm}


def table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    for line in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--sizes", default="n,2n",
                    help="which of N and 2N to run, comma-separated (n, 2n): 'n' when time is short")
    ap.add_argument("--ab", action="store_true",
                    help="resume the same dead state twice: the driver-side loader and Ray's own")
    # the 224-pixel model: decode and resize to 224 dominate the per-image cost, as in a night of photos (on
    # clipn-tiny's 32 pixels a run of 48,000 images is still mostly fixed costs: process, actors, checkpoint load)
    ap.add_argument("--architecture", default="clipn-cheap224")
    ap.add_argument("--kill-at", type=float, default=0.5)
    args = ap.parse_args()
    sizes = {"n": (0, args.n), "2n": (1, 2 * args.n)}
    try:
        chosen = [sizes[s.strip()] for s in args.sizes.split(",")]
    except KeyError as e:
        ap.error(f"--sizes: unknown size {e} (n, 2n)")

    def arms_for(index: int) -> list[str]:
        # alternate which arm resumes first between N and 2N, so neither always gets the later (warmer) slot
        return (["driver", "ray"] if index % 2 == 0 else ["ray", "driver"]) if args.ab else ["driver"]

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        warm_up(work, address, args.architecture)
        results = [one_size(n, arms_for(i), args.kill_at, work, address, args.architecture) for i, n in chosen]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, Ray {ray.__version__}; {args.architecture}, CPU, local folders; "
          f"driver killed at {args.kill_at:.0%} of the rows committed; an untimed warm-up run of {WARMUP} images "
          f"first; baseline = mean of the full runs before and after the kill/resume")
    table(("images", "full before s", "full after s", "baseline s (mean)", "start-up s (all but scoring)",
           "start-up share", "killed after s", "rows staged", "full nights same"),
          [(r["n"], f"{r['full_before']:.1f}", f"{r['full_after']:.1f}", f"{r['baseline']:.1f}", f"{r['setup']:.1f}",
            f"{r['setup'] / r['baseline']:.2f}", f"{r['killed']:.1f}", r["staged"], "yes" if r["fulls_same"] else "NO")
           for r in results])
    print()
    table(("images", "loader", "ran", "resumed run s", "rows resumed", "resumed / baseline", "/ full before",
           "/ full after", "same rows", "max score diff"),
          [(r["n"], LOADER_NAMES[arm], f"{a['order']} of {len(r['arms'])}", f"{a['resumed']:.1f}",
            f"{a['resumed_rows']}/{a['rows']}", f"{a['resumed'] / r['baseline']:.2f}",
            f"{a['resumed'] / r['full_before']:.2f}", f"{a['resumed'] / r['full_after']:.2f}",
            "yes" if a["same"] else "NO", f"{a['score_diff']:.1e}")
           for r in results for arm, a in sorted(r["arms"].items())])
    if args.ab:
        print()
        for r in results:
            d, g = r["arms"]["driver"]["resumed"], r["arms"]["ray"]["resumed"]
            print(f"N = {r['n']}: Ray's loader {g:.1f} s, driver loader {d:.1f} s: the driver loader saves "
                  f"{g - d:+.1f} s ({(g - d) / r['baseline']:+.1%} of the baseline)")
    short = [r["n"] for r in results if r["setup"] >= 0.2 * r["baseline"]]
    bad = [r["n"] for r in results
           if not r["fulls_same"] or any(not a["same"] for a in r["arms"].values())
           or r["arms"]["driver"]["resumed"] > 0.7 * r["baseline"]]
    if short:
        raise SystemExit(f"start-up is not under a fifth of the full run for N = {short}: raise --n")
    if bad:
        raise SystemExit(f"resume did not hold (same rows, at most 0.7x a full run) for N = {bad}")


if __name__ == "__main__":
    main()
