"""The plan in words, as `lf-dist plan` prints it (and the web UI shows it)."""

from __future__ import annotations


def report(plan, hw) -> list[str]:
    """The summary, the profile, the sizes, memory per device term by term, the time, the most that fits, why."""
    lines = [
        plan.summary(),
        f"  profile: {hw.name} ({hw.gpu or 'CPU'}, {hw.world_size} device(s), {plan.gpu_memory_gib:.2f} GiB each)",
        f"  parameters: {plan.num_params:,} ({plan.trainable_params:,} trainable)",
        "  memory per device (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in plan.memory_gib.items()),
        f"  {plan.timing()}",
    ]
    if plan.fits:
        lines.append(f"  {plan.most_that_fits()}")
    lines += [f"  - {reason}" for reason in plan.reasons]
    if plan.suggestion:
        lines.append(f"  - to fit: {plan.suggestion}")
    return lines
