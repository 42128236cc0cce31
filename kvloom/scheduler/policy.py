"""Scheduling policies: the order waiting requests are admitted in, and which
running request gives way when the KV cache runs out.

The scheduler asks its policy both questions and never looks at the policy's
name, so a new policy is one class here and its entry in SCHEDULING_POLICIES,
which is also what ``scheduler.policy`` in the config is checked against. (This
module and the queues sit in the foundation layer for that reason: they need
nothing but Request.)
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

from kvloom.request import Request
from kvloom.scheduler.waiting_queue import FCFSQueue, PriorityQueue, WaitingQueue


class SchedulingPolicy(ABC):
    """Queue order and preemption victim for one scheduler."""

    name: str

    @abstractmethod
    def make_waiting_queue(self) -> WaitingQueue:
        """An empty queue that yields waiting requests in admission order."""

    @abstractmethod
    def pick_preemption_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt when another cannot get a KV block.

        ``running`` is in admission order and never empty.
        """


class FirstComeFirstServed(SchedulingPolicy):
    """Arrival order; the request admitted last is preempted first (it has the
    least computed work to redo, and the oldest requests keep making progress)."""

    name = "fcfs"

    def make_waiting_queue(self) -> WaitingQueue:
        return FCFSQueue()

    def pick_preemption_victim(self, running: Sequence[Request]) -> Request:
        return running[-1]


class ByPriority(SchedulingPolicy):
    """Lowest ``priority`` value first, then earliest arrival; the least urgent
    running request (highest value, latest arrival) is preempted first."""

    name = "priority"

    def make_waiting_queue(self) -> WaitingQueue:
        return PriorityQueue()

    def pick_preemption_victim(self, running: Sequence[Request]) -> Request:
        return max(running, key=lambda request: (request.priority, request.arrival_time))


SCHEDULING_POLICIES: Mapping[str, type[SchedulingPolicy]] = types.MappingProxyType({
    policy.name: policy for policy in (FirstComeFirstServed, ByPriority)})


def make_scheduling_policy(name: str) -> SchedulingPolicy:
    """The policy called ``name``; a ValueError lists the known ones."""
    policy = SCHEDULING_POLICIES.get(name)
    if policy is None:
        raise ValueError(f"scheduler.policy: unknown scheduling policy {name!r}; "
                         f"known: {', '.join(sorted(SCHEDULING_POLICIES))}")
    return policy()
