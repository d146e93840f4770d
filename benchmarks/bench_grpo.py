"""GRPO steps through lf-dist's CLI and TRL's GRPOTrainer on the same config, alternating; one JSON line per run.

    python benchmarks/bench_grpo.py [--rounds 2] [--prompts 32] [--generations 4] [--max-new-tokens 32]
        [--steps 8] [--micro-batch 32] [--lf-micro-batch N] [--method lora|full] [--model tiny|qwen0.5b|PATH]
        [--bf16] [--threads 1]

Both sides train `--steps` steps of the same GRPO config: the tiny model (or a Qwen2.5-0.5B-shaped random one),
LoRA rank 8 / alpha 16 on every linear layer (or full), lr 1e-5 constant, seed 42, beta 0.04 (the KL to the base:
adapters off for LoRA, a frozen copy for full), loss_type dapo, TRL 1.16's use_bias_correction_kl (True), the
first `--prompts` x `--steps` prompts of examples/data/alpaca_demo in the chatml template ("instruction\\ninput" as
the user turn; TRL gets them as conversational prompts, its tokenizer's eos set to <|im_end|>, the token lf-dist's
chatml template stops on), `even_word_share` of examples/tiny/custom_rewards as the reward (for TRL wrapped to pass
the message texts), sampling temperature 1.0, top_p 1.0, top_k 0, `--max-new-tokens` new tokens. Each side runs in
its own process: lf-dist as `python -m lf_dist train cfg.yaml`, TRL as `python bench_grpo.py --side trl`.

Batch mapping (a step = one rollout of prompts x generations completions = one optimizer step on both sides):
lf-dist per_device_train_batch_size = `--micro-batch` completions, gradient_accumulation_steps = completions per
step / micro-batch (its loader hands a step's micro-batches to one rollout); TRL per_device_train_batch_size =
`--micro-batch`, gradient_accumulation_steps the same, steps_per_generation = gradient_accumulation_steps (its
default), so its generation batch is the step's completions. Both update in the same micro-batches; TRL
generates the whole step in one `generate` call, lf-dist one call per micro-batch (`--lf-micro-batch 128`: lf-dist
in one micro-batch, so one call, and one forward/backward of all 128 completions).

Per step: wall time; rollout (lf-dist `time/generating`; TRL `_generate`), score (`time/scoring`; TRL
`_calculate_rewards`), update (the reference log-probs, lf-dist `time/reference`, TRL the no-grad
`_get_per_token_logps_and_entropies` inside `_generate_and_score_completions`, plus the forward/backward/optimizer
work, lf-dist `time/updating`, TRL on_step_begin..on_step_end less `_generate_and_score_completions`); other =
wall - the three. lf-dist's wall time of step k is its log window (logging_steps 1): update tokens /
`tokens_per_second`, the seconds from log line k-1 to k (data, rollout, update, logging; the log's elapsed_time
has whole seconds only); TRL's is the time between its on_step_end callbacks (the same span). Generated tokens/s
is completion tokens (stop token included) per rollout second; update tokens/s is prompt + completion tokens per
update second. The first step of each run is dropped (warm-up); the summary pools the remaining steps of every
run per side and gives the lf-dist / TRL ratio of the median step (goal <= 0.7). `--threads` sets OMP_NUM_THREADS
for both processes (default 1: on a 2-core machine shared with another job, 2 OpenMP threads made small ops
~400x slower).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name, peak_rss_gb  # noqa: E402

TINY = ROOT / "examples" / "tiny" / "model"
DATA = ROOT / "examples" / "data"
REWARDS = ROOT / "examples" / "tiny" / "custom_rewards" / "reward_functions.py"
PHASES = ("step_s", "rollout_s", "score_s", "update_s", "reference_s", "other_s")


def make_qwen(path: Path) -> Path:
    """A Qwen2.5-0.5B-shaped model (examples/model-configs) with random bf16 weights and the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    config = AutoConfig.from_pretrained(ROOT / "examples" / "model-configs" / "Qwen2.5-0.5B")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, key, getattr(tok, key))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def n_prompts(args) -> int:
    return args.prompts * args.steps  # one epoch of distinct prompts on both sides


def accumulation(args, micro_batch: int) -> int:
    completions = args.prompts * args.generations
    if completions % micro_batch or micro_batch % args.generations:
        raise SystemExit(f"micro-batch {micro_batch} must divide {completions} and hold whole groups")
    return completions // micro_batch


