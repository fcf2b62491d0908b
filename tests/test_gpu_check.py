"""benchmarks/gpu_check.sh --dry-run: the GPU check's whole code path on the CPU, where Ray cannot be imported (the
device machine has none) nor the other packages it lacks, so the script cannot rot between the rare runs on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed here, not on the device machine, nor in the wheels gpu_check.sh installs there
ABSENT_ON_DEVICE = ("ray", "s3fs", "moto", "boto3", "botocore", "wordfreq", "sklearn", "matplotlib", "polars",
                    "pyiceberg", "duckdb")


@pytest.mark.slow  # a subprocess job: spawns decode processes and runs pytest again
def test_gpu_check_dry_run_runs_without_ray_or_what_else_the_device_lacks(tmp_path):
    absent = tmp_path / "absent"
    for name in ABSENT_ON_DEVICE:  # a package of that name that fails to import shadows the installed one
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f'raise ImportError("no {name} on the GPU machine")\n')
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(absent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("bare image-tower forward", *(f"ScorerActor, {d} decode, {n} call(s) at once" for d in ("cpu", "device")
                                              for n in (1, 2)), "no-tower training step"):
        assert f"| {row}" in out.stdout, out.stdout
    assert "gpu-marked tests: tests/test_images.py" in out.stdout
    assert " skipped" in out.stdout or " passed" in out.stdout
