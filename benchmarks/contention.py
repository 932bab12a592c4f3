"""How much of the machine other processes used while a case was timed (Linux ``/proc/stat``), and a bounded wait
for a quiet moment before timing.

``others`` = (CPU time the whole machine was busy − CPU time of this process and its children) ÷ (wall time ×
CPUs): 0 on an otherwise idle machine, 0.5 when other work kept one of two CPUs busy. Where ``/proc/stat`` is
missing, nothing is measured (None) and nothing waits.
"""

from __future__ import annotations

import os
import resource
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NCPU = os.cpu_count() or 1


def _machine_busy_s():
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    vals = [int(v) for v in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    # guest time is already counted in user/nice
    busy = sum(vals[:8]) - idle if len(vals) >= 8 else sum(vals) - idle
    return busy / _TICK


def _own_cpu_s():
    t = os.times()
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t.user + t.system + c.ru_utime + c.ru_stime


class Meter:
    """``with Meter() as m: ...`` then ``m.others`` (share of the machine used by other processes)."""

    def __enter__(self):
        self.b0, self.o0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1, o1, t1 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        self.wall = t1 - self.t0
        if self.b0 is None or b1 is None or self.wall <= 0:
            self.others = None
        else:
            others = (b1 - self.b0) - (o1 - self.o0)
            self.others = min(1.0, max(0.0, others / (self.wall * _NCPU)))
        return False


def others_now(window_s: float = 0.25):
    with Meter() as m:
        time.sleep(window_s)
    return m.others


class QuietGate:
    """Before a case: wait while other processes use more than ``threshold`` of the machine, at most ``per_case_s``
    per case and ``budget_s`` in all."""

    def __init__(self, threshold=0.15, per_case_s=8.0, budget_s=150.0):
        self.threshold, self.per_case_s, self.budget_s = threshold, per_case_s, budget_s
        self.spent = 0.0

    def wait(self) -> float:
        t0 = time.perf_counter()
        while self.spent + (time.perf_counter() - t0) < self.budget_s and time.perf_counter() - t0 < self.per_case_s:
            o = others_now()
            if o is None or o <= self.threshold:
                break
        waited = time.perf_counter() - t0
        self.spent += waited
        return waited
