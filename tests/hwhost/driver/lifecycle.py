"""Boot and lifecycle scenarios: the guest's own CPU and memory report,
commands on its console, and every way a VM ends (from the guest and over
QMP), with 1, 2 and 8 vCPUs and 512 MiB to 4 GiB."""

import re
import time

from guest_checks import after_exit, boot, check_rcu_file, clock_sample, end_from_guest
from l2_vm import Vm


def lifecycle_1cpu(res, args):
    """1 vCPU, 512 MiB: shell, QMP stop/cont with the shell answering after,
    `poweroff -f` -> exit 0."""
    vm = Vm("lc1", 1, "512M")
    try:
        boot(res, vm)
        s0 = clock_sample(vm)
        vm.connect_qmp()
        res.check("query-status running", vm.cmd("query-status")["status"] == "running")
        vm.cmd("stop")
        vm.wait_event("STOP", 30)
        res.check("query-status paused after stop", vm.cmd("query-status")["status"] == "paused")
        start = vm.mark()
        vm.type("echo stopped-$((20+1))\n")
        time.sleep(5)
        seen = re.search(r"stopped-21", vm.console[start:]) is not None
        res.check("a stopped guest does not answer", not seen)
        t_cont = time.monotonic()
        vm.cmd("cont")
        vm.wait_event("RESUME", 30)
        vm.wait_for(r"stopped-21", 60, start, what="the answer typed while stopped")
        res.figure("cont to the shell's answer", round(time.monotonic() - t_cont, 2), "s")
        res.check("shell still answers after cont", vm.sh_ok("echo $((5+5))").strip() == "10")
        end_from_guest(res, vm, "poweroff -f", "Power down", s0)
        after_exit(res, vm)
    finally:
        vm.kill()


def lifecycle_2cpu(res, args):
    """2 vCPUs, 512 MiB: shell, `reboot -f` -> exit 0 (the CLI's promise)."""
    vm = Vm("lc2", 2, "512M", qmp=False)
    try:
        boot(res, vm)
        s0 = clock_sample(vm)
        out = vm.sh_ok("grep -c ^processor /proc/cpuinfo")
        res.check("/proc/cpuinfo lists 2 CPUs", out.strip() == "2", out)
        # A paste: 6 KiB of shell lines in one write. All of it must reach
        # the guest without another keystroke (a read smaller than the
        # console's own buffer once left the tail waiting for one).
        start = vm.mark()
        paste = ("true # " + "x" * 33 + "\n") * 150 + "echo pasted-$((40+2))\n"
        vm.type(paste)
        t0 = time.monotonic()
        m = vm.wait_for(r"pasted-42", 120, start, what=f"the last line of a {len(paste)}-byte paste")
        res.check(f"a {len(paste)}-byte paste reaches the shell whole", m is not None)
        res.figure("paste to its last line's output", round(time.monotonic() - t0, 2), "s")
        end_from_guest(res, vm, "reboot -f", "Restarting system", s0)
        after_exit(res, vm)
    finally:
        vm.kill()


def lifecycle_8cpu(res, args):
    """8 vCPUs, 4 GiB: shell, then QMP system_powerdown -> the ACPI power
    button -> busybox acpid's handler -> poweroff -> exit 0."""
    vm = Vm("lc8", 8, "4G")
    try:
        boot(res, vm)
        vm.connect_qmp()
        cpus = vm.cmd("query-cpus-fast")
        res.check("query-cpus-fast lists 8 vCPUs", len(cpus) == 8, len(cpus))
        res.check("acpid runs in the guest", vm.sh("pidof acpid")[1] == 0)
        start = vm.mark()
        t0 = time.monotonic()
        vm.cmd("system_powerdown")
        vm.wait_event("POWERDOWN", 30)
        vm.wait_for(r"acpid: power button pressed", 120, start,
                    what="the guest's power-button handler")
        status = vm.wait_exit(300)
        res.check("system_powerdown ends the vmm with status 0", status == 0,
                  {"status": status, "stderr": vm.stderr.decode(errors="replace")[-2000:]})
        shut = [e for e in vm.events if e["event"] == "SHUTDOWN"]
        res.check("SHUTDOWN event says the guest shut down",
                  bool(shut) and shut[-1]["data"] == {"guest": True, "reason": "guest-shutdown"},
                  shut)
        res.figure("system_powerdown to vmm exit", round(vm.t_exit - t0, 2), "s")
        after_exit(res, vm)
    finally:
        vm.kill()


def reset_during_command(res, args):
    """2 vCPUs, 4 GiB: QMP system_reset while a command runs -> exit 0 with
    SHUTDOWN host-qmp-system-reset (the VMM ends on reset, like QEMU's
    -no-reboot)."""
    vm = Vm("reset", 2, "4G")
    try:
        boot(res, vm)
        vm.connect_qmp()
        start = vm.mark()
        vm.type("echo busy-$((1+2)); while :; do :; done\n")
        vm.wait_for(r"busy-3", 60, start, what="the busy command to start")
        time.sleep(2)
        t0 = time.monotonic()
        vm.cmd("system_reset")
        status = vm.wait_exit(120)
        res.check("system_reset ends the vmm with status 0", status == 0,
                  {"status": status, "stderr": vm.stderr.decode(errors="replace")[-2000:]})
        shut = [e for e in vm.events if e["event"] == "SHUTDOWN"]
        res.check("SHUTDOWN event names the QMP reset",
                  bool(shut) and shut[-1]["data"] == {"guest": False,
                                                      "reason": "host-qmp-system-reset"}, shut)
        res.figure("system_reset to vmm exit", round(vm.t_exit - t0, 2), "s")
        check_rcu_file(res, vm)
    finally:
        vm.kill()
