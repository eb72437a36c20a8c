#!/usr/bin/env python3
"""Summarises what the test host's `experiment`, `qemu-count`,
`bench-boot` and `bench-hotplug` scenarios sent back (the data.jsonl that
tests/hwhost/run.sh writes) as Markdown tables: our call_rcu counts per
wake-up strategy and QEMU's for the same lifetimes (docs/rcu-lifetime.md),
the boot benchmark, ours beside QEMU microvm and q35, and the hot-plug
benchmark, ours beside QEMU q35's virtio-mem (tests/hwhost/README.md).

Usage: hwhost-report.py DATA.jsonl
"""

import collections
import json
import sys


def span(values, digits=0):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    f = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{v:.0f}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"


def main(path):
    ours = collections.defaultdict(list)
    qemu = collections.defaultdict(list)
    bench = collections.defaultdict(list)
    hp_bench = collections.defaultdict(list)
    for line in open(path):
        rec = json.loads(line)
        v = rec["value"]
        if not isinstance(v, dict):
            continue
        if v.get("bench") == "hotplug":
            hp_bench[(v["region"], v["plug_mib"], v["fill_mib"])].append(v)
        elif v.get("vmm") == "ours" and "rcu" in v:
            ours[(v["hotplug_cycles"], v["strategy"])].append(v)
        elif v.get("vmm") == "qemu" and "call_rcu1" in v:
            qemu[(v["hotplug_cycles"], v["dynamic_memslots"])].append(v)
        elif "start_to_shell_s" in v and "run" in v:
            bench[(v["cpus"], v["memory"])].append(v)

    def lifetime(cycles):
        return "boot -> shell -> poweroff" if not cycles else f"... + {cycles} x 1 GiB plug/unplug"

    if bench:
        print_bench(bench)
    if hp_bench:
        print_hotplug_bench(hp_bench)
    if not ours and not qemu:
        return
    print("Our vmm, 8 vCPUs, 4 GiB, Debian cloud kernel + busybox, on the test host's KVM:\n")
    print("| lifetime | wake-up | runs | call_rcu (= callbacks run) | grace periods | force_rcu "
          "| wake-ups (empty) | loop rounds | call_rcu thread CPU | vmm start to shell | poweroff to exit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (cycles, strategy), runs in sorted(ours.items()):
        r = [x["rcu"] for x in runs]
        assert all(x["call_rcu"] == x["callbacks_run"] for x in r)
        print(f"| {lifetime(cycles)} | {strategy} | {len(runs)} | {span([x['call_rcu'] for x in r])} "
              f"| {span([x['grace_periods'] for x in r])} | {span([x['force_rcu'] for x in r])} "
              f"| {span([x['wakeups'] for x in r])} ({span([x['empty_wakeups'] for x in r])}) "
              f"| {span([x['loops'] for x in r])} "
              f"| {span([x['thread_cpu_ns'] / 1e6 for x in r], 1)} ms "
              f"| {span([x['start_to_shell_s'] for x in runs], 1)} s "
              f"| {span([x['poweroff_to_exit_s'] for x in runs], 2)} s |")
    sites = collections.defaultdict(set)
    for (cycles, _), runs in ours.items():
        for x in runs:
            per_label = collections.Counter()
            for s in x["rcu"]["by_site"]:
                per_label[s["label"] or s["site"]] += s["calls"]
            for label, calls in per_label.items():
                sites[(cycles, label)].add(calls)
    if sites:
        print("\nOur call_rcu by call site (every run and strategy):\n")
        print("| lifetime | site | calls |")
        print("|---|---|---|")
        for (cycles, label), calls in sorted(sites.items()):
            print(f"| {lifetime(cycles)} | {label} | {span(sorted(calls))} |")

    if qemu:
        print("\nQEMU q35 (virtio-mem-pci), same kernel, initramfs and lifetimes, under the same "
              "KVM; call_rcu1 counted with uprobes:\n")
        print("| lifetime | dynamic-memslots | runs | call_rcu1 | drain_call_rcu | top callbacks |")
        print("|---|---|---|---|---|---|")
        for (cycles, dyn), runs in sorted(qemu.items()):
            top = collections.Counter()
            for x in runs:
                top.update(x["by_callback"])
            top_s = ", ".join(f"{k} {v // len(runs)}" for k, v in top.most_common(3))
            print(f"| {lifetime(cycles)} | {'on' if dyn else 'off'} | {len(runs)} "
                  f"| {span([x['call_rcu1'] for x in runs])} "
                  f"| {span([x['drain_call_rcu'] for x in runs])} | {top_s} |")


def print_bench(bench):
    order = {"ours": 0, "qemu-microvm": 1, "qemu-q35": 2}
    print("Boot benchmark on the test host (TCG: compare only side by side), ranges over runs:\n")
    print("| shape | VMM | runs | start to shell | `poweroff -f` to exit | set-up (start to first VM entry) "
          "| RSS outside guest RAM |")
    print("|---|---|---|---|---|---|---|")
    for (cpus, mem), recs in sorted(bench.items()):
        by = collections.defaultdict(list)
        for r in recs:
            by[r["vmm"]].append(r)
        for vmm in sorted(by, key=lambda k: order.get(k, 9)):
            rs = by[vmm]
            print(f"| {cpus} vCPUs, {mem} | {vmm} | {len(rs)} "
                  f"| {span([r['start_to_shell_s'] for r in rs], 1)} s "
                  f"| {span([r['poweroff_to_exit_s'] for r in rs], 2)} s "
                  f"| {span([r['setup_ms'] for r in rs])} ms "
                  f"| {span([r['rss_less_guest_mib'] for r in rs], 1)} MiB |")
    print()


def print_hotplug_bench(groups):
    order = {"ours": 0, "qemu-q35": 1, "qemu-q35-dynamic": 2}
    print("Hot-plug benchmark on the test host (TCG: compare only side by side), ranges over "
          "runs; CPU is the control thread's (ours: the main thread's control loop; QEMU: its "
          "main loop), from `qom-set requested-size` to MEMORY_DEVICE_SIZE_CHANGE with the size, "
          "and in parentheses less its idle rate (mean of before the plug and after the unplug) "
          "over the same time:\n")
    print("| shape | VMM | runs | idle control CPU (before / after) | plug: control CPU per GiB | plug: to size "
          "| plug: to guest MemTotal | unplug: control CPU per GiB | unplug: to size "
          "| unplug: to guest MemTotal | unplug: to RSS returned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (region, plug, fill), recs in sorted(groups.items()):
        by = collections.defaultdict(list)
        for r in recs:
            by[r["vmm"]].append(r)
        shape = f"{recs[0]['cpus']} vCPUs, {recs[0]['memory']}, {region} region, plug {plug} MiB"
        if fill:
            shape += f", guest fills {fill} MiB"
        for vmm in sorted(by, key=lambda k: order.get(k, 9)):
            rs = by[vmm]
            p, u = [r["plug"] for r in rs], [r["unplug"] for r in rs]
            print(f"| {shape} | {vmm} | {len(rs)} "
                  f"| {span([r.get('idle_before_ms_per_s') for r in rs], 2)} / "
                  f"{span([r.get('idle_after_ms_per_s') for r in rs], 2)} ms/s "
                  f"| {span([x['control_ms_per_gib'] for x in p], 1)} "
                  f"({span([x['control_net_ms_per_gib'] for x in p], 1)}) ms "
                  f"| {span([x['size_reached_s'] for x in p], 1)} s "
                  f"| {span([x['guest_visible_s'] for x in p], 1)} s "
                  f"| {span([x['control_ms_per_gib'] for x in u], 1)} "
                  f"({span([x['control_net_ms_per_gib'] for x in u], 1)}) ms "
                  f"| {span([x['size_reached_s'] for x in u], 1)} s "
                  f"| {span([x['guest_visible_s'] for x in u], 1)} s "
                  f"| {span([x['memory_returned_s'] for x in u], 1)} s |")
        ours = by.get("ours")
        if ours:
            slots = [r["plug"].get("slots") for r in ours]
            swaps = [r["plug"].get("map_swaps") for r in ours] + \
                [r["unplug"].get("map_swaps") for r in ours]
            print(f"\nOurs: {span(slots)} slots mapped by the plug, {span(swaps)} map swaps per "
                  "plug or unplug; control-thread CPU per map swap (plug, unplug): "
                  f"{span([r['plug']['control_cpu_ms'] / r['plug']['map_swaps'] for r in ours if r['plug'].get('map_swaps')], 2)}, "
                  f"{span([r['unplug']['control_cpu_ms'] / r['unplug']['map_swaps'] for r in ours if r['unplug'].get('map_swaps')], 2)} ms.")
            for vmm in sorted(by, key=lambda k: order.get(k, 9)):
                if vmm == "ours":
                    continue
                ratio = []
                for kind in ("plug", "unplug"):
                    a = sum(r[kind]["control_ms_per_gib"] for r in by[vmm]) / len(by[vmm])
                    b = sum(r[kind]["control_ms_per_gib"] for r in ours) / len(ours)
                    ratio.append(f"{kind} {a / b:.1f}x" if b > 0 else f"{kind} n/a")
                print(f"{vmm}'s control-thread CPU per GiB against ours (means): {', '.join(ratio)}.")
        keys = ("exits", "pf_fixed", "pages_4k", "pages_2m", "mmio_exits", "halt_exits",
                "remote_tlb_flush", "tlb_flush")
        if any(r["unplug"].get("kvm") for r in recs):
            print("\nWhat the test host's KVM counted in each window (debugfs, the VM's counters "
                  "and its vCPUs' summed), ranges over runs:\n")
            print("| VMM | window | " + " | ".join(keys) + " |")
            print("|---|---|" + "---|" * len(keys))
            for vmm in sorted(by, key=lambda k: order.get(k, 9)):
                for kind in ("plug", "unplug"):
                    ks = [r[kind].get("kvm") or {} for r in by[vmm]]
                    print(f"| {vmm} | {kind} | "
                          + " | ".join(span([k.get(key, 0) for k in ks]) for key in keys) + " |")
    print()


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
