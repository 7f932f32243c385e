"""Which points of a sweep share a teacher cache: the plan made before any point runs, and that plan
checked again against the caches as they stand when a point starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TeacherPlan", "plan_now", "plan_teacher_caches", "run_order"]


@dataclass(frozen=True)
class TeacherPlan:
    """Where a point's teacher outputs come from: ``online`` (its teacher runs), ``write`` (its
    teacher runs and fills the cache at ``uri``) or ``read`` (it reads them from ``uri``)."""

    role: str
    uri: str | None = None

    def overrides(self) -> list[str]:
        key = {"write": "cache_write", "read": "cache"}.get(self.role)
        return [f"algorithms.distillation.{key}={self.uri}"] if key else []


def plan_teacher_caches(configs: dict[str, Any], root: str) -> dict[str, TeacherPlan]:
    """Which points share a teacher cache under ``root``: the points whose teacher sees the same
    inputs (``teacher_cache.sweep_group``: a temperature, alpha, ce_weight, learning-rate or
    same-normalization backbone sweep; not a seed, image-size or augmentation one) form a group;
    of two or more, the longest run (the first of the longest, in grid order) fills the group's
    cache and the others read it. A point alone in its group, or one that does not distil, runs
    its teacher online. ``configs``: each point's config, by point id, in grid order."""
    from composer.core import Time

    from usi_composer.teacher_cache import sweep_group

    groups: dict[str, list[str]] = {}
    for pid, cfg in configs.items():
        group = sweep_group(cfg)
        if group is not None:
            groups.setdefault(group, []).append(pid)
    plans = {pid: TeacherPlan("online") for pid in configs}
    for group, pids in groups.items():
        if len(pids) < 2:
            continue
        uri = f"{root.rstrip('/')}/{group}"
        longest = max(pids, key=lambda p: Time.from_timestring(configs[p].trainer.max_duration).value)
        for pid in pids:
            plans[pid] = TeacherPlan("write" if pid == longest else "read", uri)
    return plans


def run_order(pids: list[str], plans: dict[str, TeacherPlan]) -> list[str]:
    """Grid order, except that a group's writer runs before the first of its readers."""
    writers = {plan.uri: pid for pid, plan in plans.items() if plan.role == "write"}
    order: list[str] = []
    for pid in pids:
        plan = plans.get(pid, TeacherPlan("online"))
        writer = writers.get(plan.uri) if plan.role == "read" else None
        for p in (writer, pid):
            if p is not None and p not in order:
                order.append(p)
    return order


def plan_now(plan: TeacherPlan, cfg: Any) -> TeacherPlan:
    """The plan, as the caches stand now: a reader whose writer did not fill its cache runs online;
    a writer whose cache is filled already (a rerun, or another sweep into the same cache) reads it."""
    filled = plan.role != "online" and _cache_filled(plan.uri, cfg)
    if plan.role == "read" and not filled:
        return TeacherPlan("online")
    if plan.role == "write" and filled:
        return TeacherPlan("read", plan.uri)
    return plan


def _cache_filled(uri: str | None, cfg: Any) -> bool:
    from usi_composer.teacher_cache import cache_covers

    return uri is not None and cache_covers(uri, cfg.trainer.max_duration, cfg.trainer.global_batch_size)
