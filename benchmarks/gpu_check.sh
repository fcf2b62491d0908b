#!/usr/bin/env bash
# The GPU check, fitted to the device machine (Python 3.12, torch, torchvision, timm, pyarrow, Pillow, numpy; no Ray,
# no open_clip, no pydantic, no registry): installs the wheels `make gpu-wheels` put in dist/gpu_wheels (offline,
# into a temporary folder on PYTHONPATH), runs benchmarks/gpu_check.py, then the gpu-marked tests (the test files
# that carry `pytest.mark.gpu`; none of them may need Ray). Sized for about 2 minutes on an H100/H200 (not run yet).
#
#   benchmarks/gpu_check.sh              on the GPU machine, from the repository root (dist/gpu_wheels carried along)
#   benchmarks/gpu_check.sh --dry-run    here, on the CPU with clipn-tiny and no wheels installed (tests run it)
#   benchmarks/gpu_check.sh --requirements   the pinned packages `make gpu-wheels` downloads (versions of this venv)
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's venv when there is one (here), else the machine's python3 (the device machine)
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
WHEELS=${GPU_WHEELS:-dist/gpu_wheels}
# Installed from the wheels in every case: what the device machine lacks, and the small packages pydantic needs at
# versions it accepts (shadowing older ones there). Then those installed only where the machine lacks them
# (timm's own dependencies, so normally present): package:module.
ALWAYS="open_clip_torch:open_clip ftfy:ftfy wcwidth:wcwidth regex:regex pydantic:pydantic pydantic_core:pydantic_core
annotated_types:annotated_types typing_inspection:typing_inspection typing_extensions:typing_extensions
pytest:pytest pluggy:pluggy iniconfig:iniconfig"
IF_MISSING="packaging:packaging safetensors:safetensors PyYAML:yaml tqdm:tqdm fsspec:fsspec"

if [[ "${1:-}" == "--requirements" ]]; then
  for pair in $ALWAYS $IF_MISSING; do
    "$PY" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "${pair%%:*}"
  done
  exit 0
fi

DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
else
  [[ -d "$WHEELS" ]] || { echo "gpu_check: no $WHEELS (run 'make gpu-wheels' and carry it)" >&2; exit 2; }
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/clipn-gpu-site.XXXXXX")
  trap 'rm -rf "$SITE"' EXIT
  picked=()
  for pair in $ALWAYS $IF_MISSING; do
    pkg=${pair%%:*} mod=${pair##*:}
    if [[ " $IF_MISSING " == *" $pair "* ]] && "$PY" -c "import $mod" 2>/dev/null; then continue; fi
    whl=$(find "$WHEELS" -maxdepth 1 -iname "${pkg}-*.whl" | head -n 1)
    [[ -n "$whl" ]] || { echo "gpu_check: no wheel of $pkg in $WHEELS" >&2; exit 2; }
    picked+=("$whl")
  done
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${picked[@]}"
  else  # a wheel is a zip laid out for site-packages: unpacking it is installing it, for imports
    for whl in "${picked[@]}"; do "$PY" -m zipfile -e "$whl" "$SITE"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#picked[@]} wheels into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

"$PY" benchmarks/gpu_check.py ${DRY[@]+"${DRY[@]}"}  # (an empty array under set -u: bash < 4.4)
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
echo
echo "gpu-marked tests: ${gpu_tests[*]}"
"$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}"
