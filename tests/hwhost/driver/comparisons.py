"""Figures side by side: the seed's experiment with our vmm, QEMU's
call_rcu count over the same lifetimes, and boot times against QEMU, all
under the test host's KVM with the same kernel and initramfs."""

import json
import os
import re
import threading
import time

import l2_vm
from guest_checks import GIB, boot, lifetime, meminfo_kib, wait_shell, wait_size
from l2_vm import L2_INITRD, L2_KERNEL, MIB, Failed, Vm, parse_size
from tracing import Trace, load_base, rss_less_guest_kib, shutdown_exits


def experiment(res, args):
    """The seed's experiment at the seed's shape: 8 vCPUs, 4 GiB, boot ->
    shell -> poweroff, for both wake-up strategies, RUNS times each; then
    the same with CYCLES hot-plug cycles of 1 GiB. Sends each lifetime's
    RCU report (less its timeline) as data."""
    runs = args.runs or 3
    cycles = args.cycles if args.cycles is not None else 5
    for hp in (False, True):
        for r in range(1, runs + 1):
            for strategy in ("event", "semaphore"):
                name = f"exp-{strategy}-{'hp' if hp else 'boot'}-{r}"
                vm = Vm(name, 8, "4G", hotplug="4G" if hp else None,
                        extra=["--rcu-wakeup", strategy])
                try:
                    shell_s, off_s = lifetime(res, vm, cycles if hp else 0, GIB)
                    with open(vm.stats_path) as f:
                        s = json.load(f)
                    s.pop("timeline", None)
                    res.check(f"{name}: callbacks_run == call_rcu",
                              s["callbacks_run"] == s["call_rcu"], s["call_rcu"])
                    res.data(name, {"vmm": "ours", "strategy": strategy,
                                    "hotplug_cycles": cycles if hp else 0,
                                    "wall_s": round(vm.t_exit - vm.t_start, 1),
                                    "start_to_shell_s": round(shell_s, 1),
                                    "poweroff_to_exit_s": round(off_s, 2), "rcu": s})
                    res.figure(f"{name}: call_rcu / wake-ups / empty / loops",
                               f"{s['call_rcu']} / {s['wakeups']} / {s['empty_wakeups']} / "
                               f"{s['loops']}")
                finally:
                    vm.kill()


QEMU = "/opt/qemu/qemu-system-x86_64"
QEMU_SYMBOLS = "/opt/qemu/symbols.txt"
QEMU_CMDLINE = "console=ttyS0 memhp_default_state=online_movable"


def qemu_argv(machine, cpus, memory, hotplug=None, dynamic=False, reserve=True,
              reboot=False):
    """QEMU under L1's KVM with the same kernel and initramfs as ours.
    q35 carries virtio-mem-pci when HOTPLUG is given (DYNAMIC: its
    dynamic-memslots=on, slot by slot as our vmm always maps; RESERVE
    False: the backend's reserve=off, MAP_NORESERVE, so a region larger
    than the test host's memory is only address space, as ours is).
    A guest reset ends QEMU (-no-reboot) unless REBOOT."""
    argv = [QEMU, "-L", "/opt/qemu/share", "-accel", "kvm", "-cpu", "host",
            "-smp", str(cpus), "-kernel", L2_KERNEL, "-initrd", L2_INITRD,
            "-append", " ".join([QEMU_CMDLINE, *l2_vm.GUEST_QUIET]), "-display", "none",
            "-nodefaults", *([] if reboot else ["-no-reboot"]),
            "-serial", "stdio", "-qmp", "unix:{qmp},server=on,wait=off"]
    if machine == "microvm":
        return argv + ["-M", "microvm", "-bios", "/opt/qemu/share/qboot.rom", "-m", memory]
    if not hotplug:
        return argv + ["-M", "q35", "-m", memory]
    return argv + ["-M", "q35", "-m", f"{memory},maxmem={parse_size(memory) + parse_size(hotplug)},"
                   "slots=1", "-object", f"memory-backend-ram,id=mem0,size={hotplug}"
                   + ("" if reserve else ",reserve=off"),
                   "-device", "virtio-mem-pci,id=vmem0,memdev=mem0,requested-size=0,"
                   f"dynamic-memslots={'on' if dynamic else 'off'}"]


