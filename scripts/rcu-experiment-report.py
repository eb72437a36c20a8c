#!/usr/bin/env python3
"""Summarises scripts/rcu-experiment.sh's runs as a Markdown table.

Usage: rcu-experiment-report.py [DIR]   (default target/rcu-experiment)
"""

import json
import statistics
import sys
from pathlib import Path


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if digits else f"{v:.0f}"


def main(root):
    rows = []
    for cfg in sorted(Path(root).glob("cpus*-*")):
        cpus, strategy = cfg.name[4:].split("-", 1)
        runs = []
        for run in sorted(cfg.glob("run*")):
            try:
                rcu = json.loads((run / "rcu.json").read_text())
                ses = json.loads((run / "session.json").read_text())
            except (OSError, ValueError):
                continue
            cyc = ses.get("cycles", [])
            runs.append({
                "call_rcu": rcu["call_rcu"],
                "callbacks_run": rcu["callbacks_run"],
                "grace_periods": rcu["grace_periods"],
                "force_rcu": rcu["force_rcu"],
                "wakeups": rcu["wakeups"],
                "empty_wakeups": rcu["empty_wakeups"],
                "loops": rcu["loops"],
                "cpu_us": rcu["thread_cpu_ns"] / 1000,
                "lat_p99_ms": rcu["latency"]["p99_ns"] / 1e6,
                "lat_max_ms": rcu["latency"]["max_ns"] / 1e6,
                "unplug_s": med([c["unplug_s"] for c in cyc]),
                "unplug_min_s": min((c["unplug_s"] for c in cyc), default=None),
                "unmap_us": med([c["retire_to_unmap_us"] for c in cyc]),
                "unmap_min_us": min((c["retire_to_unmap_us"] for c in cyc), default=None),
                "swap_us": med([c["last_swap_us"] for c in cyc]),
                "swap_min_us": min((c["last_swap_us"] for c in cyc), default=None),
                "uptime_s": rcu["uptime_ms"] / 1000,
                "sites": {s["label"] or s["site"]: s["calls"] for s in rcu["by_site"]},
            })
        if runs:
            rows.append((int(cpus), strategy, runs))
    rows.sort()
    print("| vCPUs | wake-up | runs | call_rcu | callbacks run | grace periods | force_rcu "
          "| wake-ups (empty) | loop rounds | call_rcu thread CPU | call-to-callback p99 / max "
          "| unplug request to memory returned | retire to munmap | map swap cost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cpus, strategy, runs in rows:
        m = lambda k: med([r[k] for r in runs])  # noqa: E731
        lo = lambda k: min((r[k] for r in runs if r[k] is not None), default=None)  # noqa: E731

        def spread(k, digits=0):
            lo_k, hi_k = lo(k), max((r[k] for r in runs if r[k] is not None), default=None)
            if lo_k == hi_k:
                return fmt(m(k), digits)
            return f"{fmt(m(k), digits)} [{fmt(lo_k, digits)}-{fmt(hi_k, digits)}]"

        print(f"| {cpus} | {strategy} | {len(runs)} | {fmt(m('call_rcu'))} | {fmt(m('callbacks_run'))} "
              f"| {spread('grace_periods')} | {fmt(m('force_rcu'))} "
              f"| {spread('wakeups')} ({spread('empty_wakeups')}) | {spread('loops')} "
              f"| {fmt(m('cpu_us'))} us | {fmt(m('lat_p99_ms'), 1)} / {fmt(m('lat_max_ms'), 1)} ms "
              f"| {fmt(m('unplug_s'), 1)} s ({fmt(lo('unplug_min_s'), 1)} s) "
              f"| {fmt(m('unmap_us'))} us ({fmt(lo('unmap_min_us'))} us) "
              f"| {fmt(m('swap_us'))} us ({fmt(lo('swap_min_us'))} us) |")
    print()
    print("Medians over runs, [range] where runs differ; per run, the timing figures are medians "
          "over its cycles, and (the smallest single cycle of all runs) follows them.")
    sites = {}
    for _, _, runs in rows:
        for r in runs:
            for k, v in r["sites"].items():
                sites.setdefault(k, []).append(v)
    print()
    print("call_rcu per VM lifetime by call site (median over all runs): " + ", ".join(
        f"{k} {fmt(statistics.median(v))}" for k, v in sorted(sites.items(), key=lambda kv: -statistics.median(kv[1]))))


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    if len(sys.argv) > 2:
        sys.exit(__doc__)
    main(sys.argv[1] if len(sys.argv) > 1 else "target/rcu-experiment")
