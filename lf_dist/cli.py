"""`lf-dist` command line: train, plan, export, chat, api, webui, webchat, env (and version).

User mistakes end in one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lf_dist import __version__
from lf_dist.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lf-dist", description="Run LLaMA-Factory fine-tuning configs at any scale.")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a LLaMA-Factory YAML/JSON config")
    train.add_argument("config", help="path to a .yaml/.yml/.json config")
    train.add_argument("overrides", nargs="*", help="key=value overrides (YAML-typed), e.g. learning_rate=5e-4")
    plan = sub.add_parser("plan", help="print the plan for a config (launcher, strategy, method, memory) and why")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--profile", help="a named hardware profile or a profile YAML file (default: this machine)")
    plan.add_argument("--nnodes", type=int, help="nodes of the profile")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.add_argument(
        "--dry-run",
        action="store_true",
        help="build the planned model on the meta device, shard it at the planned world size under a fake process "
        "group and print what each rank holds next to the planner's terms (fsdp2 / HSDP)",
    )
    plan.add_argument(
        "--scaling",
        nargs="?",
        type=int,
        const=64,
        metavar="N",
        help="the estimated step, tokens/s per device and MFU on 1, 2, 4, ... N nodes of the profile (default 64), "
        "and the node count past which communication dominates",
    )
    for name, text in (
        ("export", "merge adapters / consolidate a checkpoint into a Hugging Face model (export_dir)"),
        ("chat", "chat with the model in the terminal (streamed; `clear`, `exit`)"),
        ("api", "serve the model, OpenAI-compatible (--host / API_HOST, --port / API_PORT, API_KEY)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="an inference / export YAML: model_name_or_path, adapter_name_or_path, ...")
        cmd.add_argument("overrides", nargs="*")
        if name == "api":
            cmd.add_argument("--host", help="address to listen on (default: API_HOST, else 127.0.0.1: this machine)")
            cmd.add_argument("--port", type=int, help="TCP port (default: API_PORT, else 8000)")
    webui = sub.add_parser("webui", help="the web UI: build a config, see its plan, launch, watch, stop, chat, export")
    webui.add_argument("--runs", default="saves", help="the folder whose runs the page lists (default: saves)")
    webchat = sub.add_parser("webchat", help="a chat page for the model of an inference YAML (as `lf-dist chat`)")
    webchat.add_argument("config", help="an inference YAML: model_name_or_path, adapter_name_or_path, template, ...")
    webchat.add_argument("overrides", nargs="*")
    for cmd in (webui, webchat):
        cmd.add_argument("--host", help="address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1)")
        cmd.add_argument("--port", type=int, help="TCP port (default: GRADIO_SERVER_PORT, else 7860)")
    env = sub.add_parser("env", help="print this machine's hardware profile and the backends that import")
    env.add_argument("--json", action="store_true")
    env.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine's matmul rate, elementwise bandwidth, per-operator cost and all-reduce bandwidth "
        "and write them as a profile (`lf-dist plan` on this machine then uses them)",
    )
    env.add_argument("--output", help="where --calibrate writes the profile (default: the user cache, see the README)")
    sub.add_parser("version", help="print the version")
    p.add_argument("--version", action="version", version=f"lf-dist {__version__}")
    return p


# LLaMA-Factory's commands that lf-dist does not have, and what it offers instead.
NOT_HERE = {
    "eval": "lf-dist has no benchmark evaluation (MMLU, C-Eval, CMMLU): `lf-dist train cfg.yaml do_train=false "
    "do_eval=true eval_dataset=NAME` reports the eval loss of a model on a dataset",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like argparse, but `key=value` overrides may come anywhere on the line (before or after options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in NOT_HERE:
        raise UserError(NOT_HERE[argv[0]])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _plan(args) -> int:
    from lf_dist.planner import detect, load_profile, make_plan
    from lf_dist.planner.report import report
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    cfg = load_config(args.config, args.overrides)
    hw = load_profile(args.profile, args.nnodes) if args.profile else detect()
    if not args.profile and args.nnodes:
        hw = hw.with_nodes(args.nnodes)
    stage = get_stage(cfg.finetuning.stage)
    plan = make_plan(cfg, hw, stage, launching=not args.profile)
    if args.dry_run:
        return _dry_run(cfg, hw, stage, plan, args.json)
    if args.scaling is not None:
        return _scaling(cfg, hw, stage, plan, args.scaling, args.json)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    print("\n".join(report(plan, hw)))
    return 0


def _scaling(cfg, hw, stage, plan, max_nodes: int, as_json: bool) -> int:
    """The plan's step on 1, 2, 4, ... `max_nodes` nodes (planner/scaling.py)."""
    from lf_dist.planner.scaling import scaling, table

    if max_nodes < 1:
        raise UserError(f"--scaling: the largest node count must be >= 1, got {max_nodes}")
    if not plan.step_time:
        raise UserError(f"--scaling: no time model for strategy {plan.strategy} yet; drop --scaling")
    rows, lines = scaling(cfg, hw, stage, plan, max_nodes)
    if as_json:
        scaled = [{"nodes": r.nodes, "world_size": r.world, **r.time.to_dict()} for r in rows]
        print(json.dumps({"plan": plan.to_dict(), "scaling": scaled, "verdict": lines}))
        return 0
    print(plan.summary())
    print(f"  {plan.timing()}")
    print("\n".join(["", *table(rows, "GPU" if plan.device == "cuda" else "proc"), "", *lines]))
    return 0


