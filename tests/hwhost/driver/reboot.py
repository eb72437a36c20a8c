"""Reboot in place (`--on-reset restart`) with hot-plugged memory used by a
guest program: the reset unplugs everything, the rebooted guest plugs the
requested size again by itself, and reboots leave the vmm's RSS, mappings
and descriptors flat."""

import os
import time

from guest_checks import (GIB, boot, check_rcu_file, meminfo_kib, wait_memtotal, wait_shell,
                          wait_size)
from l2_vm import Failed, Vm, proc_maps


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def memscan(vm, addr, mib):
    """The guest's own reading of guest physical memory [addr, addr + mib
    MiB) through /proc/kcore (tests/guest/memscan.c), as a dict of its
    counts."""
    out = vm.sh_ok(f"memscan {addr:#x} {mib}", timeout=1800)
    line = next((ln for ln in out.splitlines() if ln.startswith("MEMSCAN ok ")), None)
    if line is None:
        raise Failed(f"memscan {addr:#x} {mib}: {out.strip()!r}")
    return {k: int(v) for k, v in (f.split("=") for f in line.split()[2:])}


def reboot_in_place(res, args):
    """2 vCPUs, 1 GiB, 2 GiB hot-plug region, `--on-reset restart`: plug
    1 GiB, `memcheck 768` writes and verifies a pattern in it (the guest's
    `memscan` of the region through /proc/kcore must then find pages with
    that pattern: the check below can see it), `reboot -f`: RESET
    (guest-reset) over QMP, the same process, nothing plugged or mapped,
    requested-size kept; the rebooted guest plugs 1 GiB again and its
    `memscan` of the region finds no page of the pattern (the memory is
    fresh), then memcheck passes again; then REBOOTS more `reboot -f` in a row (default 10): RSS,
    mappings and descriptors after the last within a small margin of after
    the second; `poweroff -f` -> exit 0 and callbacks_run == call_rcu."""
    reboots = args.cycles or 10
    # The driver runs every vmm with VMM_LOG=info: each reset says on
    # stderr what asked for it (a device, or a triple fault).
    vm = Vm("reboot", 2, "1G", hotplug="2G", extra=["--on-reset", "restart"])
    try:
        boot(res, vm)
        vm.connect_qmp()
        base_kib = meminfo_kib(vm)
        vm.cmd("qom-set", path="vmem0", property="requested-size", value=GIB)
        wait_size(vm, GIB, 600)
        wait_memtotal(vm, base_kib + GIB // 1024, 120)
        out = vm.sh_ok("memcheck 768", timeout=1800)
        res.check("first boot: memcheck 768 in plugged memory", "MEMCHECK ok" in out, out.strip())
        addr = vm.cmd("query-memory-devices")[0]["data"]["memaddr"]
        region_mib = 2048
        before = memscan(vm, addr, region_mib)
        res.data("memscan of the region before the reboot", before)
        res.check("first boot: the guest reads memcheck's pattern in the region (memscan)",
                  before["pattern"] > 0, before)
        res.figure("region pages holding memcheck's pattern before the reboot",
                   before["pattern"])
        rss_filled = vm.rss_kib()
        res.figure("vmm RSS with 768 MiB filled", rss_filled // 1024, "MiB")
        pid = vm.pid
        samples = {}
        for n in range(1, reboots + 1):
            ev0 = len(vm.pull_events())
            start = vm.mark()
            t0 = time.monotonic()
            vm.type("reboot -f\n")
            ev = vm.wait_event("RESET", 300, after=ev0)
            res.check(f"reboot {n}: RESET guest-reset",
                      ev["data"] == {"guest": True, "reason": "guest-reset"}, ev)
            if n == 1:
                dev = vm.cmd("query-memory-devices")[0]["data"]
                hp = vm.cmd("x-query-hotplug")
                res.check("after the reset: nothing plugged, requested-size kept",
                          dev["size"] == 0 and dev["requested-size"] == GIB, dev)
                res.check("after the reset: no slot mapped", not hp["mapped-slots"],
                          hp["mapped-slots"][:2])
            wait_shell(vm, start)
            res.check(f"reboot {n}: same vmm process", vm.pid == pid and vm.proc.poll() is None)
            wait_size(vm, GIB, 600)
            got = wait_memtotal(vm, base_kib + GIB // 1024, 120)
            if n == 1:
                res.figure("reset to the rebooted guest's shell",
                           round(time.monotonic() - t0, 1), "s")
                res.check("rebooted guest: MemTotal has the 1 GiB again",
                          got == base_kib + GIB // 1024, {"base_kib": base_kib, "now_kib": got})
                after = memscan(vm, addr, region_mib)
                res.data("memscan of the region after the reboot", after)
                res.check("rebooted guest: no page of the region holds memcheck's pattern",
                          after["pattern"] == 0, {"before": before, "after": after})
                res.figure("region pages non-zero after the reboot (the guest kernel's own use)",
                           after["nonzero"])
                out = vm.sh_ok("memcheck 768", timeout=1800)
                res.check("rebooted guest: memcheck 768 in plugged memory",
                          "MEMCHECK ok" in out, out.strip())
                rss = vm.rss_kib()
                res.check("host RSS did not grow across the reboot (64 MiB margin)",
                          rss <= rss_filled + 64 * 1024,
                          {"before_kib": rss_filled, "after_kib": rss})
            if n in (2, reboots):
                time.sleep(2)  # retired slots are unmapped after a grace period
                samples[n] = {"rss_kib": vm.rss_kib(), "maps": len(proc_maps(pid)),
                              "fds": fd_count(pid)}
                res.data(f"after reboot {n}", samples[n])
        if reboots >= 3:
            a, b = samples[2], samples[reboots]
            res.check(f"reboots 2 -> {reboots}: RSS flat (64 MiB margin)",
                      b["rss_kib"] <= a["rss_kib"] + 64 * 1024, {"after_2": a, "after_last": b})
            res.check(f"reboots 2 -> {reboots}: mappings flat",
                      b["maps"] <= a["maps"] + 2, {"after_2": a, "after_last": b})
            res.check(f"reboots 2 -> {reboots}: descriptors flat",
                      b["fds"] <= a["fds"], {"after_2": a, "after_last": b})
        vm.type("poweroff -f\n")
        status = vm.wait_exit(300)
        res.check("poweroff -f ends the vmm with status 0", status == 0, status)
        check_rcu_file(res, vm)
    finally:
        vm.kill()