def write_yaml(path: Path, args, model: Path, out: Path) -> None:
    keys = {
        "model_name_or_path": str(model),
        "stage": "grpo",
        "do_train": True,
        "finetuning_type": args.method,
        **({"lora_rank": 8, "lora_alpha": 16, "lora_target": "all"} if args.method == "lora" else {}),
        "reward_funcs": f"{REWARDS}:even_word_share",
        "num_generations": args.generations,
        "beta": args.beta,
        "loss_type": "dapo",
        "use_bias_correction_kl": True,
        "max_completion_length": args.max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "dataset": "alpaca_demo",
        "dataset_dir": str(DATA),
        "template": "chatml",
        "cutoff_len": 1024,
        "max_samples": n_prompts(args),
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "per_device_train_batch_size": args.lf_micro_batch,
        "gradient_accumulation_steps": accumulation(args, args.lf_micro_batch),
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "max_steps": args.steps,
        "seed": args.seed,
        "bf16": args.bf16,
    }
    lines = [f"{k}: {json.dumps(v) if isinstance(v, (bool, str)) else v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _env(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def _run(cmd: list[str], args, what: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=_env(args), cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return proc, wall


def run_lf_dist(args, model: Path, tmp: Path, r: int) -> dict:
    """One `lf-dist train` run; its steps from trainer_log.jsonl (logging_steps 1) and its all_results.json."""
    out, yaml_path = tmp / f"lf_{r}", tmp / f"grpo_{r}.yaml"
    write_yaml(yaml_path, args, model, out)
    _, wall = _run([sys.executable, "-m", "lf_dist", "train", str(yaml_path)], args, "lf-dist")
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    completions, steps, seen = args.prompts * args.generations, [], 0
    for e in (e for e in log if "time/generating" in e):
        update_tokens, seen = e["num_tokens"] - seen, e["num_tokens"]
        generated = round(e["completions/mean_length"] * completions)
        step = {
            "step_s": update_tokens / e["tokens_per_second"],
            "rollout_s": e["time/generating"],
            "score_s": e["time/scoring"],
            "reference_s": e.get("time/reference", 0.0),
            "update_s": e.get("time/reference", 0.0) + e["time/updating"],
            "generated_tokens": generated,
            "update_tokens": update_tokens,
            "prompt_tokens": update_tokens - generated,
        }
        steps.append(step)
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    keep = ("peak_memory_gb", "planned_peak_memory_gb", "generated_tokens_per_second", "update_tokens_per_second")
    return {"steps": steps, "wall_s": wall, "all_results": {k: results[k] for k in keep if k in results}}


def run_trl(args, model: Path, tmp: Path, r: int) -> dict:
    cmd = [sys.executable, __file__, "--side", "trl", "--model-path", str(model), "--out", str(tmp / f"trl_{r}")]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in _SHARED]
    cmd += ["--bf16"] if args.bf16 else []
    proc, wall = _run(cmd, args, "TRL")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


_SHARED = ("prompts", "generations", "max_new_tokens", "steps", "micro_batch", "method", "beta", "lr", "seed")