def _dry_run(cfg, hw, stage, plan, as_json: bool) -> int:
    """The plan, then what each rank holds once its model is sharded at the planned size (planner/dry_run.py)."""
    from lf_dist.planner.dry_run import dry_run

    result = dry_run(cfg, hw, stage, plan)
    if as_json:
        print(json.dumps({**result.to_dict(), "plan": plan.to_dict()}))
        return 0
    print(plan.summary())
    print("\n".join(result.lines()))
    return 0


def _software() -> dict[str, str]:
    """What `llamafactory-cli env` reports for a bug report: Python, the OS, torch (with its CUDA) and the
    Hugging Face libraries."""
    import importlib.metadata
    import platform

    import torch

    out = {"lf-dist": __version__, "Python": platform.python_version(), "OS": platform.platform()}
    if torch.version.cuda:
        seen = "a GPU is visible" if torch.cuda.is_available() else "no GPU visible"
        out["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda}; {seen})"
    else:
        out["torch"] = f"{torch.__version__} (CPU build)"
    for dist in ("transformers", "peft", "datasets", "accelerate", "trl"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _calibrate(args) -> int:
    from lf_dist.planner.calibrate import calibrate, write_profile
    from lf_dist.planner.profiles import calibrated_path

    hw = calibrate(report=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    path = write_profile(hw, Path(args.output) if args.output else calibrated_path())
    if args.json:
        print(json.dumps({"profile": hw.to_dict(), "path": str(path)}))
    else:
        print(
            f"profile written: {path} (`lf-dist plan cfg.yaml` on this machine uses it; elsewhere: --profile {path})"
        )
    return 0


def _env(args) -> int:
    from lf_dist.planner import PROFILES, backends, detect

    if args.calibrate:
        return _calibrate(args)
    hw = detect()
    info = {
        "software": _software(),
        "profile": hw.to_dict(),
        "nnodes": os.environ.get("NNODES", "1"),
        "node_rank": os.environ.get("NODE_RANK", "0"),
        "backends": backends(),
        "named_profiles": sorted(PROFILES),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    for name, version in info["software"].items():
        print(f"{name}: {version}")
    gpus = f"{hw.gpus_per_node} × {hw.gpu} ({hw.gpu_memory_gib:.2f} GiB, bf16 {'yes' if hw.bf16 else 'no'})"
    print(f"GPUs: {gpus if hw.on_gpu else 'none'}")
    print(f"CPU cores: {hw.cpu_cores}; RAM: {hw.ram_gib:.1f} GiB")
    print(f"NNODES: {info['nnodes']}; NODE_RANK: {info['node_rank']}")
    for name, version in info["backends"].items():
        print(f"{name}: {version or 'not installed'}")
    print(f"named profiles (lf-dist plan --profile NAME): {', '.join(info['named_profiles'])}")
    return 0


def _serve(args) -> int:
    from lf_dist.log import get_logger
    from lf_dist.run_checks import load_config

    cfg = load_config(args.config, args.overrides, command=args.command)
    if _CONSOLE and not cfg.model.quantization_bit:
        sys.modules.setdefault("bitsandbytes", None)  # as for train: nothing of it runs
    if cfg.ignored:
        get_logger().info(
            f"notice: these keys have no effect on lf-dist {args.command}: " + ", ".join(sorted(cfg.ignored))
        )
    if args.command == "export":
        from lf_dist.serve.export import export

        export(cfg)
        return 0
    if args.command == "chat":
        from lf_dist.serve.chat import run_chat

        return run_chat(cfg)
    from lf_dist.serve.api import run_api

    return run_api(cfg, host=args.host, port=args.port)


def _web(args) -> int:
    from lf_dist.webui.server import run_webchat, run_webui

    if args.command == "webui":
        return run_webui(args.runs, host=args.host, port=args.port)
    from lf_dist.run_checks import load_config

    return run_webchat(load_config(args.config, args.overrides, command="chat"), host=args.host, port=args.port)


def _train(args) -> int:
    from lf_dist.launchers import launch
    from lf_dist.launchers.lock import output_dir_lock
    from lf_dist.log import get_logger
    from lf_dist.planner import detect, make_plan, require_fit
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    cfg = load_config(args.config, args.overrides)
    # galore-torch and apollo-torch import bitsandbytes' optimizers at import time
    uses_bnb = cfg.model.quantization_bit or "8bit" in cfg.train.optim or cfg.finetuning.use_galore
    if _CONSOLE and not (uses_bnb or cfg.finetuning.use_apollo):
        # Nothing of bitsandbytes runs: keep peft and transformers from importing it (and torch's compiler
        # with it), ~1.5 s of start-up. Only in the console process, which runs this one config.
        sys.modules.setdefault("bitsandbytes", None)
    if cfg.ignored:
        get_logger().info("notice: these keys have no effect in lf-dist: " + ", ".join(sorted(cfg.ignored)))
    plan = make_plan(cfg, detect(), get_stage(cfg.finetuning.stage))
    require_fit(plan)  # before anything is loaded or launched
    with output_dir_lock(cfg.train.output_dir):  # one run per output_dir
        return launch(args.config, args.overrides, cfg, plan)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.command == "version":
            print(f"lf-dist {__version__}")
            return 0
        if args.command in ("train", "plan", "export", "chat", "api", "webui", "webchat"):
            from lf_dist.log import quiet_libraries

            quiet_libraries()
        commands = {"train": _train, "plan": _plan, "env": _env, "export": _serve, "chat": _serve, "api": _serve}
        commands.update(webui=_web, webchat=_web)
        return commands[args.command](args)
    except UserError as err:
        print(f"lf-dist: {err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("lf-dist: interrupted", file=sys.stderr)
        return 130


_CONSOLE = False  # set by `entry`: this process runs one command and ends


def entry() -> None:
    """The `lf-dist` console script: one command, then the process ends without interpreter teardown."""
    from lf_dist import startup

    global _CONSOLE
    _CONSOLE = True
    startup.pause()  # until the libraries are imported (see lf_dist/startup.py)
    startup.end_process(main())


if __name__ == "__main__":
    entry()