def need_qemu(res):
    res.check("QEMU is in the test host (run.sh --qemu-files)", os.path.exists(QEMU), QEMU)


def qemu_count(res, args):
    """QEMU's call_rcu1 count over the same lifetimes as the experiment's,
    under L1's KVM: q35 (8 vCPUs, 4 GiB), boot -> shell -> poweroff, then
    with CYCLES hot-plug cycles of 1 GiB on virtio-mem-pci, with
    dynamic-memslots off (QEMU's default) and on."""
    need_qemu(res)
    runs = args.runs or 1
    cycles = args.cycles if args.cycles is not None else 5
    tr = Trace(QEMU, QEMU_SYMBOLS)
    try:
        for variant, hp, dyn in (("boot", False, False), ("hp", True, False),
                                 ("hp-dynamic", True, True)):
            for r in range(1, runs + 1):
                name = f"qemu-q35-{variant}-{r}"
                # QEMU q35 in the test host now and then resets or stalls
                # during boot (seen once each in ~10 boots; our vmm has not):
                # such a lifetime is started again, and says so.
                for attempt in range(1, 4):
                    tr.clear()
                    argv = qemu_argv("q35", 8, "4G", "4G" if hp else None, dyn)
                    vm = Vm(f"{name}-a{attempt}", 8, "4G", argv=argv)
                    try:
                        time.sleep(1)
                        base = load_base(vm.pid, QEMU)
                        _, off_s = lifetime(res, vm, cycles if hp else 0, GIB, limit=300)
                        break
                    except Failed as e:
                        res.figure(f"{name}: attempt {attempt} failed, started again",
                                   str(e).splitlines()[0][:300])
                        if attempt == 3:
                            raise
                    finally:
                        vm.kill()
                c = tr.read(vm.pid, base)
                res.data(name, {"vmm": "qemu", "machine": "q35", "hotplug_cycles":
                                cycles if hp else 0, "dynamic_memslots": dyn,
                                "attempts": attempt,
                                "wall_s": round(vm.t_exit - vm.t_start, 1),
                                "poweroff_to_exit_s": round(off_s, 2),
                                "call_rcu1": c["call_rcu1"],
                                "drain_call_rcu": c["drain_call_rcu"],
                                "by_callback": c["by_callback"]})
                res.figure(f"{name}: call_rcu1", c["call_rcu1"])
                res.check(f"{name}: uprobes counted calls", c["call_rcu1"] > 0, c)
    finally:
        tr.stop()


def bench_boot(res, args):
    """Side by side in one run, same kernel and initramfs: our vmm, QEMU
    microvm and QEMU q35, each started RUNS times per shape: vmm start to
    the shell, `poweroff -f` to exit, set-up (start to the first VM entry,
    from the kvm_entry tracepoint, the same for every VMM), and resident
    memory outside the guest's RAM at the shell."""
    need_qemu(res)
    runs = args.runs or 3
    tr = Trace(vm_entries=True)
    try:
        for cpus, mem in ((2, "512M"), (8, "4G")):
            for r in range(1, runs + 1):
                for who in ("ours", "qemu-microvm", "qemu-q35"):
                    name = f"bench-{who}-{cpus}cpu-{r}"
                    tr.clear()
                    if who == "ours":
                        vm = Vm(name, cpus, mem, qmp=False)
                    else:
                        vm = Vm(name, cpus, mem, argv=qemu_argv(who[5:], cpus, mem))
                    try:
                        boot(res, vm)
                        shell_s = time.monotonic() - vm.t_start
                        rss = rss_less_guest_kib(vm.pid, parse_size(mem))
                        t0 = time.monotonic()
                        vm.type("poweroff -f\n")
                        status = vm.wait_exit(300)
                        res.check(f"{name}: exit 0", status == 0, status)
                        first = tr.read(vm.pid)["first_kvm_entry"]
                        rec = {"vmm": who, "cpus": cpus, "memory": mem, "run": r,
                               "start_to_shell_s": round(shell_s, 2),
                               "poweroff_to_exit_s": round(vm.t_exit - t0, 2),
                               "setup_ms": round((first - vm.t_start) * 1e3, 1) if first else None,
                               "rss_less_guest_mib": round(rss / 1024, 1)}
                        res.data(name, rec)
                        res.figure(name, f"shell {rec['start_to_shell_s']} s, poweroff->exit "
                                         f"{rec['poweroff_to_exit_s']} s, set-up {rec['setup_ms']} ms, "
                                         f"RSS-guest {rec['rss_less_guest_mib']} MiB")
                    finally:
                        vm.kill()
    finally:
        tr.stop()


