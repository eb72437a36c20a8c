"""The scenarios of the hardware-virtualization test host, run inside it (L1)
by its /init: each boots the distribution kit (L2) with our `vmm` on L1's
real-semantics /dev/kvm and checks what the guest itself reports.

Usage: hwhost_driver.py --results PATH [--runs N] -- SCENARIO...

Results go to PATH (the second serial port) as JSON lines, one object each:
  {"t": "begin", "scenario": S}
  {"t": "check", "scenario": S, "check": NAME, "ok": BOOL, "detail": ...}
  {"t": "figure", "scenario": S, "name": NAME, "value": X, "unit": U}
  {"t": "data", "scenario": S, "name": NAME, "value": OBJ}
  {"t": "end", "scenario": S, "ok": BOOL, "secs": X, "error": TEXT}
  {"t": "done"}
The host side (monitor.py) turns them into a report and an exit status.
Each scenario lives in the module named for its kind (lifecycle, hotplug,
hotplug_numa, reboot, cargo_tests, comparisons).
"""

import argparse
import os
import sys
import threading
import time
import traceback

import l2_vm
import tracing
from cargo_tests import cargo_tests
from comparisons import bench_boot, bench_hotplug, experiment, fault_rate, qemu_count
from hotplug import demo, hotplug, hotplug_memfd
from hotplug_numa import hotplug_numa
from l2_vm import Failed
from lifecycle import lifecycle_1cpu, lifecycle_2cpu, lifecycle_8cpu, reset_during_command
from reboot import reboot_in_place
from results import Results


SCENARIOS = {
    "lifecycle-1cpu": lifecycle_1cpu,
    "lifecycle-2cpu": lifecycle_2cpu,
    "lifecycle-8cpu": lifecycle_8cpu,
    "reset-during-command": reset_during_command,
    "hotplug": hotplug,
    "hotplug-memfd": hotplug_memfd,
    "hotplug-numa": hotplug_numa,
    "reboot-in-place": reboot_in_place,
    "cargo-tests": cargo_tests,
    "experiment": experiment,
    "demo": demo,
    "qemu-count": qemu_count,
    "bench-boot": bench_boot,
    "bench-hotplug": bench_hotplug,
    "fault-rate": fault_rate,
}


# How often the driver says it is alive on the test host's console.
HEARTBEAT_S = 60
HEARTBEAT = "hwhost: driver heartbeat"


def heartbeat():
    """Prints a line every HEARTBEAT_S seconds, from a thread of its own,
    whatever the scenarios wait for: a test host silent for much longer is
    not running its user space at all (run.sh's rules)."""
    t0 = time.monotonic()
    while True:
        time.sleep(HEARTBEAT_S)
        print(f"{HEARTBEAT} {time.monotonic() - t0:.0f} s", flush=True)


def main():
    threading.Thread(target=heartbeat, daemon=True).start()
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--cycles", type=int)
    ap.add_argument("--reboots", type=int, help="fault-rate: `reboot -f` in place per lifetime")
    ap.add_argument("--plug-mib", type=int)
    ap.add_argument("--fill-mib", type=int)
    ap.add_argument("--vmms", help="bench-hotplug: the sides to run, comma-separated "
                    "(ours,qemu-q35,qemu-q35-dynamic; default all)")
    ap.add_argument("--loud", action="store_true", help="guest kernels without 'quiet'")
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args()
    if args.loud:
        l2_vm.GUEST_QUIET.clear()
    # Every vmm logs at info (unless VMM_LOG says otherwise): a guest reset
    # or power-off then says on stderr, echoed to the test host's console,
    # what asked for it (a device, or a triple fault), so a VM that ends by
    # surprise in any scenario can be told apart. Info has a handful of
    # messages, none per exit.
    os.environ.setdefault("VMM_LOG", "info")
    res = Results(args.results)
    no_trace = tracing.watch_shutdowns()
    if no_trace:
        print(f"hwhost: guest triple faults will not be traced: {no_trace}", flush=True)
    for s in args.scenarios:
        res.scenario = s
        res.emit({"t": "begin"})
        print(f"hwhost: scenario {s} begins", flush=True)
        t0 = time.monotonic()
        ok, err = True, None
        fn = SCENARIOS.get(s)
        try:
            if fn is None:
                raise Failed(f"unknown scenario (known: {', '.join(SCENARIOS)})")
            fn(res, args)
        except Failed as e:
            ok, err = False, str(e)
        except Exception:  # a bug in the driver or the guest misbehaving
            ok, err = False, traceback.format_exc()
        secs = round(time.monotonic() - t0, 1)
        # A triple fault of any L2 guest in this scenario, expected or not,
        # with where the guest was (the vmm's own log cannot say, above).
        for line in tracing.shutdown_exits():
            res.figure("KVM shutdown exit (guest triple fault) in the test host", line)
        res.emit({"t": "end", "ok": ok, "secs": secs, "error": err})
        print(f"hwhost: scenario {s} {'passed' if ok else 'FAILED'} in {secs} s", flush=True)
        if err:
            # Indented: the reason may quote guest console lines, which
            # run.sh must not take for the test host's own kernel messages.
            print("\n".join(f"  | {line}" for line in err.splitlines()), flush=True)
    res.scenario = None
    res.emit({"t": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
