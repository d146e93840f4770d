"""Ray: the run as a Ray Train job (`ray.train.torch.TorchTrainer`) on an existing cluster or a local one.

Every Ray worker enters the same worker entry point (`lf_dist.worker.run`) with the parent's plan; Ray Train
sets up the process group (RANK / WORLD_SIZE / LOCAL_RANK, gloo or NCCL), so the strategies run unchanged.
Checkpoints are lf-dist's own checkpoint-N/ folders, reported to Ray Train without a copy; with
`ray_max_failures` Ray replaces failed workers and the run resumes from the last complete checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import uuid
from pathlib import Path

from lf_dist.env_contract import RESTART_ENV
from lf_dist.errors import EXIT_PREEMPTED, RunStopped, UserError
from lf_dist.launchers.lock import beside
from lf_dist.log import get_logger
from lf_dist.signals import STOP_FILE, on_signals

logger = get_logger(__name__)
MARKER = "ray-attempt-{}"  # beside output_dir: a run's workers that find it were restarted by Ray
PREEMPTED_FILE = ".lf-dist-preempted.json"  # in output_dir: rank 0's message when it stopped on a request


def _init(cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(cfg.launch.ray_init_kwargs or {})
    # An existing cluster through RAY_ADDRESS (ray job submit sets it) or ray_init_kwargs.address, else a local one.
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise UserError(f"ray: cannot connect to the cluster ({str(err).splitlines()[0][:200]})") from None


def check_cluster(plan, cfg) -> None:
    """Ask only for what the cluster has: refuse in one line instead of waiting forever for resources."""
    import ray

    layout, workers = plan.layout, plan.layout["workers"]
    have = ray.cluster_resources()
    need = {k: v * workers for k, v in layout["resources_per_worker"].items()}
    short = {k: v for k, v in need.items() if have.get(k, 0) < v}
    if short:
        offered = ", ".join(f"{k} {have.get(k, 0):g}" for k in need)
        raise UserError(
            f"ray: {workers} workers × {layout['resources_per_worker']} need "
            f"{', '.join(f'{k} {v:g}' for k, v in need.items())}; the cluster has {offered}"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if layout["placement_strategy"] == "STRICT_SPREAD" and len(nodes) < workers:
        raise UserError(
            f"placement_strategy STRICT_SPREAD: {workers} workers need {workers} nodes, the cluster has {len(nodes)}"
        )
    if len(nodes) > 1 and not cfg.launch.ray_storage_path:
        raise UserError(
            f"ray_storage_path: a cluster of {len(nodes)} nodes needs checkpoints on storage every node reaches; "
            "set ray_storage_path (and output_dir) to a shared file system"
        )


def launch_ray(config_path: str, overrides: list[str], cfg, plan) -> int:
    """Run training on Ray Train; returns the exit code (user errors in a worker come back as one line)."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    launch_args = cfg.launch
    _init(cfg)
    check_cluster(plan, cfg)
    if launch_args.master_addr or launch_args.master_port:
        logger.info("notice: master_addr / master_port have no effect on Ray Train (it sets up the rendezvous)")
    resources = plan.layout["resources_per_worker"]
    storage = str(Path(launch_args.ray_storage_path).resolve()) if launch_args.ray_storage_path else None
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": str(Path(config_path).resolve()),
            "overrides": list(overrides),
            "plan": plan.to_dict(),
            "cwd": os.getcwd(),
            "attempt_marker": MARKER.format(uuid.uuid4().hex[:12]),
        },
        scaling_config=ScalingConfig(
            num_workers=launch_args.ray_num_workers,
            use_gpu=bool(resources.get("GPU")),
            resources_per_worker=resources,
            placement_strategy=launch_args.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if resources.get("GPU") else "gloo", timeout_s=cfg.train.ddp_timeout),
        run_config=RunConfig(
            name=launch_args.ray_run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=launch_args.ray_max_failures),
        ),
    )
    logger.info(
        f"ray: {launch_args.ray_num_workers} worker(s) × {resources} on {ray.cluster_resources().get('CPU', 0):g} CPUs"
    )
    stop, preempted = Path(cfg.train.output_dir) / STOP_FILE, Path(cfg.train.output_dir) / PREEMPTED_FILE
    stop.unlink(missing_ok=True)  # a request of an earlier run is not this one's
    preempted.unlink(missing_ok=True)
    try:
        with _stop_on_signal(stop):
            trainer.fit()
    except ray.train.TrainingFailedError as err:
        message = _user_error(err)
        if message:
            ray.shutdown()  # flushes the workers' forwarded logs, so the one line comes last
            raise UserError(message) from None
        raise
    finally:
        stop.unlink(missing_ok=True)
    if preempted.is_file():
        message = json.loads(preempted.read_text(encoding="utf-8"))["message"]
        preempted.unlink()
        ray.shutdown()
        raise RunStopped(message, EXIT_PREEMPTED, label="preempted")
    return 0


