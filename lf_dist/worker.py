"""The worker entry point: every launcher ends here, on every rank.

Order matters for "fail early" and "nothing half-written": the model setup is checked on the meta device
before any data is preprocessed, and everything a user can get wrong (config, model, resume checkpoint,
data) is checked before the first byte goes to output_dir.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lf_dist import startup
from lf_dist.config import RunConfig
from lf_dist.env_contract import restart_count
from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.train import checkpoint as ckpt
from lf_dist.train.tracker import RESULTS_FILE, print_metrics, save_metrics

logger = get_logger(__name__)


def plan_output_dir(cfg: RunConfig, checkpoints: Path) -> tuple[Path | None, bool]:
    """Decide what happens to output_dir and the checkpoint folder (without touching them): returns the
    checkpoint to resume from, and whether the run starts over (the previous run's logs go at once, its
    checkpoints only once this run has written one of its own: work is never thrown away up front)."""
    training_args = cfg.train
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a directory")
    resume = training_args.resume_from_checkpoint
    if not training_args.do_train:
        return None, False
    if restart_count() > 0:  # the launcher restarted this run after a failure: never wipe what it saved
        found = ckpt.latest_intact(checkpoints, skip=ckpt.superseded(checkpoints))
        if found is not None:
            logger.info(f"restart after a failure: resuming from {found.name}")
            return found, False
        logger.info("restart after a failure before any checkpoint: starting over")
        return None, True
    if resume is None and training_args.overwrite_output_dir:
        found = ckpt.latest_intact(checkpoints)
        if found is not None and ckpt.is_preemption(found):  # a stopped run: the same command goes on with it
            logger.info(
                f"notice: resuming from {found.name}, written when the last run was stopped (overwrite_output_dir "
                "keeps it); to start over instead, set resume_from_checkpoint: false"
            )
            return found, False
    if resume in (None, False) and _has_outputs(out) and not training_args.overwrite_output_dir:
        if ckpt.list_checkpoints(checkpoints) and resume is None:
            resume = True
            logger.info(
                "output_dir has checkpoints: resuming from the latest (set overwrite_output_dir: true to start over)"
            )
        else:
            raise UserError(
                f"output_dir: {out} already exists and is not empty; set overwrite_output_dir: true "
                "or resume_from_checkpoint"
            )
    resume_from = ckpt.resolve_resume(resume, checkpoints)
    return resume_from, bool(training_args.overwrite_output_dir and resume_from is None)


def _has_outputs(out: Path) -> bool:
    """output_dir holds something besides lf-dist's own control files (a stop request, say)."""
    return out.is_dir() and any(not p.name.startswith(".lf-dist-") for p in out.iterdir())


def _start_over(out: Path, checkpoints: Path) -> None:
    """The previous run's logs go now; its checkpoints are marked superseded and go when this run writes its
    first checkpoint (until then a crash of this run leaves them where they were)."""
    ckpt.supersede(checkpoints)
    for name in ("trainer_log.jsonl", "all_results.json", "training_loss.png", "training_eval_loss.png"):
        (out / name).unlink(missing_ok=True)


def build_policy(cfg: RunConfig, stage, strategy, tokenizer):
    """The one place the trained model is built and wrapped: the strategy builds it (on the meta device on ranks
    that receive their shards), places and wraps it, with its optimizer; its blocks compiled when asked."""
    from lf_dist.model.recipe import ModelRecipe
    from lf_dist.parallel.base import compile_blocks
    from lf_dist.train.optim import build_optimizer

    recipe = ModelRecipe(
        cfg, tokenizer, stage.head, strategy.load_dtype(), strategy.device, quantize=strategy.quantizes_at_load
    )
    model, optimizer = strategy.setup(strategy.create_model(recipe.build), lambda m: build_optimizer(m, cfg))
    if cfg.train.torch_compile:
        compile_blocks(model)
    return model, optimizer


def build_frozen(cfg: RunConfig, stage, strategy, tokenizer) -> dict:
    """The frozen models the stage asks for, by role, as `Frozen` handles: the policy with its adapters
    disabled, or a model loaded and placed by the strategy like the policy."""
    from lf_dist.model.recipe import ModelRecipe
    from lf_dist.train.losses import Frozen

    frozen = {}
    for need in stage.frozen(cfg):
        if need.path is None:
            frozen[need.role] = Frozen(None, strategy.unwrap)
        elif need.build is not None:
            factory = functools.partial(need.build, cfg, tokenizer, strategy.frozen_dtype())
            factory.loads_whole = True  # merges adapters into its weights: not buildable already partitioned
            frozen[need.role] = Frozen(strategy.prepare_frozen(factory))
        else:
            recipe = ModelRecipe(
                cfg, tokenizer, need.head, strategy.frozen_dtype(), path=need.path, quantize=strategy.quantizes_at_load
            )
            frozen[need.role] = Frozen(strategy.prepare_frozen(recipe.build))
    return frozen


