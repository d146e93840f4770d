"""`lf-dist env --calibrate`'s measurements that run in processes of their own (spawned, never forked, as on
Windows, on 127.0.0.1): collectives between two ranks, and DeepSpeed's engine on one."""

from __future__ import annotations

from lf_dist.planner.timing import fixed_rate, median_rate, synchronizer


def _allreduce_worker(rank: int, world: int, port: int, backend: str, out) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    big, small = torch.ones(4 * 2**20, device=device), torch.ones(1, device=device)
    shard = torch.ones(big.numel() // world, device=device)
    sync = synchronizer(device)
    moved = (world - 1) / world * big.numel() * 4  # a ring's bytes per rank, once
    bus = fixed_rate(lambda: (dist.all_reduce(big), sync()), 2 * moved, 10) / 1e9
    gather = fixed_rate(lambda: (dist.all_gather_into_tensor(big, shard), sync()), moved, 10) / 1e9
    scatter = fixed_rate(lambda: (dist.reduce_scatter_tensor(shard, big), sync()), moved, 10) / 1e9
    latency = 1e6 / fixed_rate(lambda: (dist.all_reduce(small), sync()), 1.0, 200)
    if rank == 0:
        out.put((bus, gather, scatter, latency))
    dist.barrier()
    dist.destroy_process_group()


def collectives(backend: str) -> tuple[float, float, float, float]:
    """(bus bandwidth GB/s of an all-reduce, an all-gather and a reduce-scatter; an all-reduce's latency µs)
    between two processes on this machine."""
    import torch.multiprocessing as mp

    from lf_dist.ports import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(2, free_port(), backend, queue), nprocs=2, start_method="spawn")
    return queue.get()


def _deepspeed_worker(rank: int, port: int, out) -> None:
    import os

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import deepspeed
    except ImportError:  # not installed: no engine to price
        out.put(0.0)
        return
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    layers, width = 4, 1024
    x = torch.randn(64, width)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))

    plain = model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, foreach=True)

    def plain_step():
        plain(x).sum().backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    wrapped = model()
    config = {  # LLaMA-Factory's ZeRO-2 settings (examples/deepspeed/ds_z2_config.json)
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": 5e8,
            "overlap_comm": False,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "contiguous_gradients": True,
            "round_robin_gradients": True,
        },
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, foreach=True)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config)

    def engine_step():
        engine.backward(engine(x).sum())
        engine.step()

    extra = 1 / median_rate(engine_step, 1.0) - 1 / median_rate(plain_step, 1.0)
    out.put(max(0.0, extra) / (layers * width * width) * 1e9)
    dist.destroy_process_group()


def deepspeed_ns_per_value() -> float:
    """DeepSpeed's step (ZeRO-2, one rank, the gradients through its buckets into flat fp32 partitions and the
    weights copied back) beyond torch's own, per trainable value; 0 where DeepSpeed is not installed."""
    import torch.multiprocessing as mp

    from lf_dist.ports import free_port

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_deepspeed_worker, args=(free_port(), queue), nprocs=1, start_method="spawn")
    return queue.get()