def _stop_on_signal(stop: Path):
    """SIGTERM / SIGINT to the driver: the workers (other processes, maybe other machines) are asked to stop
    through a file in output_dir; they finish the step, write a preemption checkpoint and end the run."""

    def request(signum, frame):
        if not stop.exists():
            logger.info(f"{signal.Signals(signum).name}: asking the Ray workers to checkpoint and stop")
            stop.parent.mkdir(parents=True, exist_ok=True)
            stop.touch()

    return on_signals(request)


def _user_error(err: BaseException) -> str | None:
    """The one-line message of a UserError raised in a worker, wherever Ray wrapped it."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return str(e)
        text = str(e)
        if "lf_dist.errors.UserError: " in text:  # a worker's traceback as text
            return text.split("lf_dist.errors.UserError: ", 1)[1].strip().splitlines()[0]
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
        todo += [v for v in vars(e).values() if isinstance(v, BaseException)] if hasattr(e, "__dict__") else []
    return None


def _report(metrics: dict, checkpoint: Path | None, in_storage: bool = True) -> None:
    """Every checkpoint (and the final results) reported to Ray Train; the folder is already where it stays.
    Ray tracks only checkpoints inside its storage path (`ray_storage_path`); others stay lf-dist's own (a
    restart finds them in output_dir) and only the metrics are reported."""
    import ray.train

    values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rank0 = ray.train.get_context().get_world_rank() == 0
    tracked = checkpoint is not None and rank0 and in_storage
    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if tracked else None
    ray.train.report(values, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def _worker(config: dict) -> None:
    """What each Ray Train worker runs: the parent's config and plan, through the same worker entry point."""
    import ray.train
    import torch.distributed

    from lf_dist.planner import Plan
    from lf_dist.run_checks import load_config
    from lf_dist.worker import run

    if Path(config["cwd"]).is_dir():  # relative paths in the YAML mean what they meant for the driver
        os.chdir(config["cwd"])
    cfg = load_config(config["config"], config["overrides"])
    marker = beside(cfg.train.output_dir, config["attempt_marker"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    restarted = [ray.train.get_checkpoint() is not None or marker.exists()]  # Ray restarted this run
    torch.distributed.broadcast_object_list(restarted, src=0)  # rank 0 decides, for every rank alike
    if restarted[0]:
        os.environ[RESTART_ENV] = "1"
    elif rank0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    try:
        plan = Plan(**config["plan"])
        run(cfg, plan, report=functools.partial(_report, in_storage=plan.checkpoint_dir is not None))
    except RunStopped as err:
        if err.exit_code != EXIT_PREEMPTED:
            raise UserError(str(err)) from None
        if rank0:  # a preempted run ends as a finished Ray run (no retry); the driver exits EXIT_PREEMPTED
            record = json.dumps({"message": str(err)})
            (Path(cfg.train.output_dir) / PREEMPTED_FILE).write_text(record, encoding="utf-8")
            marker.unlink(missing_ok=True)
        return
    except UserError as err:  # travels to the driver as itself; the traceback Ray logs is one frame long
        raise UserError(str(err)) from None
    if rank0:
        marker.unlink(missing_ok=True)
