"""Ray: the same YAML on a real local Ray cluster, through Ray Train — parity with torchrun, a killed worker
replaced and resumed to the uninterrupted weights, `ray job submit`, and one-line errors.

The module starts `ray start --head` on 127.0.0.1 with free ports and 2 CPUs, and stops it even when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import DATA_DIR, ROOT, TINY_MODEL
from .test_distributed import _config as _overwriting_config
from .test_distributed import _free_port, lf_dist_train, losses, weights

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node on loopback; clients use token authentication (Ray 2.60 turns it on for a new cluster) with
    the cluster's own token, so a clean machine (no ~/.ray/auth_token) runs it too."""
    port, dashboard = _free_port(), _free_port()
    token = secrets.token_hex(32)  # as `ray get-auth-token --generate` makes one
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true"]
    started = subprocess.run([*start, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)


def _config(tmp_path: Path, method: str) -> Path:
    """The torchrun tests' config as a user leaves it: no overwrite_output_dir, so every run here starts on a
    fresh output_dir (Ray's restart marker once made that output_dir non-empty before the workers checked it)."""
    path = _overwriting_config(tmp_path, method)
    text = path.read_text(encoding="utf-8").replace("overwrite_output_dir: true\n", "")
    path.write_text(text, encoding="utf-8")
    return path


def _on_ray(cluster, config, *overrides, check=True, timeout=400):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    return lf_dist_train(
        config, "launcher=ray", "ray_num_workers=2", *overrides, nproc=None, env=env, check=check, timeout=timeout
    )


@pytest.fixture(scope="module")
def ray_fsdp2(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    store = root / "store"
    _on_ray(
        cluster,
        _config(root, "full"),
        f"output_dir={root / 'out'}",
        "strategy=fsdp2",
        "max_steps=8",
        "save_steps=4",
        f"ray_storage_path={store}",
        "ray_run_name=parity",
    )
    return root


def test_two_ray_workers_under_ddp_give_the_losses_of_two_torchrun_ranks(cluster, tmp_path):
    """FSDP2 on 2 Ray workers against one process (sft LoRA and full, dpo, grpo's rollouts) is the parity table's
    `ray ×2` row (tests/test_parity_table.py); DDP here, against torchrun's 2 ranks."""
    torchrun, out = tmp_path / "torchrun", tmp_path / "ddp"
    lf_dist_train(_overwriting_config(tmp_path, "full"), f"output_dir={torchrun}", "strategy=ddp", "max_steps=8")
    _on_ray(cluster, _config(tmp_path, "full"), f"output_dir={out}", "strategy=ddp", "max_steps=8")
    assert losses(out) == pytest.approx(losses(torchrun), abs=1e-4)
    plan = json.loads((out / "run_plan.json").read_text(encoding="utf-8"))
    assert plan["launcher"] == "ray" and plan["layout"]["workers"] == 2


def test_checkpoints_are_ours_under_the_ray_storage_path_and_outputs_land_in_output_dir(ray_fsdp2):
    checkpoint = ray_fsdp2 / "store" / "parity" / "checkpoint-4"
    assert (checkpoint / "dcp").is_dir() and (checkpoint / "trainer_state.json").is_file()
    assert len(list((checkpoint / "dcp").glob("*.distcp"))) == 2  # one shard file per worker
    out = ray_fsdp2 / "out"
    for name in ("model.safetensors", "trainer_log.jsonl", "all_results.json", "run_plan.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("checkpoint-*")) and not list(out.parent.glob(".*.lf-dist.ray-attempt-*"))


def test_a_killed_worker_is_replaced_and_the_run_ends_with_the_uninterrupted_weights(cluster, ray_fsdp2, tmp_path):
    kill = {"LF_DIST_KILL_AT_STEP": "6", "LF_DIST_KILL_RANK": "1"}
    runtime_env = json.dumps({"runtime_env": {"env_vars": kill}})
    out = tmp_path / "out"
    proc = _on_ray(
        cluster,
        _config(tmp_path, "full"),
        f"output_dir={out}",
        "strategy=fsdp2",
        "max_steps=8",
        "save_steps=4",
        "ray_max_failures=1",
        f"ray_init_kwargs={runtime_env}",
        f"ray_storage_path={tmp_path / 'store'}",
        "ray_run_name=killed",
    )
    assert "restart after a failure: resuming from checkpoint-4" in proc.stdout + proc.stderr
    ref = weights(ray_fsdp2 / "out")
    ours = weights(out)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert losses(out) == losses(ray_fsdp2 / "out")


def test_sigterm_to_the_driver_checkpoints_the_workers_and_the_rerun_resumes_bitwise(cluster, tmp_path):
    from lf_dist.train import checkpoint as ckpt

    config, ref, out = _config(tmp_path, "lora"), tmp_path / "ref", tmp_path / "out"
    steps = ["strategy=ddp", "max_steps=30", "save_strategy=no"]
    _on_ray(cluster, config, f"output_dir={ref}", *steps)
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "OMP_NUM_THREADS": "1"}
    # the driver, as `lf-dist train`, with rank 0 told to SIGTERM it after step 5 and to give it 4 s (a real step's
    # time: these take milliseconds, less than the driver needs to run its handler while Ray waits)
    driver = (
        "import json, os, runpy, sys\n"
        "hook = {'LF_DIST_SIGNAL_AT_STEP': '5', 'LF_DIST_SIGNAL_RANK': '0', 'LF_DIST_SIGNAL_PID': str(os.getpid()),\n"
        "        'LF_DIST_SIGNAL_WAIT': '4'}\n"
        "sys.argv = ['lf_dist', *sys.argv[1:], 'ray_init_kwargs=' + json.dumps({'runtime_env': {'env_vars': hook}})]\n"
        "runpy.run_module('lf_dist', run_name='__main__')\n"
    )
    args = ["train", str(config), "launcher=ray", "ray_num_workers=2", f"output_dir={out}", *steps]
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("lf-dist: ")][-1].startswith(
        "lf-dist: preempted: stopped by a stop request after step"
    )
    (found,) = ckpt.list_checkpoints(out)
    assert found.name in ("checkpoint-5", "checkpoint-6")  # the step the request was seen after
    assert json.loads((found / "trainer_state.json").read_text(encoding="utf-8"))["reason"] == "preemption"
    _on_ray(cluster, config, f"output_dir={out}", *steps)  # the same command resumes
    ours, theirs = weights(out), weights(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_more_workers_than_the_cluster_has_fail_within_seconds_in_one_line(cluster, tmp_path):
    start = time.monotonic()
    proc = _on_ray(
        cluster, _config(tmp_path, "full"), f"output_dir={tmp_path / 'o'}", "ray_num_workers=3", check=False
    )
    assert proc.returncode == 2 and time.monotonic() - start < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lf-dist: error: ray: 3 workers × {'CPU': 1} need CPU 3; the cluster has CPU 2"), last
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_user_error_inside_the_workers_comes_back_as_one_line(cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"broken": {"file_name": "broken.json"}}', encoding="utf-8")
    (data / "broken.json").write_text('[{"instruction": "a" "output": 1}]', encoding="utf-8")
    proc = _on_ray(
        cluster,
        _config(tmp_path, "full"),
        f"output_dir={tmp_path / 'o'}",
        "dataset=broken",
        f"dataset_dir={data}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("lf-dist: error: dataset 'broken': "), proc.stderr[-2000:]


def _submit(cluster, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(workdir), "--"]
    cmd += [sys.executable, "-m", "lf_dist", "train", "job.yaml", *args]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=400, check=False)


def test_ray_job_submit_trains_and_its_exit_code_is_the_trainings(cluster, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    shutil.copy(_config(tmp_path, "lora"), workdir / "job.yaml")
    with (workdir / "job.yaml").open("a", encoding="utf-8") as f:
        f.write("launcher: ray\nray_num_workers: 2\nmax_steps: 3\n")
    out = tmp_path / "job_out"
    ok = _submit(cluster, workdir, f"output_dir={out}")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and len(losses(out)) == 3
    assert "[lf-dist] plan: lora · fsdp2 · ray ×2" in ok.stdout  # progress is in the job's logs
    bad = _submit(cluster, workdir, f"output_dir={tmp_path / 'bad'}", "lora_rnak=4")
    assert bad.returncode != 0
    assert "lf-dist: error: unknown key 'lora_rnak'; did you mean 'lora_rank'?" in bad.stdout
    query = (
        "import json; from ray.job_submission import JobSubmissionClient as C; "
        f"print(json.dumps([[j.entrypoint, j.driver_exit_code] for j in C({cluster['dashboard']!r}).list_jobs()]))"
    )  # in a process of its own: a client of this cluster needs RAY_AUTH_MODE=token before ray is imported
    jobs = subprocess.run(
        [sys.executable, "-c", query], env=cluster["env"], capture_output=True, text=True, check=True
    )
    codes = [
        code for entrypoint, code in json.loads(jobs.stdout.strip().splitlines()[-1]) if "lora_rnak" in entrypoint
    ]
    assert codes == [2]


def test_the_plan_names_ray_and_the_worker_layout(capsys):
    from lf_dist.cli import main

    args = ["launcher=ray", "ray_num_workers=4", 'resources_per_worker={"CPU": 2}', "placement_strategy=spread"]
    config = ROOT / "examples" / "tiny" / "sft_lora.yaml"
    assert (
        main(["plan", str(config), f"model_name_or_path={TINY_MODEL}", f"dataset_dir={DATA_DIR}", *args, "--json"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["launcher"] == "ray" and plan["world_size"] == 4 and plan["strategy"] == "fsdp2"
    assert plan["layout"] == {"workers": 4, "resources_per_worker": {"CPU": 2}, "placement_strategy": "SPREAD"}


def test_a_multi_node_cluster_without_ray_storage_path_is_refused_in_one_line(cluster, tmp_path):
    """Last in this module: it adds a second node (on the same machine) to the cluster."""
    join = [RAY, "start", "--address", cluster["address"], "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    subprocess.run([*join, "--disable-usage-stats"], env=cluster["env"], check=True, capture_output=True, timeout=180)
    proc = _on_ray(cluster, _config(tmp_path, "full"), f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "lf-dist: error: ray_storage_path: a cluster of 2 nodes needs checkpoints on storage every node reaches"
        )
    )
    assert not (tmp_path / "o").exists()
