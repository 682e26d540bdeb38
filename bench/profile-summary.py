#!/usr/bin/env python3
"""Sums a flat perf profile (bench/run --perf writes <id>-proxyN.self.txt)
into the few categories that explain a proxy's CPU: the kernel's scheduler
and wake-ups, the kernel's network stack and syscalls, libc's memcpy, and
Trellis's binary by crate (mimalloc, h2, hyper, tokio, bytes, ...).

    bench/profile-summary.py bench/results/profiles/*.self.txt
"""
import collections
import re
import sys

SCHED = re.compile(r"finish_task_switch|spin_unlock|schedule|futex|try_to_wake|select_task|"
                   r"enqueue|dequeue|pick_next|switch_|__switch|update_curr|ttwu|wake_up")


def category(dso, sym):
    if dso.startswith("[kernel"):
        return "kernel: scheduler, wake-ups" if SCHED.search(sym) else "kernel: network, syscalls, other"
    if dso.startswith("libc"):
        return "libc: memcpy, memmove, memcmp" if re.search(r"mem(cpy|move|cmp|set)", sym) else "libc: other"
    if dso == "trellis":
        name = re.sub(r"^(<|impl |dyn )+", "", sym)
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", name)
        crate = m.group(1) if m else "?"
        if crate.startswith(("_mi_", "mi_")):
            crate = "mimalloc"
        elif crate.startswith("ring_core"):
            crate = "ring (crypto)"
        return "trellis binary: " + crate
    return dso


for path in sys.argv[1:]:
    totals = collections.Counter()
    for line in open(path, errors="replace"):
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if m:
            totals[category(m.group(2), m.group(3).strip())] += float(m.group(1))
    print(f"== {path.rsplit('/', 1)[-1]} ({sum(totals.values()):.0f}% of samples)")
    for name, pct in totals.most_common(12):
        print(f"  {pct:5.1f}%  {name}")
