"""strategy megatron's weights across processes (gloo, CPU shim): each rank loads only its slices with
`load_hf_weights` at TP 2, TP 4, PP 2 (virtual stages too) and TP 2 × PP 2, `gather_hf_state_dict` returns the HF
state dict bit-exactly on rank 0, and the vocab-parallel fp32 logits gathered over TP equal HF's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_megatron_mapping import hf_state_dict, save_tiny

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

# (tp, pp, vpp, families, compare logits); llama_gqa and mistral have fewer KV heads than TP 4 and 2
WORLD_2 = [
    (2, 1, None, ["llama_gqa", "llama_tied", "qwen2", "qwen3", "mistral"], True),
    (1, 2, None, ["llama_gqa", "llama_tied", "qwen3"], False),
    (1, 2, 2, ["llama_4layers"], False),
]
WORLD_4 = [
    (4, 1, None, ["llama_gqa", "qwen3", "llama_vocab1170"], True),
    (2, 2, None, ["llama_tied", "qwen2"], False),
]


def _tp_logits(chunk, path: Path, vocab: int) -> torch.Tensor:
    from megatron.core import parallel_state

    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local = chunk(ids, torch.arange(64).expand_as(ids), attention_mask=None)
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return (torch.cat(parts, dim=-1)[..., :vocab] - reference(ids).logits).abs().max()


def _run_scenario(tp, pp, vpp, families, logits, paths) -> list[dict]:
    from transformers import AutoConfig

    from lf_dist.parallel.megatron import model_map, weights
    from tests import megatron_shim

    megatron_shim.init_parallel(tp=tp, pp=pp, vpp=vpp)
    results = []
    for family in families:
        config = AutoConfig.from_pretrained(paths[family])
        chunks = model_map.build_model_chunks(config, model_map.transformer_config(config, tp=tp, pp=pp, vpp=vpp))
        weights.load_hf_weights(chunks, config, paths[family])
        gathered = weights.gather_hf_state_dict(chunks, config)
        result = {"layout": [tp, pp, vpp], "family": family}
        if logits:
            result["logits_max_diff"] = _tp_logits(chunks[0], paths[family], config.vocab_size).item()
        if gathered is not None:
            want = hf_state_dict(paths[family])
            result["missing_or_extra"] = sorted(set(want) ^ set(gathered))
            result["different"] = [k for k in want if k in gathered and not torch.equal(gathered[k], want[k])]
        results.append(result)
    return results


def _worker(rank: int, world: int, port: int, scenarios, paths, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tests import megatron_shim

    results = []
    for scenario in scenarios:
        results += _run_scenario(*scenario, paths)
    megatron_shim.destroy()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")


def _spawn(world: int, scenarios, tmp_path: Path, models: Path) -> list[list[dict]]:
    import torch.multiprocessing as mp

    from tests.megatron_shim import free_port

    families = {f for s in scenarios for f in s[3]}
    paths = {f: save_tiny(f, models / f) for f in families}
    mp.spawn(_worker, args=(world, free_port(), scenarios, paths, str(tmp_path)), nprocs=world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron_models")


def _check(per_rank: list[list[dict]]) -> None:
    rank0 = per_rank[0]
    assert [r["missing_or_extra"] for r in rank0] == [[]] * len(rank0)
    assert [r["different"] for r in rank0] == [[]] * len(rank0)
    diffs = [
        (r["layout"], r["family"], r["logits_max_diff"]) for ranks in per_rank for r in ranks if "logits_max_diff" in r
    ]
    assert [d for d in diffs if d[2] >= 1e-5] == []


def test_two_ranks_load_their_slices_and_gather_the_hf_weights_back(tmp_path, models):
    per_rank = _spawn(2, WORLD_2, tmp_path, models)
    assert [(r["layout"], r["family"]) for r in per_rank[0]] == [
        ([tp, pp, vpp], f) for tp, pp, vpp, fams, _ in WORLD_2 for f in fams
    ]
    _check(per_rank)


def test_four_ranks_load_their_slices_and_gather_the_hf_weights_back(tmp_path, models):
    per_rank = _spawn(4, WORLD_4, tmp_path, models)
    assert len(per_rank[0]) == sum(len(s[3]) for s in WORLD_4)
    _check(per_rank)
