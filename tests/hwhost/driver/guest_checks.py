"""What the scenarios do with a guest and check of it: boot to the shell
with the guest's own report checked against the command line, end it from
inside and time the end, read its memory, drive virtio-mem over QMP, and
check the vmm's RCU report."""

import json
import re
import time

from l2_vm import MIB, Failed, parse_size

GIB = 1 << 30
BOOT_LIMIT = 900  # seconds of L1 time to the shell; TCG with 8 vCPUs is slow


def meminfo_kib(vm, key="MemTotal"):
    out = vm.sh_ok(f"sed -n 's/^{key}: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo")
    return int(out.strip())


def guest_uptime(vm):
    """(guest uptime seconds, L1 monotonic time at the answer)."""
    out = vm.sh_ok("cut -d' ' -f1 /proc/uptime")
    return float(out.strip()), time.monotonic()


def boot(res, vm, limit=BOOT_LIMIT):
    """Waits for the guest's /init report and its shell; checks the guest's
    own CPU and memory counts against the command line."""
    m = vm.wait_for(r"CPUS_ONLINE=(\d+)\r?\n", limit, what="the guest's /init report")
    t_init = vm.time_of(m.start())
    cpus = int(m.group(1))
    mem = int(vm.wait_for(r"MEMTOTAL_KB=(\d+)\r?\n", 60).group(1))
    vm.wait_for(r"UPTIME=", 60)
    out, rc = vm.sh("echo $((6*7))", timeout=120)
    t_shell = time.monotonic()
    res.check("shell answers a typed command", rc == 0 and out.strip() == "42",
              {"output": out, "status": rc})
    res.figure("vmm start to /init report", round(t_init - vm.t_start, 2), "s")
    res.figure("vmm start to shell", round(t_shell - vm.t_start, 2), "s")
    res.check("guest CPUS_ONLINE equals --cpus", cpus == vm.cpus,
              {"guest": cpus, "cpus": vm.cpus})
    online = vm.sh_ok("cat /sys/devices/system/cpu/online").strip()
    res.check("guest's online CPU list", online == ("0" if vm.cpus == 1 else f"0-{vm.cpus - 1}"),
              online)
    want = parse_size(vm.memory) // 1024
    # MemTotal is RAM less what the kernel keeps for itself (its image,
    # memmap, crash reserves): a few percent. The firmware map must match.
    res.check("guest MemTotal within 88-100% of --memory", 0.88 * want <= mem <= want,
              {"memtotal_kb": mem, "memory_kb": want})
    ram = vm.sh_ok("for d in /sys/firmware/memmap/*; do "
                   "if [ \"$(cat $d/type)\" = 'System RAM' ]; then "
                   "echo $(cat $d/start) $(cat $d/end); fi; done")
    total = sum(int(e, 16) - int(s, 16) + 1 for s, e in
                (line.split() for line in ram.splitlines() if line.strip()))
    # The E820 map keeps the legacy hole below 1 MiB out of RAM.
    res.check("guest's E820 RAM equals --memory (less the hole below 1 MiB)",
              want * 1024 - MIB <= total <= want * 1024, {"e820_ram": total, "memory": want * 1024})
    res.figure("guest MemTotal", mem, "KiB")
    rel = vm.sh_ok("uname -r").strip()
    res.check("uname -r is a Debian cloud kernel",
              re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", rel) is not None, rel)
    return t_shell


def clock_sample(vm):
    g, t = guest_uptime(vm)
    return {"guest": g, "l1": t}


def end_from_guest(res, vm, command, message, sample0, limit=300):
    """Types COMMAND (poweroff -f / reboot -f), waits for the kernel's
    MESSAGE and the vmm's exit; records how long each step took, on the test
    host's clock and as the guest's clock would tell it."""
    sample1 = clock_sample(vm)
    rate = (sample1["guest"] - sample0["guest"]) / (sample1["l1"] - sample0["l1"])
    res.figure("guest clock seconds per test-host second", round(rate, 3))
    start = vm.mark()
    t_cmd = time.monotonic()
    vm.type(command + "\n")
    m = vm.wait_for(r"\[\s*(\d+\.\d+)\] reboot: " + message, limit, start,
                    what=f"the kernel's 'reboot: {message}'")
    t_msg = vm.time_of(m.start())
    status = vm.wait_exit(limit)
    res.check(f"'{command}' ends the vmm with status 0", status == 0,
              {"status": status, "stderr": vm.stderr.decode(errors="replace")[-2000:]})
    res.figure(f"'{command}' typed to vmm exit", round(vm.t_exit - t_cmd, 2), "s")
    res.figure(f"kernel's 'reboot: {message}' to vmm exit", round(vm.t_exit - t_msg, 3), "s")
    # What comparing the guest's printk clock with the host's would say:
    # the message's guest time, mapped onto the host clock through the last
    # sample taken at the shell.
    g_msg = float(m.group(1))
    mapped = sample1["l1"] + (g_msg - sample1["guest"])
    res.figure("the same, guest printk time compared with the host clock",
               round(vm.t_exit - mapped, 2), "s")
    # The guest's clock does not start with the vmm: it starts when the
    # guest kernel sets up timekeeping, after the VMM's set-up, the
    # decompressor and early boot. Reading the guest's timestamps as
    # seconds since the vmm started is off by this much.
    res.figure("guest clock zero, seconds after the vmm started",
               round(sample1["l1"] - sample1["guest"] - vm.t_start, 2), "s")
    res.figure("the same, guest printk time read as seconds since vmm start",
               round(vm.t_exit - (vm.t_start + g_msg), 2), "s")


def check_rcu_file(res, vm):
    with open(vm.stats_path) as f:
        s = json.load(f)
    res.check("RCU report: callbacks_run == call_rcu at exit",
              s["callbacks_run"] == s["call_rcu"],
              {"call_rcu": s["call_rcu"], "callbacks_run": s["callbacks_run"]})
    res.figure("call_rcu over the lifetime", s["call_rcu"])
    return s


def after_exit(res, vm):
    """What every lifetime reports once the vmm has exited: its set-up time
    (from --metrics) and the RCU report's check."""
    with open(vm.metrics_path) as f:
        m = json.load(f)
    res.figure("vmm set-up (exec to first KVM_RUN)", round(m["setup_ms"], 1), "ms")
    return check_rcu_file(res, vm)


def power_off_after_hotplug(res, vm):
    """How every hot-plug scenario ends: checks the guest's dmesg holds no
    virtio_mem error, ends the guest with `poweroff -f` (timed, as
    end_from_guest does) and checks the vmm's RCU report."""
    dm = vm.sh_ok("dmesg | grep -i 'virtio_mem' || true")
    bad = [line for line in dm.splitlines()
           if re.search(r"error|fail|warn|bug|unable|could not", line, re.I)]
    res.check("no virtio_mem error in the guest's dmesg", not bad, bad[:10])
    s0 = clock_sample(vm)
    end_from_guest(res, vm, "poweroff -f", "Power down", s0)
    check_rcu_file(res, vm)


# ---------------------------------------------------------------- scenarios


def site_calls(rcu, label):
    return sum(s["calls"] for s in rcu["by_site"] if s["label"] == label)


def wait_size(vm, size, timeout):
    """Polls query-memory-devices until vmem0's size is SIZE; returns the
    seconds it took."""
    t0 = time.monotonic()
    while True:
        devs = vm.cmd("query-memory-devices")
        got = devs[0]["data"]["size"]
        if got == size:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise Failed(f"virtio-mem size {got}, not {size}, after {timeout} s: {devs}")
        time.sleep(0.5)


def wait_memtotal(vm, want_kib, timeout):
    t0 = time.monotonic()
    while True:
        got = meminfo_kib(vm)
        if got == want_kib:
            return got
        if time.monotonic() - t0 > timeout:
            return got
        time.sleep(1)


def lifetime(res, vm, cycles, size, limit=BOOT_LIMIT):
    """Boot to the shell, CYCLES plug/unplug cycles of SIZE bytes over QMP,
    `poweroff -f`; returns (seconds to shell, poweroff to exit)."""
    boot(res, vm, limit)
    t_shell = time.monotonic() - vm.t_start
    if cycles:
        vm.connect_qmp()
        for _ in range(cycles):
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=size)
            wait_size(vm, size, 600)
            vm.cmd("qom-set", path="vmem0", property="requested-size", value=0)
            wait_size(vm, 0, 900)
    t0 = time.monotonic()
    vm.type("poweroff -f\n")
    status = vm.wait_exit(300)
    res.check(f"{vm.name}: exit 0 after poweroff", status == 0,
              {"status": status, "stderr": vm.stderr.decode(errors="replace")[-1500:]})
    return t_shell, vm.t_exit - t0


def wait_shell(vm, start, limit=300):
    """Waits for the rebooted guest's /init report after console offset
    START, then for its shell."""
    vm.wait_for(r"UPTIME=", limit, start, what="the rebooted guest's /init report")
    out, rc = vm.sh("echo $((6*7))", timeout=120)
    if rc != 0 or out.strip() != "42":
        raise Failed(f"the rebooted guest's shell does not answer: {out!r} {rc}")
