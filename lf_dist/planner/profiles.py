"""Hardware profiles: this machine (`detect`), the named machines a plan can be made for, or a YAML file.

Memory is what the device reports as its total (GiB); peak FLOP/s are dense bf16 tensor-core figures from the
vendors' data sheets; bandwidths are GB/s per GPU inside a node (NVLink or PCIe) and per node between nodes.
`runtime_overhead_gib` is memory a run uses beyond its tensors: the CUDA context and allocator slack on a GPU,
the interpreter with torch, transformers and datasets loaded on a CPU (where the process's RSS is the measure).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from lf_dist.errors import UserError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu: str | None  # the accelerator's model; None: a CPU-only machine (memory is RAM)
    gpus_per_node: int
    gpu_memory_gib: float  # per device: a GPU's memory, or the RAM of a CPU-only machine
    bf16: bool
    peak_bf16_tflops: float  # per device
    intra_node_gbps: float
    inter_node_gbps: float
    cpu_cores: int = 0
    ram_gib: float = 0.0
    nnodes: int = 1
    runtime_overhead_gib: float = 1.0
    # the time model (planner/step_time.py): fp32 matmul peak (0: half the bf16 one), elementwise (memory)
    # bandwidth in GB/s, the share of peak a large matmul reaches, and fixed costs per operator and collective hop
    peak_fp32_tflops: float = 0.0
    memory_gbps: float = 0.0
    optimizer_gbps: float = 0.0  # the optimizer's update in the time model's bytes (0: at memory_gbps)
    matmul_efficiency: float = 0.75
    matmul_half_width: float = 0.0  # w0: a matmul of width w runs at efficiency · w / (w + w0)
    op_latency_us: float = 10.0
    collective_latency_us: float = 30.0
    # measured by `lf-dist env --calibrate` (0: from the matmul rate and the bandwidth): causal attention's
    # FLOP/s with its backward, LoRA's rank-8 matmul pair's, AdamW's multi-tensor (unfused) update in the model's
    # bytes, and a decoder layer's fixed cost per micro-batch (its modules' Python and dispatch, forward and
    # backward) in µs, without and with LoRA adapters on its linears
    attention_tflops: float = 0.0
    adapter_tflops: float = 0.0
    head_tflops: float = 0.0  # the output layer's matmuls in the chunked cross-entropy, at width 256
    unfused_optimizer_gbps: float = 0.0
    layer_overhead_us: float = 0.0
    lora_layer_overhead_us: float = 0.0
    # a node's all-gather and reduce-scatter bus bandwidth where they differ from its all-reduce's (gloo on a CPU)
    all_gather_gbps: float = 0.0
    reduce_scatter_gbps: float = 0.0
    deepspeed_ns_per_value: float = 0.0  # DeepSpeed's step beyond torch's, per trainable value (ZeRO-2, 1 rank)
    fresh_memory_gbps: float = 0.0  # first touch of newly mapped memory (a CPU's page faults; 0: free, as on GPUs)

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None and self.gpus_per_node > 0

    @property
    def devices_per_node(self) -> int:
        return self.gpus_per_node if self.on_gpu else 1

    @property
    def world_size(self) -> int:
        return self.nnodes * self.devices_per_node

    def with_nodes(self, nnodes: int) -> HardwareProfile:
        if nnodes < 1:
            raise UserError(f"--nnodes: must be >= 1, got {nnodes}")
        return replace(self, nnodes=nnodes)

    def to_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def _gpu(name, gpu, count, mem, intra, inter, cores, ram) -> HardwareProfile:
    peak_bf16, peak_fp32, bandwidth = _PUBLISHED[next(k for k in _PUBLISHED if k in gpu)]
    return HardwareProfile(
        name, gpu, count, mem, True, peak_bf16, intra, inter, cores, ram, 1, 1.0,
        peak_fp32_tflops=peak_fp32, memory_gbps=bandwidth, matmul_efficiency=0.75, op_latency_us=8.0,
        collective_latency_us=20.0,
    )  # fmt: skip


# Published figures by GPU model: dense bf16 tensor-core TFLOP/s, fp32 (non-tensor; torch's default matmul)
# TFLOP/s, memory GB/s. Sources: NVIDIA's data sheets — H100 SXM5 and H200 SXM ("H100 Tensor Core GPU" and "H200
# Tensor Core GPU" data sheets: 989.4 bf16 dense, 66.9 fp32; 3.35 and 4.8 TB/s), A100 SXM4 ("A100 Tensor Core GPU"
# data sheet: 312 bf16, 19.5 fp32; 1,555 GB/s for 40GB, 2,039 GB/s for 80GB), RTX A6000 (data sheet: 309.7 bf16
# with sparsity, so 154.8 dense; 38.7 fp32; 768 GB/s), RTX 4090 (Ada Lovelace architecture whitepaper, app. A:
# 165.2 bf16 with fp32 accumulate, 82.6 fp32, 1,008 GB/s), L40S (data sheet: 362.05 bf16 dense, 91.6 fp32,
# 864 GB/s), A10 (data sheet: 125 bf16 dense, 31.2 fp32, 600 GB/s). Most specific names first.
_PUBLISHED = {
    "H200": (989.4, 66.9, 4800.0),
    "H100": (989.4, 66.9, 3350.0),
    "A100-SXM4-80GB": (312.0, 19.5, 2039.0),
    "A100": (312.0, 19.5, 1555.0),
    "A6000": (154.8, 38.7, 768.0),
    "4090": (165.2, 82.6, 1008.0),
    "L40S": (362.05, 91.6, 864.0),
    "A10": (125.0, 31.2, 600.0),
}

PROFILES = {
    p.name: p
    for p in (
        # the 2-vCPU build machine, as `lf-dist env --calibrate` measured it (2026-12-06): matmul at large shapes,
        # elementwise bandwidth, per-operator dispatch and gloo's all-reduce between two processes; baseline RSS
        # of a run ~0.55 GiB
        HardwareProfile("cpu", None, 0, 24.0, True, 0.375, 0.0, 0.0, 2, 24.0, 1, 0.55),
        _gpu("a6000x1", "NVIDIA RTX A6000", 1, 47.99, 32.0, 1.25, 16, 128.0),
        _gpu("rtx4090x1", "NVIDIA GeForce RTX 4090", 1, 23.99, 32.0, 1.25, 16, 64.0),
        # a workstation with two 24 GB cards on PCIe 4.0 x16 (no NVLink): Answer.AI's FSDP-QLoRA 70B machine
        _gpu("rtx4090x2", "NVIDIA GeForce RTX 4090", 2, 23.99, 25.0, 1.25, 32, 128.0),
        # NVLink 3 (A100): 600 GB/s both ways, 300 one way; NVLink 4 (H100/H200): 900 and 450; between nodes eight
        # 200 Gb/s (A100) or 400 Gb/s (H100) InfiniBand NICs per node: 200 and 400 GB/s
        _gpu("a100-40gbx8", "NVIDIA A100-SXM4-40GB", 8, 39.59, 300.0, 200.0, 128, 1024.0),
        _gpu("a100-80gbx8", "NVIDIA A100-SXM4-80GB", 8, 79.35, 300.0, 200.0, 128, 2048.0),
        _gpu("h100x8", "NVIDIA H100 80GB HBM3", 8, 79.19, 450.0, 400.0, 224, 2048.0),
        _gpu("h200x8", "NVIDIA H200", 8, 139.81, 450.0, 400.0, 224, 2048.0),
    )
}


def load_profile(name_or_file: str, nnodes: int | None = None) -> HardwareProfile:
    """A named profile, or a YAML file with the same fields; `nnodes` multiplies a node."""
    path = Path(name_or_file)
    if name_or_file in PROFILES:
        profile = PROFILES[name_or_file]
    elif path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        profile = _from_file(path)
    else:
        raise UserError(f"--profile: unknown profile '{name_or_file}' (named: {', '.join(PROFILES)}; or a YAML file)")
    return profile.with_nodes(nnodes) if nnodes else profile


def _from_file(path: Path) -> HardwareProfile:
    import yaml

    if not path.is_file():
        raise UserError(f"--profile: profile file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"--profile: {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"--profile: {path} must hold a mapping of profile fields")
    known = {f.name: f for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"--profile: {path}: unknown field '{unknown[0]}' (fields: {', '.join(known)})")
    data.setdefault("name", path.stem)
    required = ("gpu", "gpus_per_node", "gpu_memory_gib", "bf16", "peak_bf16_tflops", "intra_node_gbps")
    missing = [k for k in (*required, "inter_node_gbps") if k not in data]
    if missing:
        raise UserError(f"--profile: {path}: missing field '{missing[0]}'")
    for key in ("gpus_per_node", "gpu_memory_gib", "peak_bf16_tflops", "intra_node_gbps", "inter_node_gbps"):
        if not isinstance(data[key], (int, float)) or isinstance(data[key], bool) or data[key] < 0:
            raise UserError(f"--profile: {path}: {key} must be a number >= 0, got {data[key]!r}")
    return HardwareProfile(**data)


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # Windows
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (n, ctypes.c_ulonglong) for n in ("total", "avail", "tpage", "apage", "tvirt", "avirt", "aext")
            ]

        status = _Status()
        status.length = ctypes.sizeof(_Status)
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
        return status.total / 2**30


# the time model's rates, as `lf-dist env --calibrate` measures them
RATES = (
    "peak_bf16_tflops",
    "peak_fp32_tflops",
    "memory_gbps",
    "optimizer_gbps",
    "matmul_efficiency",
    "matmul_half_width",
    "op_latency_us",
    "attention_tflops",
    "adapter_tflops",
    "head_tflops",
    "unfused_optimizer_gbps",
    "layer_overhead_us",
    "lora_layer_overhead_us",
    "intra_node_gbps",
    "all_gather_gbps",
    "reduce_scatter_gbps",
    "deepspeed_ns_per_value",
    "fresh_memory_gbps",
    "collective_latency_us",
)


def calibrated_path() -> Path:
    """Where `lf-dist env --calibrate` writes this machine's profile: LF_DIST_PROFILE, else the user cache."""
    if os.environ.get("LF_DIST_PROFILE"):
        return Path(os.environ["LF_DIST_PROFILE"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lf_dist" / "calibrated_profile.yaml"


def _with_calibration(hw: HardwareProfile) -> HardwareProfile:
    """This machine's rates as calibrated, where a calibration of the same machine (accelerator and cores) exists."""
    path = calibrated_path()
    if not path.is_file():
        return hw
    try:
        saved = _from_file(path)
    except UserError:
        return hw
    if (saved.gpu, saved.gpus_per_node, saved.cpu_cores) != (hw.gpu, hw.gpus_per_node, hw.cpu_cores):
        return hw
    return replace(hw, name="this machine (calibrated)", **{k: getattr(saved, k) for k in RATES})


def detect() -> HardwareProfile:
    """This machine (one node; NNODES from the environment multiplies it, as torchrun's contract does), with its
    calibrated rates where `lf-dist env --calibrate` measured them."""
    return _with_calibration(_detect())


def _detect() -> HardwareProfile:
    import torch

    cores, ram = os.cpu_count() or 1, round(_ram_gib(), 2)
    nnodes = int(os.environ.get("NNODES", "1") or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        peak, fp32, bandwidth = next((v for k, v in _PUBLISHED.items() if k in props.name), (0.0, 0.0, 0.0))
        return HardwareProfile(
            "this machine",
            props.name,
            torch.cuda.device_count(),
            round(props.total_memory / 2**30, 2),
            torch.cuda.is_bf16_supported(),
            peak,
            0.0,
            0.0,
            cores,
            ram,
            nnodes,
            1.0,
            fp32,
            bandwidth,
        )
    cpu = PROFILES["cpu"]
    return replace(cpu, name="this machine", gpu_memory_gib=ram, cpu_cores=cores, ram_gib=ram, nnodes=nnodes)


# (distribution name, the module it is imported as) of the optional libraries
LIBRARIES = (
    ("deepspeed", "deepspeed"),
    ("ray", "ray"),
    ("megatron-core", "megatron.core"),
    ("liger-kernel", "liger_kernel"),
    ("flash-attn", "flash_attn"),
    ("bitsandbytes", "bitsandbytes"),
)


def backends() -> dict[str, str | None]:
    """The version of each optional backend that can be imported here, None where it cannot."""
    out = {}
    for dist, module in LIBRARIES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        try:
            out[dist] = importlib.metadata.version(dist) if found else None
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
