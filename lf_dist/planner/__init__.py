"""The planner: a hardware profile and the model's exact size in, a Plan out — launcher, strategy, method and
quantization (with fallback), gradient checkpointing, memory per device term by term, and why.

Decisions are made here once, before launch; launchers and workers read the Plan and never decide again.
"""

from lf_dist.planner.decide import make_plan
from lf_dist.planner.plan import PLAN_FILE, Plan, require_fit
from lf_dist.planner.profiles import PROFILES, HardwareProfile, backends, detect, load_profile

__all__ = [
    "PLAN_FILE",
    "PROFILES",
    "HardwareProfile",
    "Plan",
    "backends",
    "detect",
    "load_profile",
    "make_plan",
    "require_fit",
]
