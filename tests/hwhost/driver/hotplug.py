"""Memory hot-plug used by guest user space, and the demo built on it."""

import json
import os
import time

from guest_checks import (GIB, boot, meminfo_kib, power_off_after_hotplug, site_calls,
                          wait_memtotal, wait_size)
from l2_vm import MIB, Vm, new_ranges, proc_maps, vm_flags


def hotplug(res, args):
    """2 vCPUs, 1 GiB, 4 GiB hot-plug region. Three cycles: plug 2 GiB over
    QMP, the guest onlines it, a guest program fills and verifies 1.5 GiB,
    unplug to 0, the guest offlines it, the host gets the memory back."""
    cycles = args.cycles or 3
    plug = (args.plug_mib or 2048) * MIB
    fill_mib = args.fill_mib or 1536
    vm = Vm("hotplug", 2, "1G", hotplug="4G")
    try:
        boot(res, vm)
        vm.connect_qmp()
        base_kib = meminfo_kib(vm)
        rss0 = vm.rss_kib()
        res.figure("vmm RSS before the first plug", rss0 // 1024, "MiB")
        for c in range(1, cycles + 1):
            rcu0 = vm.cmd("x-query-rcu")
            hp0 = vm.cmd("x-query-hotplug")
            ev0 = len(vm.pull_events())
            maps0 = proc_maps(vm.pid)
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=plug)
            plug_s = wait_size(vm, plug, 600)
            vm.wait_event("MEMORY_DEVICE_SIZE_CHANGE", 30, lambda e: e["data"]["size"] == plug,
                          after=ev0)
            hp1 = vm.cmd("x-query-hotplug")
            slots = hp1["mapped-slots"]
            res.check(f"cycle {c}: one mapped slot per 128 MiB plugged",
                      len(slots) * hp1["slot-size"] == plug,
                      {"slots": len(slots), "slot_size": hp1["slot-size"]})
            res.check(f"cycle {c}: x-query-hotplug gives no host addresses",
                      all("host" not in s for s in slots), slots[:2])
            # The slots' mappings, found in /proc/PID/maps: whole slots, at
            # least the plugged size.
            mapped = new_ranges(maps0, proc_maps(vm.pid), hp1["slot-size"])
            res.check(f"cycle {c}: the plug mapped at least the plugged size",
                      sum(b - a for a, b in mapped) >= plug,
                      [(hex(a), b - a) for a, b in mapped][:4])
            undumped = [hex(a) for a, _ in mapped if "dd" not in vm_flags(vm.pid, a)]
            res.check(f"cycle {c}: plugged slots are left out of core dumps", not undumped,
                      undumped[:4])
            got = wait_memtotal(vm, base_kib + plug // 1024, 120)
            res.check(f"cycle {c}: guest MemTotal grew by the plugged size",
                      got == base_kib + plug // 1024,
                      {"before_kib": base_kib, "after_kib": got, "plugged_kib": plug // 1024})
            out = vm.sh_ok(f"memcheck {fill_mib}", timeout=600)
            res.check(f"cycle {c}: guest program filled and verified {fill_mib} MiB",
                      f"MEMCHECK ok mib={fill_mib} " in out, out.strip())
            rss_full = vm.rss_kib()
            # The guest's free memory was below the plugged size's worth
            # while the program ran only if plugged memory was used; the
            # host side shows it directly: RSS grew by what was filled.
            res.figure(f"cycle {c}: vmm RSS with {fill_mib} MiB filled", rss_full // 1024, "MiB")
            ev1 = len(vm.pull_events())
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=0)
            unplug_s = wait_size(vm, 0, 900)
            vm.wait_event("MEMORY_DEVICE_SIZE_CHANGE", 30, lambda e: e["data"]["size"] == 0,
                          after=ev1)
            got = wait_memtotal(vm, base_kib, 120)
            res.check(f"cycle {c}: guest MemTotal back to its base", got == base_kib,
                      {"base_kib": base_kib, "now_kib": got})
            # The slots are unmapped by a call_rcu callback after a grace
            # period (force_rcu): give it a moment, then look.
            deadline = time.monotonic() + 30
            while True:
                hp2 = vm.cmd("x-query-hotplug")
                maps = proc_maps(vm.pid)
                left = [(hex(sa), a, b) for sa, sb in mapped for (a, b) in maps
                        if a < sb and sa < b]
                rss = vm.rss_kib()
                if (not hp2["mapped-slots"] and not left and rss <= rss0 + 64 * 1024) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            res.check(f"cycle {c}: no slot mapped after unplug", not hp2["mapped-slots"],
                      hp2["mapped-slots"])
            res.check(f"cycle {c}: the slots' host mappings are gone", not left, left[:4])
            res.check(f"cycle {c}: vmm RSS back within 64 MiB of before the plug",
                      rss <= rss0 + 64 * 1024, {"before_kib": rss0, "now_kib": rss})
            rcu1 = vm.cmd("x-query-rcu")
            st0, st2 = hp0["stats"], hp2["stats"]
            swaps = st2["map_swaps"] - st0["map_swaps"]
            retires = st2["retire_events"] - st0["retire_events"]
            d_call = rcu1["call_rcu"] - rcu0["call_rcu"]
            d_force = rcu1["force_rcu"] - rcu0["force_rcu"]
            res.check(f"cycle {c}: call_rcu == map swaps + slot retirements",
                      d_call == swaps + retires and
                      site_calls(rcu1, "memory map replace") - site_calls(rcu0, "memory map replace")
                      == swaps and
                      site_calls(rcu1, "hot-plug slot unmapped")
                      - site_calls(rcu0, "hot-plug slot unmapped") == retires,
                      {"call_rcu": d_call, "swaps": swaps, "retires": retires})
            res.check(f"cycle {c}: one force_rcu per retirement", d_force == retires,
                      {"force_rcu": d_force, "retires": retires})
            res.figure(f"cycle {c}: plug 2 GiB (QMP to size reached)", round(plug_s, 1), "s")
            res.figure(f"cycle {c}: unplug to 0 (QMP to size 0)", round(unplug_s, 1), "s")
            res.figure(f"cycle {c}: vmm RSS after unplug", rss // 1024, "MiB")
            res.figure(f"cycle {c}: call_rcu / force_rcu / map swaps / retirements",
                       f"{d_call} / {d_force} / {swaps} / {retires}")
        power_off_after_hotplug(res, vm)
    finally:
        vm.kill()


def memfd_lines(pid):
    """(start, end, perms) of PID's mappings of hot-plug slot memfds."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:vmm-hotplug-slot" in line:
                rng, perms = line.split()[:2]
                a, b = (int(x, 16) for x in rng.split("-"))
                out.append((a, b, perms))
    return out


def memfd_fds(pid):
    """Descriptors of PID that are hot-plug slot memfds."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:vmm-hotplug-slot"):
                n += 1
        except OSError:
            pass
    return n


def hotplug_memfd(res, args):
    """Backing options with guest user space writing the memory: 2 vCPUs,
    1 GiB, a 4 GiB region backed by one sealed memfd per slot with
    prealloc=on. Each cycle plugs 1 GiB (--plug-mib): right after the guest
    sees it plugged, before anything in the guest touched it, the vmm's RSS
    has grown by the plugged size (populated before the guest was told) and
    the plugged memory is the slots' memfds, shared and writable; then
    memcheck writes and verifies 768 MiB (--fill-mib) in the guest; the
    unplug to 0 closes every memfd and unmaps it, and RSS goes back."""
    cycles = args.cycles or 2
    plug = (args.plug_mib or 1024) * MIB
    fill_mib = args.fill_mib or 768
    backing = "backend=memfd,prealloc=on"
    vm = Vm("hotplug-memfd", 2, "1G", hotplug=f"size=4G,{backing}")
    try:
        boot(res, vm)
        vm.connect_qmp()
        base_kib = meminfo_kib(vm)
        rss0 = vm.rss_kib()
        hp = vm.cmd("x-query-hotplug")
        res.check("x-query-hotplug names the backing",
                  hp.get("backing") == backing + ",thp=off", hp.get("backing"))
        res.check("no slot memfd before the first plug", memfd_fds(vm.pid) == 0,
                  memfd_fds(vm.pid))
        for c in range(1, cycles + 1):
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=plug)
            plug_s = wait_size(vm, plug, 600)
            rss_plugged = vm.rss_kib()
            lines = memfd_lines(vm.pid)
            mapped = sum(b - a for a, b, _ in lines)
            res.check(f"cycle {c}: the plugged memory is mapped from slot memfds, shared",
                      mapped == plug and all(p == "rw-s" for _, _, p in lines),
                      {"mapped": mapped, "lines": len(lines)})
            res.check(f"cycle {c}: one memfd per mapped slot",
                      memfd_fds(vm.pid) == len(vm.cmd("x-query-hotplug")["mapped-slots"]),
                      memfd_fds(vm.pid))
            res.check(f"cycle {c}: RSS covers the plug before the guest touches it (prealloc)",
                      rss_plugged - rss0 >= plug // 1024,
                      {"before_kib": rss0, "plugged_kib": rss_plugged})
            got = wait_memtotal(vm, base_kib + plug // 1024, 120)
            res.check(f"cycle {c}: guest MemTotal grew by the plugged size",
                      got == base_kib + plug // 1024, {"base_kib": base_kib, "now_kib": got})
            out = vm.sh_ok(f"memcheck {fill_mib}", timeout=600)
            res.check(f"cycle {c}: guest program filled and verified {fill_mib} MiB",
                      f"MEMCHECK ok mib={fill_mib} " in out, out.strip())
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=0)
            unplug_s = wait_size(vm, 0, 900)
            deadline = time.monotonic() + 30
            while True:
                left, fds, rss = memfd_lines(vm.pid), memfd_fds(vm.pid), vm.rss_kib()
                if (not left and not fds and rss <= rss0 + 64 * 1024) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            res.check(f"cycle {c}: memfds unmapped and closed after the unplug",
                      not left and fds == 0, {"mappings": len(left), "fds": fds})
            res.check(f"cycle {c}: vmm RSS back within 64 MiB of before the plug",
                      rss <= rss0 + 64 * 1024, {"before_kib": rss0, "now_kib": rss})
            res.figure(f"cycle {c}: plug {plug >> 20} MiB with prealloc (QMP to size reached)",
                       round(plug_s, 1), "s")
            res.figure(f"cycle {c}: unplug to 0 (QMP to size 0)", round(unplug_s, 1), "s")
        power_off_after_hotplug(res, vm)
    finally:
        vm.kill()


def demo(res, args):
    """The main job on the test host (scripts/demo.sh --hwhost): the
    distribution kernel with 2 vCPUs, commands on its shell, 1 GiB plugged
    over QMP, a guest program filling and verifying 768 MiB of it, the
    unplug, poweroff, and the RCU lifetime report (JSON, SVG plot and the
    exit table) sent back as data."""
    plot = "/tmp/demo/rcu.svg"
    vm = Vm("demo", 2, "512M", hotplug="2G", extra=["--rcu-plot", plot])
    try:
        boot(res, vm)
        vm.sh_ok("uname -a; grep -c ^processor /proc/cpuinfo; free -m")
        vm.connect_qmp()
        rss0 = vm.rss_kib()
        print(f"demo: plugging 1 GiB over QMP (vmm RSS {rss0 // 1024} MiB)", flush=True)
        vm.cmd("qom-set", path="vmem0", property="requested-size", value=GIB)
        res.figure("plug 1 GiB: QMP to size reached", round(wait_size(vm, GIB, 600), 1), "s")
        vm.sh_ok("free -m")
        out = vm.sh_ok("memcheck 768", timeout=1800)
        res.check("a guest program filled and verified 768 MiB", "MEMCHECK ok" in out, out)
        res.figure("vmm RSS with the program's memory", vm.rss_kib() // 1024, "MiB")
        vm.cmd("qom-set", path="vmem0", property="requested-size", value=0)
        res.figure("unplug: QMP to size 0", round(wait_size(vm, 0, 900), 1), "s")
        time.sleep(2)
        res.figure("vmm RSS after the unplug", vm.rss_kib() // 1024, "MiB")
        vm.sh_ok("free -m")
        vm.type("poweroff -f\n")
        status = vm.wait_exit(300)
        res.check("poweroff -f ends the vmm with status 0", status == 0, status)
        with open(vm.stats_path) as f:
            res.data("rcu.json", json.load(f))
        with open(plot) as f:
            res.data("rcu.svg", f.read())
        res.data("vmm-stderr", vm.stderr.decode(errors="replace"))
        with open(vm.metrics_path) as f:
            res.data("metrics.json", json.load(f))
    finally:
        vm.kill()