# ------------------------------------------------------------ bench-hotplug

HP_REGION = "64G"  # 512 slots of 128 MiB: address space only until plugged
VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")


def kvm_stats(pid):
    """KVM's statistics of PID's VMs, from debugfs (the VM's own counters
    and its vCPUs' summed: exits, pf_fixed, pf_taken, mmio_exits,
    remote_tlb_flush, ...), or {} where debugfs is not there. The same
    source for every VMM."""
    root = "/sys/kernel/debug/kvm"
    total = {}
    try:
        dirs = [d for d in os.listdir(root) if d.startswith(f"{pid}-")]
    except OSError:
        return {}
    for d in dirs:
        for name in os.listdir(f"{root}/{d}"):
            path = f"{root}/{d}/{name}"
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    total[name] = total.get(name, 0) + int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def kvm_stats_delta(a, b):
    """What changed between two kvm_stats() snapshots (counters that moved;
    gauges such as pages_4k may go down)."""
    return {k: b[k] - a.get(k, 0) for k in sorted(b) if b[k] != a.get(k, 0)}


def task_cpu(pid):
    """{tid: (comm, ns, ticks)} for every thread of PID: on-CPU time from
    schedstat (nanoseconds; None if the kernel has no schedstat) and
    utime+stime from stat (clock ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        d = f"/proc/{pid}/task/{tid}"
        try:
            with open(d + "/comm") as f:
                comm = f.read().rstrip("\n")
            with open(d + "/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            ns = None
            if os.path.exists(d + "/schedstat"):
                with open(d + "/schedstat") as f:
                    ns = int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            continue
        # After the comm: state is field 3, utime 14 and stime 15.
        out[int(tid)] = (comm, ns, int(rest[11]) + int(rest[12]))
    return out


def cpu_ms(a, b, pid, which):
    """CPU milliseconds between snapshots A and B of task_cpu: of the
    control thread (WHICH "control": the main thread), or of every other
    thread that is not a vCPU ("others"; threads that started or ended in
    between count with what they have)."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for tid, (comm, ns, ticks) in b.items():
        if which == "control" and tid != pid:
            continue
        if which == "others" and (tid == pid or VCPU_THREAD.match(comm)):
            continue
        _, ns0, ticks0 = a.get(tid, (comm, 0, 0))
        if ns is not None and ns0 is not None:
            total += (ns - ns0) / 1e6
        else:
            total += (ticks - ticks0) * tick_ms
    return total


def guest_watch(vm, n, cmp, kib):
    """Starts a guest loop that prints `HPMARK_N <MemTotal>` once MemTotal
    is no longer CMP ("lt"/"gt") KIB (or after 20 minutes): the time the
    line reaches the console is when the guest saw its memory change,
    without QMP or shell round trips during the measurement."""
    get = "$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo)"
    vm.sh_ok(f"{{ (i=0; while [ {get} -{cmp} {kib} ] && [ $i -lt 2400 ]; do "
             f"sleep 0.5 || sleep 1; i=$((i+1)); done; echo HPMARK_$(({n}+0)) {get}) & }}")
    return vm.mark()


