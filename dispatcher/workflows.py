"""Deadlines per workflow: how much of a workflow's remaining time one call may use.

Agents have deadlines for a whole workflow (HexAGenT), not only per call. The
dispatcher keeps, per workflow, its start, the steps done and the time used;
per task it learns how many steps a workflow takes and how long a step takes
(EMA of what it observed). The budget of the current call is the workflow's
remaining time shared among the steps still expected, in proportion to this
call's predicted work. State is bounded (LRU) and expires.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class WorkflowState:
    workflow_id: str
    task: str
    started_at: float
    deadline: float
    last_seen: float
    steps_done: int = 0
    time_used_s: float = 0.0


class WorkflowTracker:
    """Per-workflow state and per-task history, bounded and expiring."""

    def __init__(
        self,
        *,
        max_workflows: int = 100_000,
        ttl_s: float = 3600.0,
        alpha: float = 0.2,
        default_steps: float = 6.0,
    ) -> None:
        if max_workflows < 1 or ttl_s <= 0:
            raise ValueError("max_workflows must be >= 1 and ttl_s > 0")
        self.max_workflows = max_workflows
        self.ttl_s = ttl_s
        self.alpha = alpha
        self.default_steps = default_steps
        self.flows: OrderedDict[str, WorkflowState] = OrderedDict()
        self.steps_per_task: dict[str, float] = {}
        self.step_s_per_task: dict[str, float] = {}

    def budget_deadline(
        self,
        *,
        workflow_id: str,
        task: str,
        step: int,
        workflow_deadline: float,
        now: float,
        call_estimate_s: float,
    ) -> float:
        """Absolute deadline for this call, derived from the workflow's deadline."""
        st = self.flows.get(workflow_id)
        if st is None:
            st = WorkflowState(workflow_id, task, now, workflow_deadline, now)
            self.flows[workflow_id] = st
        else:
            self.flows.move_to_end(workflow_id)
            st.deadline = workflow_deadline
        st.last_seen = now
        self._bound(now)
        left = workflow_deadline - now
        if left <= 0:
            return workflow_deadline
        expected_steps = self.steps_per_task.get(task, self.default_steps)
        remaining_after = max(expected_steps - (step + 1), 0.0)
        per_step = self.step_s_per_task.get(task, max(call_estimate_s, 1e-3))
        need_this = max(call_estimate_s, 1e-3)
        share = need_this / (need_this + remaining_after * per_step)
        return now + left * min(max(share, 0.0), 1.0)

    def on_call_done(
        self,
        *,
        workflow_id: str,
        task: str,
        step: int,
        started: float,
        finished: float,
        last_step: bool = False,
    ) -> None:
        """Learn from a finished call; ``last_step`` closes the workflow."""
        dur = max(finished - started, 0.0)
        a = self.alpha
        prev = self.step_s_per_task.get(task)
        self.step_s_per_task[task] = dur if prev is None else (1 - a) * prev + a * dur
        st = self.flows.get(workflow_id)
        if st is not None:
            st.steps_done = max(st.steps_done, step + 1)
            st.time_used_s += dur
            st.last_seen = finished
        if last_step:
            self.close(workflow_id, task, step + 1)

    def close(self, workflow_id: str, task: str, steps: int) -> None:
        prev = self.steps_per_task.get(task)
        a = self.alpha
        self.steps_per_task[task] = steps if prev is None else (1 - a) * prev + a * steps
        self.flows.pop(workflow_id, None)

    def _bound(self, now: float) -> None:
        while len(self.flows) > self.max_workflows:
            self.flows.popitem(last=False)
        while self.flows:
            _, st = next(iter(self.flows.items()))
            if now - st.last_seen <= self.ttl_s and math.isfinite(st.last_seen):
                break
            self.flows.popitem(last=False)

    def __len__(self) -> int:
        return len(self.flows)