def run(cfg: RunConfig, plan=None, report=None) -> dict:
    """Train (or evaluate) as `plan` says; without one (a direct call), the plan is made here for this machine.
    `report(metrics, checkpoint_dir or None)`, a launcher's hook, hears of every checkpoint and the results."""
    from lf_dist.parallel import build_strategy
    from lf_dist.planner import detect, make_plan, require_fit
    from lf_dist.train.stages import get_stage

    stage = get_stage(cfg.finetuning.stage)
    if plan is None:
        plan = make_plan(cfg, detect(), stage)
        require_fit(plan)
    cfg = plan.resolve(cfg)
    strategy = build_strategy(cfg)
    if strategy.is_main:
        logger.info(plan.summary())
    try:
        # Everything that holds the process group (DDP's reducer, engines) lives in _train's frame only, so it
        # is released before teardown destroys the group: freed afterwards, gloo's destructor can wait forever
        # on its worker threads once a peer has left.
        return _train(cfg, plan, stage, strategy, report)
    finally:
        strategy.teardown()


def build_trainer(
    cfg: RunConfig, stage, strategy, tokenizer, datasets, checkpoints, planned_peak_gb=None, report=None
):
    """The Trainer of a run: the policy (seeded, built and wrapped), the stage's frozen models and loss."""
    from transformers import set_seed

    from lf_dist.train.loop import Trainer

    set_seed(cfg.train.seed)
    model, optimizer = build_policy(cfg, stage, strategy, tokenizer)
    loss = stage.build_loss(cfg, build_frozen(cfg, stage, strategy, tokenizer))
    return Trainer(
        cfg, strategy, stage, loss, model, optimizer, tokenizer, datasets, planned_peak_gb, checkpoints, report
    )


def _write_run_files(cfg: RunConfig, plan, out: Path, checkpoints: Path, clear: bool) -> None:
    """output_dir made (the previous run's logs gone when starting over); the resolved config and the plan in it."""
    from lf_dist.planner import PLAN_FILE

    out.mkdir(parents=True, exist_ok=True)
    if clear:
        _start_over(out, checkpoints)
    config_text = json.dumps(cfg.to_dict(), indent=2, default=str) + "\n"
    (out / "lf_dist_config.json").write_text(config_text, encoding="utf-8")
    plan.save(out / PLAN_FILE)


def _predictor(cfg: RunConfig, strategy, tokenizer, template):
    """do_predict's generator, its prompts encoded and scoring libraries checked now, before any training."""
    if not cfg.train.do_predict:
        return None
    from lf_dist.train.predict import Predictor

    return Predictor(cfg, strategy, tokenizer, template)


def _report_results(cfg: RunConfig, out: Path, results: dict, predicted: dict) -> None:
    if results:
        save_metrics(out, results)
        print_metrics(results)
    if predicted:
        from lf_dist.train.predict import save_results

        save_results(out, predicted)
    if cfg.train.do_train:
        logger.info(f"model saved to {out.resolve()}")
    elif results:
        logger.info(f"evaluated (do_train: false, nothing trained or saved); metrics in {out / RESULTS_FILE}")


def _train(cfg: RunConfig, plan, stage, strategy, report) -> dict:
    from transformers import set_seed

    from lf_dist.data import build_datasets
    from lf_dist.data.templates import fix_tokenizer, get_template, stop_token_ids
    from lf_dist.model import load_tokenizer
    from lf_dist.model.loader import check_weights, model_folder
    from lf_dist.model.recipe import ModelRecipe
    from lf_dist.train.resume import check_resume

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg)  # a hub name is downloaded here, once per node
    check_weights(model_folder(cfg))  # an interrupted download: one line before any data is read
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    ModelRecipe(cfg, tokenizer, stage.head).check()  # a freeze / lora_target / head mistake, before any data
    startup.settle()  # the libraries are in: what follows is the run's own memory
    checkpoints = Path(plan.checkpoint_dir or cfg.train.output_dir)
    resume_from, clear = plan_output_dir(cfg, checkpoints)
    if resume_from is not None:
        ckpt.check_format(resume_from, strategy)
        changes = check_resume(cfg, resume_from, strategy.dp_size)
        if changes and strategy.is_main:
            logger.info(f"notice: resuming {resume_from.name} with changes: " + "; ".join(changes))
    datasets = build_datasets(cfg, tokenizer, template, stage.data, world_size=strategy.world_size)
    if datasets.train is None:  # eval_dataset alone (nothing trains): the loop sizes its schedule by a train set
        datasets.train = datasets.eval
    predictor = _predictor(cfg, strategy, tokenizer, template)
    trainer = build_trainer(cfg, stage, strategy, tokenizer, datasets, checkpoints, plan.expected_peak_gib, report)
    trainer.context.stop_ids = stop_token_ids(template, tokenizer)  # where a rollout's answers end
    out = Path(cfg.train.output_dir)
    if strategy.is_main:
        _write_run_files(cfg, plan, out, checkpoints, clear)
    strategy.barrier()
    if not cfg.train.do_train:  # a prediction config predicts (LLaMA-Factory scores no eval loss without do_eval)
        results = trainer.eval_results() if predictor is None else {}
    else:
        if resume_from is not None:
            logger.info(f"resuming from {resume_from}")
        results = trainer.fit(resume_from)
        strategy.export(trainer.model, tokenizer, out)
        if strategy.is_main:
            if stage.head.value_head:
                from lf_dist.model.value_head import split_value_head

                split_value_head(out)
            ckpt.drop_superseded(checkpoints)
        if cfg.finetuning.plot_loss:
            trainer.tracker.plot()
    predicted = predictor.run(trainer.model) if predictor is not None else {}
    if strategy.is_main:
        _report_results(cfg, out, results, predicted)
    results = {**results, **predicted}
    if report is not None:
        report(results, None)
    return results