def rss_sampler(vm, stop, into, period=0.1):
    """Samples the vmm's RSS (monotonic time, KiB) into INTO until STOP is
    set; a thread, so QMP waits go on meanwhile."""
    def run():
        while not stop.is_set():
            into.append((time.monotonic(), vm.rss_kib()))
            time.sleep(period)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def resize_window(vm, size, limit):
    """qom-set requested-size SIZE and waits for MEMORY_DEVICE_SIZE_CHANGE
    with that size: no QMP command or guest shell command runs in between,
    so the VMM's CPU in the window is the resize's (plus its idle cost).
    Returns (t0, t_size, cpu snapshot before, after, the event count
    before, what KVM counted in the window)."""
    ev0 = len(vm.pull_events())
    k0 = kvm_stats(vm.pid)
    c0 = task_cpu(vm.pid)
    t0 = time.monotonic()
    vm.cmd("qom-set", path="vmem0", property="requested-size", value=size)
    ev = vm.wait_event("MEMORY_DEVICE_SIZE_CHANGE", limit,
                       lambda e: e["data"]["size"] == size, after=ev0)
    c1 = task_cpu(vm.pid)
    return t0, ev["_t"], c0, c1, ev0, kvm_stats_delta(k0, kvm_stats(vm.pid))


def measure_hotplug(res, vm, name, ours, plug, fill_mib, idle_s):
    """One side of bench-hotplug on a booted guest: idle baseline, plug,
    fill, unplug, each measured the same way for every VMM."""
    pid = vm.pid
    gib = plug / GIB
    vm.connect_qmp()
    base_kib = meminfo_kib(vm)
    threads = task_cpu(pid)
    comms = sorted({c for c, _, _ in threads.values()})
    control = threads[pid][0]
    res.check(f"{name}: the control thread is the main thread, vCPU threads are named apart",
              not VCPU_THREAD.match(control) and any(VCPU_THREAD.match(c) for c in comms),
              {"control": control, "threads": comms})
    # The idle cost of the control thread with the guest at its shell,
    # before the plug and after the unplug: subtracted from the windows
    # below for the "net" figures.
    c0 = task_cpu(pid)
    time.sleep(idle_s)
    idle_rate = cpu_ms(c0, task_cpu(pid), pid, "control") / idle_s
    hp0 = vm.cmd("x-query-hotplug") if ours else None
    rss0 = vm.rss_kib()

    # ---- plug
    mark = guest_watch(vm, 1, "lt", base_kib + plug // 1024)
    t0, t_size, c0, c1, ev0, kvm = resize_window(vm, plug, 900)
    m = vm.wait_for(r"HPMARK_1 (\d+)\r?\n", 1200, mark, what="the guest seeing the plug")
    t_seen = vm.time_of(m.start())
    res.check(f"{name}: guest MemTotal grew by the plugged size",
              int(m.group(1)) == base_kib + plug // 1024,
              {"base_kib": base_kib, "now_kib": int(m.group(1)), "plugged_kib": plug // 1024})
    got = vm.cmd("query-memory-devices")[0]["data"]
    res.check(f"{name}: query-memory-devices says the plug is done",
              got["size"] == plug and got["requested-size"] == plug, got)
    plug_rec = {"control_cpu_ms": round(cpu_ms(c0, c1, pid, "control"), 2),
                "others_cpu_ms": round(cpu_ms(c0, c1, pid, "others"), 2),
                "window_s": round(t_size - t0, 2),
                "size_reached_s": round(t_size - t0, 2),
                "guest_visible_s": round(t_seen - t0, 2),
                "kvm": kvm}
    if ours:
        done = [e for e in vm.pull_events()[ev0:] if e["event"] == "X_MEMORY_DEVICE_RESIZE_DONE"
                and e["data"]["size"] == plug]
        res.check(f"{name}: X_MEMORY_DEVICE_RESIZE_DONE for the plug", done, len(done))
        plug_rec["done_event_s"] = round(done[0]["_t"] - t0, 2)
        hp1 = vm.cmd("x-query-hotplug")
        slots = len(hp1["mapped-slots"])
        res.check(f"{name}: one mapped slot per 128 MiB plugged",
                  slots * hp1["slot-size"] == plug, {"slots": slots})
        plug_rec["map_swaps"] = hp1["stats"]["map_swaps"] - hp0["stats"]["map_swaps"]
        plug_rec["slots"] = slots

    # ---- fill: the guest writes part of it, so the unplug has memory to return
    if fill_mib:
        out = vm.sh_ok(f"memcheck {fill_mib}", timeout=1800)
        res.check(f"{name}: guest program filled and verified {fill_mib} MiB",
                  f"MEMCHECK ok mib={fill_mib} " in out, out.strip())
    rss_full = vm.rss_kib()

    # ---- unplug
    mark = guest_watch(vm, 2, "gt", base_kib)
    samples, stop = [], threading.Event()
    sampler = rss_sampler(vm, stop, samples)
    try:
        t0, t_size, c0, c1, ev0, kvm = resize_window(vm, 0, 1800)
        m = vm.wait_for(r"HPMARK_2 (\d+)\r?\n", 1200, mark, what="the guest seeing the unplug")
        t_seen = vm.time_of(m.start())
        # The guest keeps the plugged memory's memmap (64 bytes per 4 KiB
        # page) in its boot RAM, touched once: RSS the unplug cannot return.
        limit = rss0 + 64 * 1024 + plug // 64 // 1024
        deadline = time.monotonic() + 60
        while not (samples and samples[-1][1] <= limit) and time.monotonic() < deadline:
            time.sleep(0.2)
        c2 = task_cpu(pid)
    finally:
        stop.set()
        sampler.join()
    back = [t for t, rss in samples if t >= t0 and 0 <= rss <= limit]
    res.check(f"{name}: guest MemTotal back to its base", int(m.group(1)) == base_kib,
              {"base_kib": base_kib, "now_kib": int(m.group(1))})
    res.check(f"{name}: RSS back within 64 MiB (and the memmap) of before the plug", back,
              {"before_kib": rss0, "full_kib": rss_full, "now_kib": vm.rss_kib()})
    unplug_rec = {"control_cpu_ms": round(cpu_ms(c0, c1, pid, "control"), 2),
                  "others_cpu_ms": round(cpu_ms(c0, c1, pid, "others"), 2),
                  "others_cpu_to_returned_ms": round(cpu_ms(c0, c2, pid, "others"), 2),
                  "window_s": round(t_size - t0, 2),
                  "size_reached_s": round(t_size - t0, 2),
                  "guest_visible_s": round(t_seen - t0, 2),
                  "memory_returned_s": round(back[0] - t0, 2),
                  "kvm": kvm}
    if ours:
        done = [e for e in vm.pull_events()[ev0:] if e["event"] == "X_MEMORY_DEVICE_RESIZE_DONE"
                and e["data"]["size"] == 0]
        res.check(f"{name}: X_MEMORY_DEVICE_RESIZE_DONE for the unplug", done, len(done))
        unplug_rec["done_event_s"] = round(done[0]["_t"] - t0, 2)
        deadline = time.monotonic() + 30
        while True:
            hp2 = vm.cmd("x-query-hotplug")
            if not hp2["mapped-slots"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        unplug_rec["slots_unmapped_by_s"] = round(time.monotonic() - t0, 2)
        res.check(f"{name}: no slot mapped after the unplug", not hp2["mapped-slots"],
                  hp2["mapped-slots"][:4])
        unplug_rec["map_swaps"] = hp2["stats"]["map_swaps"] - hp1["stats"]["map_swaps"]
    # The idle rate again, after the unplug (QEMU's main loop was seen
    # idling at 0.1 and at 110 ms/s in the same run): the net figures
    # subtract the mean of the two.
    c0 = task_cpu(pid)
    time.sleep(idle_s)
    idle_after = cpu_ms(c0, task_cpu(pid), pid, "control") / idle_s
    idle_mean = (idle_rate + idle_after) / 2
    for rec in (plug_rec, unplug_rec):
        rec["control_net_ms"] = round(rec["control_cpu_ms"] - idle_mean * rec["window_s"], 2)
        rec["control_ms_per_gib"] = round(rec["control_cpu_ms"] / gib, 2)
        rec["control_net_ms_per_gib"] = round(rec["control_net_ms"] / gib, 2)
    return {"control_thread": control, "threads": comms,
            "idle_control_ms_per_s": round(idle_mean, 3),
            "idle_before_ms_per_s": round(idle_rate, 3),
            "idle_after_ms_per_s": round(idle_after, 3),
            "rss_before_mib": rss0 // 1024, "rss_filled_mib": rss_full // 1024,
            "plug": plug_rec, "unplug": unplug_rec}


def bench_hotplug(res, args):
    """Memory hot-plug side by side in one run, same guest kernel,
    initramfs and sizes: our vmm, QEMU q35 with virtio-mem-pci and
    dynamic-memslots off, and on. 2 vCPUs, 1 GiB of boot RAM, a 64 GiB
    hot-plug region (512 of our slots; only address space until plugged:
    QEMU's backend with reserve=off), plug 4 GiB (--plug-mib), the guest
    fills 1 GiB of it (--fill-mib), unplug to 0. Per side: control-thread
    CPU per GiB plugged and unplugged (ours: the main thread, its control
    loop; QEMU's: the main thread, its main loop), time from qom-set to
    the size reached (MEMORY_DEVICE_SIZE_CHANGE) and to the guest's
    MemTotal, and from the unplug request to the RSS back down."""
    sides = [(who, dyn) for who, dyn in
             (("ours", None), ("qemu-q35", False), ("qemu-q35-dynamic", True))
             if not args.vmms or who in args.vmms.split(",")]
    if any(who != "ours" for who, _ in sides):
        need_qemu(res)
    runs = args.runs or 1
    plug = (args.plug_mib or 4096) * MIB
    fill_mib = args.fill_mib if args.fill_mib is not None else plug // MIB // 4
    cpus, mem, idle_s = 2, "1G", 10
    for r in range(1, runs + 1):
        for who, dyn in sides:
            name = f"bhp-{who}-{r}"
            ours = who == "ours"
            # QEMU q35 in the test host now and then resets or stalls
            # during boot (qemu-count): its boot is tried up to 3 times.
            for attempt in range(1, 4 if not ours else 2):
                if ours:
                    vm = Vm(name, cpus, mem, hotplug=HP_REGION)
                else:
                    # debug-threads: QEMU names its vCPU threads "CPU N/KVM"
                    # (Debian's build leaves every thread unnamed otherwise).
                    argv = qemu_argv("q35", cpus, mem, HP_REGION, dyn, reserve=False)
                    vm = Vm(f"{name}-a{attempt}", cpus, mem,
                            argv=argv + ["-name", f"{name},debug-threads=on"])
                try:
                    boot(res, vm, limit=600)
                    break
                except Failed as e:
                    vm.kill()
                    if ours or attempt == 3:
                        raise
                    res.figure(f"{name}: boot attempt {attempt} failed, started again",
                               str(e).splitlines()[0][:300])
            try:
                rec = measure_hotplug(res, vm, name, ours, plug, fill_mib, idle_s)
                vm.type("poweroff -f\n")
                status = vm.wait_exit(300)
                res.check(f"{name}: exit 0 after poweroff", status == 0,
                          {"status": status, "stderr": vm.stderr.decode(errors="replace")[-1500:]})
            finally:
                vm.kill()
            rec.update({"bench": "hotplug", "vmm": who, "run": r, "cpus": cpus, "memory": mem,
                        "region": HP_REGION, "plug_mib": plug // MIB, "fill_mib": fill_mib})
            res.data(name, rec)
            p, u = rec["plug"], rec["unplug"]
            res.figure(f"{name}: plug {plug // MIB} MiB",
                       f"control CPU {p['control_cpu_ms']} ms ({p['control_ms_per_gib']} ms/GiB, "
                       f"net of idle {p['control_net_ms_per_gib']}), size reached "
                       f"{p['size_reached_s']} s, guest MemTotal {p['guest_visible_s']} s")
            res.figure(f"{name}: unplug to 0",
                       f"control CPU {u['control_cpu_ms']} ms ({u['control_ms_per_gib']} ms/GiB, "
                       f"net of idle {u['control_net_ms_per_gib']}), size reached "
                       f"{u['size_reached_s']} s, guest MemTotal {u['guest_visible_s']} s, "
                       f"RSS returned {u['memory_returned_s']} s")


# ---------------------------------------------------------------- fault-rate

def fault_rate(res, args):
    """Whose fault are the L2 guests' triple faults and hangs? Our vmm and
    QEMU q35 take turns, RUNS lifetimes each (default 8), in one shape: 2
    vCPUs, 1 GiB and a hot-plug region, boot to the shell, a 6 KiB paste,
    REBOOTS `reboot -f` in place (default 0; ours with `--on-reset
    restart`, QEMU without -no-reboot), each waited for to the shell,
    CYCLES plug/unplug cycles of 1 GiB (default 2), `poweroff -f`. Same
    kernel and initramfs, both under the test host's KVM. For each side:
    lifetimes that ended cleanly, those that failed (how), and the shutdown
    exits (triple faults) its vCPU threads took, from the test host's
    kvm_exit tracepoint (ours are named vcpuN, QEMU's CPU N/KVM). Sends the
    tallies as data and as figures; the scenario fails only if a side could
    not be run at all, never on a rate."""
    need_qemu(res)
    runs = args.runs or 8
    cycles = args.cycles if args.cycles is not None else 2
    reboots = args.reboots or 0
    tally = {who: {"lifetimes": 0, "clean": 0, "failed": [], "triple_faults": []}
             for who in ("ours", "qemu-q35")}
    paste = ("true # " + "x" * 33 + "\n") * 150 + "echo pasted-$((40+2))\n"
    for r in range(1, runs + 1):
        for who in ("ours", "qemu-q35"):
            name = f"fr-{who}-{r}"
            if who == "ours":
                vm = Vm(name, 2, "1G", hotplug="4G",
                        extra=["--on-reset", "restart"] if reboots else [])
            else:
                vm = Vm(name, 2, "1G", argv=qemu_argv("q35", 2, "1G", "4G", reboot=reboots > 0))
            t = tally[who]
            t["lifetimes"] += 1
            try:
                boot(res, vm, limit=300)
                start = vm.mark()
                vm.type(paste)
                vm.wait_for(r"pasted-42", 120, start, what="the paste's last line")
                for n in range(1, reboots + 1):
                    start = vm.mark()
                    vm.type("reboot -f\n")
                    try:
                        wait_shell(vm, start)
                    except Failed as e:
                        raise Failed(f"reboot {n}: {e}") from e
                lifetime_rest(vm, cycles)
                t["clean"] += 1
            except Exception as e:  # noqa: BLE001 - tallied, not raised
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                t["failed"].append(f"run {r}: {first}")
                res.figure(f"{name}: failed", first)
            finally:
                vm.kill()
            # Our vCPU threads are vcpuN, QEMU's CPU N/KVM: each side's
            # exits are told apart by the thread name the trace line starts
            # with.
            for line in shutdown_lines():
                side = "ours" if line.startswith("vcpu") else "qemu-q35"
                tally[side]["triple_faults"].append(f"run {r}: {line[:300]}")
    for who, t in tally.items():
        res.figure(f"{who}: lifetimes clean / failed / triple faults",
                   f"{t['clean']} / {len(t['failed'])} / {len(t['triple_faults'])} "
                   f"of {t['lifetimes']}")
        res.data(f"fault-rate-{who}", {"vmm": who, **t})
        res.check(f"{who}: at least one lifetime ended cleanly", t["clean"] > 0, t)


def lifetime_rest(vm, cycles):
    """CYCLES plug/unplug cycles of 1 GiB over QMP, then `poweroff -f` and
    exit status 0; raises Failed otherwise."""
    vm.connect_qmp()
    for _ in range(cycles):
        vm.cmd("qom-set", path="vmem0", property="requested-size", value=GIB)
        wait_size(vm, GIB, 300)
        vm.cmd("qom-set", path="vmem0", property="requested-size", value=0)
        wait_size(vm, 0, 300)
    vm.type("poweroff -f\n")
    status = vm.wait_exit(120)
    if status != 0:
        raise Failed(f"exit status {status} after poweroff")


def shutdown_lines():
    """The shutdown exits traced since the last call (tracing.py), with the
    trace's leading spaces cut."""
    return [line.lstrip() for line in shutdown_exits()]
