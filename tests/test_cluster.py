"""cluster/: manifests parse and agree with the code; a real `ray start --head` + `ray job submit` round trip."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import tomllib
import yaml

import clipn_core as cc
from jobs.cli import build_config, make_parser
from jobs.demo import free_port, world
from schemas.score_config import ScoreJobConfig
from schemas.train_config import TrainJobConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CONFIG_MODELS = {"score": ScoreJobConfig, "train": TrainJobConfig}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return doc


def _validate(command: str, config_path: Path, *extra: str):
    """The config model instance the real CLI builds for ``clipn <command> --config <path>``."""
    args = make_parser().parse_args([command, "--config", str(config_path), *extra])
    return build_config(CONFIG_MODELS[command], args)


def test_every_yaml_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        assert _docs(f), f"{f} holds no YAML document"


def _raycluster() -> dict:
    return _one(KUBERAY / "raycluster.yaml", "RayCluster")


def _config_files_on_head() -> dict[str, Path]:
    """/config/<name> inside the head pod -> the repository file the ConfigMap is generated from."""
    head = _raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "clipn-config"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "clipn-config"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    return {f"{mount['mountPath']}/{Path(f).name}": KUBERAY / f for f in generator["files"]}


@pytest.mark.parametrize("manifest", sorted(p.name for p in KUBERAY.glob("rayjob-*.yaml")))
def test_rayjob_entrypoint_names_a_real_command_and_its_config_validates(manifest):
    job = _one(KUBERAY / manifest, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs"]  # the one entrypoint: the clipn CLI
    command = argv[3]
    assert command in CONFIG_MODELS and command in make_parser()._subparsers._group_actions[0].choices
    assert argv[4] == "--config"
    config_file = _config_files_on_head()[argv[5]]
    assert config_file.exists(), f"{manifest}: {argv[5]} is not generated from an existing file"
    _validate(command, config_file)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _raycluster()["metadata"]["name"]


def _gpu_group() -> tuple[int, int, float]:
    (group,) = [g for g in _raycluster()["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return group["maxReplicas"], int(limits["nvidia.com/gpu"]), float(limits["cpu"])


def test_job_configs_fit_the_gpu_worker_group():
    """Resource counts live in raycluster.yaml; the job configs must fit them."""
    pods, gpus_per_pod, cpus_per_pod = _gpu_group()
    score = _validate("score", KUBERAY / "config" / "score.yaml")
    per_pod = int(gpus_per_pod // score.runtime.gpus_per_actor)
    assert score.runtime.pool_size <= pods * per_pod
    assert score.runtime.cpus_per_actor * per_pod <= cpus_per_pod
    train = _validate("train", KUBERAY / "config" / "train.yaml")
    assert train.run.use_gpu and train.run.num_workers <= pods * gpus_per_pod
    assert train.run.cpus_per_worker * gpus_per_pod <= cpus_per_pod


def test_nightly_cronjob_creates_the_score_rayjob_from_the_same_manifest():
    cron = _one(KUBERAY / "cronjob-score.yaml", "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    manifest = Path(container["command"][3])
    (mount,) = container["volumeMounts"]
    assert manifest.parent == Path(mount["mountPath"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    assert generator["files"] == [manifest.name] and (KUBERAY / manifest.name).exists()
    assert _one(KUBERAY / manifest.name, "RayJob")["metadata"]["generateName"]
    role = _one(KUBERAY / "cronjob-score.yaml", "Role")
    assert {"create"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]


def test_credentials_come_from_a_secret_in_every_ray_pod():
    spec = _raycluster()["spec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    secret = _one(KUBERAY / "secret.example.yaml", "Secret")["metadata"]["name"]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert {"secretRef": {"name": secret}} in container["envFrom"]
        assert not [e for e in container.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
    assert set(_one(KUBERAY / "secret.example.yaml", "Secret")["stringData"].values()) == {"<access key>", "<secret key>"}


def test_image_ray_and_python_match_the_project():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [p for p in pins if p.startswith("ray[")]
    ray_version = ray_pin.split("==")[1].split()[0].strip('",')
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_version)}$", dockerfile, re.M)
    assert re.search(r"^ARG PYTHON_TAG=py3\d+$", dockerfile, re.M)
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}" in dockerfile
    assert _raycluster()["spec"]["rayVersion"] == ray_version
    for copied in ("clipn_core", "jobs", "schemas", "pyproject.toml"):
        assert copied in dockerfile


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)
    assert ".venv/" in data["excludes"] and not any("KEY" in k for k in data.get("env_vars", {}))


def test_local_stack_configs_validate_and_compose_wires_minio_to_ray():
    _validate("score", CLUSTER / "local" / "score.yaml")
    _validate("train", CLUSTER / "local" / "train.yaml", "--set", "storage.endpoint_url=http://127.0.0.1:9000")
    services = yaml.safe_load((CLUSTER / "local" / "docker-compose.yaml").read_text())["services"]
    assert {"minio", "buckets", "ray-head"} <= set(services)
    assert services["ray-head"]["build"]["dockerfile"] == "cluster/Dockerfile"
    assert "8265" in " ".join(services["ray-head"]["ports"])


@pytest.fixture()
def local_head(tmp_path):
    """A separate single-node Ray started by cluster/local/ray_head.sh on loopback; killed at the end."""
    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in ("gcs", "dash", "agent", "env", "metrics", "client")}
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY": str(bin_dir / "ray"),
           "RAY_PORT": str(ports["gcs"]), "RAY_DASHBOARD_PORT": str(ports["dash"]), "RAY_NUM_CPUS": "2",
           # Ray's token authentication, explicit for the head and the `ray job submit` client alike.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"rh{ports['gcs']}"  # short: Ray's socket paths have a length limit
    log = (tmp_path / "head.log").open("wb")
    proc = subprocess.Popen(
        [str(CLUSTER / "local" / "ray_head.sh"), "start", "--block", f"--temp-dir={temp_dir}",
         "--object-store-memory=200000000", f"--dashboard-agent-listen-port={ports['agent']}",
         f"--runtime-env-agent-port={ports['env']}", f"--metrics-export-port={ports['metrics']}",
         f"--ray-client-server-port={ports['client']}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{ports['dash']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # e.g. 401: Ray's token authentication is on; the server is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not start: {(tmp_path / 'head.log').read_text()[-2000:]}") from None
                time.sleep(1)
        yield address, env
    finally:
        if proc.poll() is None:
            try:  # SIGTERM to the session: each Ray process exits on its own instead of one after another
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the head's session
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.mark.slow
def test_ray_job_submit_runs_the_scoring_job_on_a_local_head(local_head, tmp_path):
    address, env = local_head
    lake = tmp_path / "lake"
    lake.mkdir()
    for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("star", "green")]):
        (lake / f"{i}_{shape}.jpg").write_bytes(world.encode(world.render(shape, colour, i, 32)))
    (lake / "broken.jpg").write_bytes(b"nope")
    model, spec = cc.build_clipn("clipn-tiny", num_prompts=4)
    cc.save_checkpoint(model, spec, str(tmp_path / "m.safetensors"))
    config = tmp_path / "score.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"uri": str(lake)}, "output": {"uri": str(tmp_path / "out"), "run_date": "2026-11-24"},
        "model": {"checkpoint": str(tmp_path / "m.safetensors")}, "classes": {"names": ["circle", "square"]},
        "runtime": {"batch_size": 4, "cpus_per_actor": 0.5, "decode_cpus": 0.25},
    }))
    done = subprocess.run(
        [env["RAY"], "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env", str(CLUSTER / "runtime_env.yaml"), "--",
         "python", "-m", "jobs", "score", "--config", str(config)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=420,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    partition = tmp_path / "out" / "run_date=2026-11-24"
    assert (partition / "_SUCCESS").exists()
    table = pads.dataset(partition, format="parquet").to_table()
    assert table.num_rows == 4
    assert sorted(table.column("status").to_pylist()) == ["not_an_image", "ok", "ok", "ok"]
