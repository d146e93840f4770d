"""The layering rules of the README's architecture section, read off the imports of every module.

- config/ imports nothing of the package but `lf_dist.errors`;
- parallel/ imports nothing of launchers/, data/, train/ (nor the worker);
- data/ imports nothing of train/, parallel/, model/ or launchers/;
- model/ imports nothing of train/, parallel/, data/ or launchers/;
- nothing below the planner (parallel/, data/, model/) imports it; it imports nothing of train/ or launchers/;
- serve/ (export, chat, api) reads models and checkpoints and never trains, launches or plans; only the CLI
  imports it;
- no import cycle between modules, counting imports inside functions too;
- no module but the stage registry compares a stage's name, and none but the backend registry a backend's;
- serve/ imports no strategy module (checkpoint layouts come from `parallel/formats.py`);
- no module of launchers/ imports train/ (the worker is the bridge between them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lf_dist"
STAGE_NAMES = {"pt", "sft", "rm", "dpo", "kto", "grpo", "ppo", "ppo_custom"}
# keys whose values share a stage's name without naming a stage: GRPO's loss_type "grpo"
NOT_STAGE_KEYS = {"loss_type"}
REGISTRY = "lf_dist.train.stages"
BACKEND_NAMES = {"single", "ddp", "fsdp2", "deepspeed", "megatron"}
BACKEND_REGISTRY = "lf_dist.parallel.registry"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """`lf_dist.a.b` (a module, or a name in module `lf_dist.a`) → the module it loads."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """Every lf_dist module `module` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.startswith("lf_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lf_dist"):
            found |= {_resolve(f"{node.module}.{a.name}") for a in node.names}
    return found - {module}


GRAPH = {m: imports_of(m) for m in MODULES}

_ABOVE = (
    "lf_dist.launchers",
    "lf_dist.worker",
    "lf_dist.run_checks",
    "lf_dist.planner",
    "lf_dist.cli",
    "lf_dist.serve",
)
FORBIDDEN = {
    "lf_dist.parallel": ("lf_dist.data", "lf_dist.train", *_ABOVE),
    "lf_dist.data": ("lf_dist.train", "lf_dist.parallel", "lf_dist.model", *_ABOVE),
    "lf_dist.model": ("lf_dist.train", "lf_dist.parallel", "lf_dist.data", *_ABOVE),
    # the planner reads a config and a stage spec and decides; it never reaches into the loop or the launchers
    "lf_dist.planner": ("lf_dist.train", "lf_dist.launchers", "lf_dist.worker", "lf_dist.cli", "lf_dist.serve"),
    # serving reads models and checkpoints (their layout: train.checkpoint, the strategies' folder names); it
    # never trains, launches or plans
    "lf_dist.serve": (
        "lf_dist.launchers",
        "lf_dist.worker",
        "lf_dist.planner",
        "lf_dist.cli",
        "lf_dist.train.loop",
        "lf_dist.train.stages",
        "lf_dist.train.losses",
        "lf_dist.train.preference",
    ),
}
RULES = {layer: (lambda dep, bad=bad: not dep.startswith(bad)) for layer, bad in FORBIDDEN.items()}
RULES["lf_dist.config"] = lambda dep: dep.startswith("lf_dist.config") or dep == "lf_dist.errors"
# kernels are plain torch/transformers functions: exact replacements that know no stage, backend or config
RULES["lf_dist.kernels"] = lambda dep: dep.startswith("lf_dist.kernels")


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_the_architecture_allows(layer):
    broken = {
        m: sorted(d for d in deps if not RULES[layer](d))
        for m, deps in GRAPH.items()
        if m == layer or m.startswith(layer + ".")
    }
    assert not {m: d for m, d in broken.items() if d}, broken


def test_no_import_cycles_even_through_function_level_imports():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def _compares_key(node: ast.Compare, keys: set[str]) -> bool:
    """Whether the comparison's left side is a variable or attribute named one of `keys` (`loss_type == ...`)."""
    left = node.left
    return (isinstance(left, ast.Name) and left.id in keys) or (isinstance(left, ast.Attribute) and left.attr in keys)


def _names_compared(names: set[str], registry: str) -> list[str]:
    """Where a module other than `registry` compares one of `names`, keys a table by one, or passes one as a
    keyword argument's value."""
    found = []
    for module, path in MODULES.items():
        if module == registry:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            hits = set()
            if isinstance(node, ast.Compare) and not _compares_key(node, NOT_STAGE_KEYS):
                hits = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in names}
            elif isinstance(node, ast.Dict):  # a lookup table keyed by name
                hits = {k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names}
            elif isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
                hits = {node.value.value} & names
            if hits:
                found.append(f"{module}:{getattr(node, 'lineno', '?')} {sorted(hits)}")
    return found


def test_only_the_stage_registry_compares_stage_names():
    found = _names_compared(STAGE_NAMES, REGISTRY)
    assert not found, found


def test_only_the_backend_registry_names_a_backend():
    from lf_dist.parallel.registry import BACKENDS

    assert set(BACKENDS) == BACKEND_NAMES  # the names this rule looks for are the registered ones
    found = _names_compared(BACKEND_NAMES, BACKEND_REGISTRY)
    assert not found, found


STRATEGY_MODULES = {
    m for m in MODULES if m.startswith("lf_dist.parallel.") and m not in ("lf_dist.parallel.formats", BACKEND_REGISTRY)
}


def test_serve_imports_no_strategy_module():
    assert "lf_dist.parallel.fsdp2" in STRATEGY_MODULES
    found = {m: sorted(GRAPH[m] & STRATEGY_MODULES) for m in MODULES if m.startswith("lf_dist.serve")}
    assert not {m: d for m, d in found.items() if d}, found


def test_no_launcher_imports_the_training_loop_directly():
    found = {m: sorted(d for d in GRAPH[m] if d.startswith("lf_dist.train")) for m in MODULES}
    found = {m: d for m, d in found.items() if m.startswith("lf_dist.launchers") and d}
    assert not found, found


def test_no_function_is_longer_than_a_screen():
    """Every function of the package reads on one screen: at most 60 lines, nested definitions included."""
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_training_loop_fits_on_one_screen():
    from lf_dist.train.loop import Trainer

    fit = next(n for n in ast.walk(ast.parse(MODULES["lf_dist.train.loop"].read_text(encoding="utf-8")))
               if isinstance(n, ast.FunctionDef) and n.name == "fit")  # fmt: skip
    assert fit.end_lineno - fit.lineno + 1 <= 40 and hasattr(Trainer, "fit")
