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


def _gpu(name, gpu, count, mem, tflops, intra, inter, cores, ram) -> HardwareProfile:
    return HardwareProfile(name, gpu, count, mem, True, tflops, intra, inter, cores, ram, 1, 1.0)


PROFILES = {
    p.name: p
    for p in (
        # the 2-vCPU build machine: bf16 matmul measured at ~0.375 TFLOP/s; baseline RSS of a run ~0.55 GiB
        HardwareProfile("cpu", None, 0, 24.0, True, 0.375, 0.0, 0.0, 2, 24.0, 1, 0.55),
        _gpu("a6000x1", "NVIDIA RTX A6000", 1, 47.99, 154.8, 32.0, 1.25, 16, 128.0),
        _gpu("rtx4090x1", "NVIDIA GeForce RTX 4090", 1, 23.99, 165.2, 32.0, 1.25, 16, 64.0),
        # a workstation with two 24 GB cards on PCIe 4.0 x16 (no NVLink): Answer.AI's FSDP-QLoRA 70B machine
        _gpu("rtx4090x2", "NVIDIA GeForce RTX 4090", 2, 23.99, 165.2, 25.0, 1.25, 32, 128.0),
        _gpu("a100-40gbx8", "NVIDIA A100-SXM4-40GB", 8, 39.59, 312.0, 300.0, 200.0, 128, 1024.0),
        _gpu("a100-80gbx8", "NVIDIA A100-SXM4-80GB", 8, 79.35, 312.0, 300.0, 200.0, 128, 2048.0),
        _gpu("h100x8", "NVIDIA H100 80GB HBM3", 8, 79.19, 989.0, 450.0, 400.0, 224, 2048.0),
        _gpu("h200x8", "NVIDIA H200", 8, 139.81, 989.0, 450.0, 400.0, 224, 2048.0),
    )
}
# Dense bf16 TFLOP/s by GPU model, for a detected GPU.
_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A6000": 154.8,
    "4090": 165.2,
    "L40S": 362.1,
    "A10": 125.0,
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


def detect() -> HardwareProfile:
    """This machine (one node; NNODES from the environment multiplies it, as torchrun's contract does)."""
    import torch

    cores, ram = os.cpu_count() or 1, round(_ram_gib(), 2)
    nnodes = int(os.environ.get("NNODES", "1") or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        peak = next((v for k, v in _PEAK_TFLOPS.items() if k in props.name), 0.0)
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