def trl_side(args) -> dict:
    """The TRL run (in its own process): GRPOTrainer with timers around its phases and a step callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(args.model_path)
    if not isinstance(tok.chat_template, str):
        tok.chat_template = (TINY / "chat_template.jinja").read_text(encoding="utf-8")
    tok.eos_token = "<|im_end|>"  # lf-dist's chatml stop token (its template replaces eos)
    # LoRA: bf16 base, fp32 adapters; full: fp32 weights under bf16 autocast (lf-dist keeps trainables in fp32)
    dtype = torch.bfloat16 if args.bf16 and args.method == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id

    rows = json.loads((DATA / "alpaca_demo.json").read_text(encoding="utf-8"))[: n_prompts(args)]
    text = ["\n".join(q for q in (r["instruction"], r.get("input")) if q) for r in rows]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in text])
    spec = importlib.util.spec_from_file_location("reward_functions", REWARDS)
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)

    def even_word_share(prompts, completions, completion_ids, **kwargs):
        content = lambda m: m[-1]["content"] if isinstance(m, list) else m  # noqa: E731
        texts = [content(c) for c in completions]
        return rewards.even_word_share([content(p) for p in prompts], texts, completion_ids)

    config = GRPOConfig(
        output_dir=args.out,
        use_cpu=not cuda,
        bf16=args.bf16,
        use_vllm=False,
        report_to=[],
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accumulation(args, args.micro_batch),
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type="dapo",
        use_bias_correction_kl=True,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",  # lf-dist's
        seed=args.seed,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if args.method == "lora" else None
    acc: dict = defaultdict(float)
    steps: list[dict] = []
    sync = torch.cuda.synchronize if cuda else lambda: None

    class StepTimer(TrainerCallback):
        last = begin = 0.0

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_begin(self, *a, **k):
            sync()
            acc.clear()
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            now = time.perf_counter()
            inner = now - self.begin
            update = acc["reference_s"] + inner - acc["prepare_s"]
            step = {"step_s": now - self.last, "rollout_s": acc["rollout_s"], "score_s": acc["score_s"]}
            step.update(update_s=update, reference_s=acc["reference_s"])
            step.update({k: int(acc[k]) for k in ("generated_tokens", "update_tokens", "prompt_tokens")})
            steps.append(step)
            self.last = now

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "step_time" in logs and steps:
                steps[-1]["trl_step_time_s"] = logs["step_time"]

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=even_word_share,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )

    def timed(name: str, fn, count=None):
        def wrapper(*a, **k):
            if name == "reference_s" and not acc["in_prepare"]:
                return fn(*a, **k)  # the training forward: part of the update
            start = time.perf_counter()
            acc["in_prepare"] += name == "prepare_s"
            try:
                out = fn(*a, **k)
                sync()
            finally:
                acc["in_prepare"] -= name == "prepare_s"
            acc[name] += time.perf_counter() - start
            if count:
                count(out, *a)
            return out

        return wrapper

    def generated(out, *a):
        acc["generated_tokens"] += sum(len(c) for c in out[1])

    def update_tokens(out, model, inputs, *a):
        n_prompt = int(inputs["prompt_mask"].sum())
        acc["prompt_tokens"] += n_prompt
        acc["update_tokens"] += n_prompt + int(inputs["completion_mask"].sum())

    trainer._generate = timed("rollout_s", trainer._generate, generated)
    trainer._calculate_rewards = timed("score_s", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("prepare_s", trainer._generate_and_score_completions)
    trainer._get_per_token_logps_and_entropies = timed("reference_s", trainer._get_per_token_logps_and_entropies)
    trainer.compute_loss = timed("loss_s", trainer.compute_loss, update_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gb()
    return {"steps": steps, "peak_memory_gb": round(memory, 3)}


def summarize(steps: list[dict]) -> dict:
    """Medians of `steps` (warm-up steps already dropped), tokens/s over their sums."""
    kept = [{**s, "other_s": s["step_s"] - s["rollout_s"] - s["score_s"] - s["update_s"]} for s in steps]
    out = {k: round(statistics.median(s[k] for s in kept), 4) for k in PHASES}
    total = {k: sum(s[k] for s in kept) for k in ("rollout_s", "update_s", "generated_tokens", "update_tokens")}
    out["generated_tokens_per_s"] = round(total["generated_tokens"] / max(total["rollout_s"], 1e-9), 1)
    out["update_tokens_per_s"] = round(total["update_tokens"] / max(total["update_s"], 1e-9), 1)
    for k in ("generated_tokens", "prompt_tokens", "update_tokens"):
        out[f"{k}_per_step"] = round(statistics.mean(s[k] for s in kept), 1)
    if "trl_step_time_s" in kept[0]:  # TRL's own logged step_time (its training_step calls), for comparison
        out["trl_logged_step_time_s"] = round(statistics.median(s["trl_step_time_s"] for s in kept), 4)
    return out


def commit() -> str:
    git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"]
    return subprocess.run(git, capture_output=True, text=True).stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward, both sides")
    p.add_argument("--lf-micro-batch", type=int, help="lf-dist's, if not --micro-batch")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--model", default="tiny", help="tiny, qwen0.5b (random Qwen2.5-0.5B shape) or a model folder")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both sides (0: leave it)")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.lf_micro_batch = args.lf_micro_batch or args.micro_batch
    if args.side == "trl":
        with contextlib.redirect_stdout(sys.stderr):  # library prints: stdout carries the one JSON line
            result = trl_side(args)
        print(json.dumps(result), flush=True)
        return
    import torch
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    head = {
        "bench": "grpo",
        "machine": cpu_name(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "commit": commit(),
        "model": args.model,
        "method": args.method,
        "bf16": args.bf16,
        "prompts": args.prompts,
        "generations": args.generations,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "lf_micro_batch": args.lf_micro_batch,
        "threads": args.threads,
    }
    sides = {"lf-dist": run_lf_dist, "trl": run_trl}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = {"tiny": TINY, "qwen0.5b": None}.get(args.model, Path(args.model))
        if model is None:
            with contextlib.redirect_stdout(sys.stderr):
                model = make_qwen(tmp / "qwen")
        for r in range(args.rounds):
            for side, run in sides.items():
                result = run(args, model, tmp, r)
                runs[side].append(result)
                line = {**head, "side": side, "run": r, **summarize(result["steps"][1:])}
                line["wall_s"] = round(result["wall_s"], 2)
                line.update({k: result[k] for k in ("peak_memory_gb", "all_results") if k in result})
                print(json.dumps(line), flush=True)
    pooled = {s: summarize([x for r in rs for x in r["steps"][1:]]) for s, rs in runs.items()}
    ratio = {k: round(pooled["lf-dist"][k] / max(pooled["trl"][k], 1e-9), 3) for k in PHASES if k != "other_s"}
    summary = {**head, "compare": "lf-dist/trl", "rounds": args.rounds, "medians": pooled}
    summary.update(step_ratio=ratio["step_s"], goal=0.7)
    summary.update({f"{k[:-2]}_ratio": v for k, v in ratio.items() if k != "step_s"})
    summary["meets_goal"] = ratio["step_s"] <= 0.7
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
