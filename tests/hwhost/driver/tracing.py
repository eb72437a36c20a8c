"""Kernel tracing in the test host, for figures taken the same way from
every VMM: uprobes on QEMU's call_rcu1/drain_call_rcu (QEMU's call_rcu count
over a lifetime, as scripts/qemu-rcu-count.sh does on the build host), and
the kvm:kvm_entry tracepoint (the first VM entry of a process: its set-up
time, for ours and QEMU's alike)."""

import bisect
import collections
import os
import re

TRACEFS = "/sys/kernel/tracing"
INSTANCE = TRACEFS + "/instances/hwhost"
LINE = re.compile(r"\(\s*(\d+|-+)\)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+): (.*)")


def _write(path, text, append=False):
    # os.open, not open(): Python's append mode seeks to the end, which
    # tracefs files refuse (EINVAL).
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        try:
            with open(TRACEFS + "/error_log") as f:
                log = f.read()[-1000:]
        except OSError:
            log = ""
        raise OSError(e.errno, f"writing '{text}' to {path}: {e.strerror}; "
                      f"tracing's error_log: {log}") from e


class Trace:
    """A tracing instance recording kvm_entry and, when QEMU_SYMBOLS is
    given, uprobes on QEMU_BINARY's call_rcu1 and drain_call_rcu. Times are
    CLOCK_MONOTONIC (Python's time.monotonic())."""

    def __init__(self, qemu_binary=None, qemu_symbols=None, vm_entries=False):
        self.syms = []
        self.probes = []
        self.stop()
        os.mkdir(INSTANCE)
        _write(INSTANCE + "/trace_clock", "mono")
        _write(INSTANCE + "/options/record-tgid", "1")
        _write(INSTANCE + "/buffer_size_kb", "8192")
        # A full buffer drops new events instead of overwriting old ones:
        # the first VM entry must survive, and read() refuses to count
        # from a buffer that dropped anything.
        _write(INSTANCE + "/options/overwrite", "0")
        if qemu_symbols:
            with open(qemu_symbols) as f:
                for line in f:
                    p = line.split()
                    if len(p) == 4 and p[2] in "Tt":
                        self.syms.append((int(p[0], 16), int(p[1], 16), p[3]))
            self.syms.sort()
            off = {name: addr for addr, _, name in self.syms}
            _write(TRACEFS + "/uprobe_events",
                   f"p:hwhost/call_rcu1 {qemu_binary}:{off['call_rcu1']:#x} "
                   "func=%si:x64 ret=+0(%sp):x64", append=True)
            _write(TRACEFS + "/uprobe_events",
                   f"p:hwhost/drain_call_rcu {qemu_binary}:{off['drain_call_rcu']:#x}",
                   append=True)
            self.probes = ["call_rcu1", "drain_call_rcu"]
            _write(INSTANCE + "/events/hwhost/enable", "1")
        if vm_entries:
            _write(INSTANCE + "/events/kvm/kvm_entry/enable", "1")
        self.addrs = [a for a, _, _ in self.syms]

    def stop(self):
        if os.path.isdir(INSTANCE):
            for ev in ("hwhost", "kvm/kvm_entry"):
                try:
                    _write(f"{INSTANCE}/events/{ev}/enable", "0")
                except OSError:
                    pass
            os.rmdir(INSTANCE)
        for p in ("call_rcu1", "drain_call_rcu"):
            try:
                _write(TRACEFS + "/uprobe_events", f"-:hwhost/{p}", append=True)
            except OSError:
                pass

    def clear(self):
        _write(INSTANCE + "/trace", "")

    def name(self, off):
        i = bisect.bisect_right(self.addrs, off) - 1
        if i < 0:
            return hex(off)
        start, size, sym = self.syms[i]
        return sym if off < start + size else f"(static, after {sym})"

    def dropped(self):
        """Events lost since the last clear() (the buffer filled up)."""
        lost = 0
        for cpu in os.listdir(INSTANCE + "/per_cpu"):
            with open(f"{INSTANCE}/per_cpu/{cpu}/stats") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() in ("overrun", "dropped events"):
                        lost += int(value.split()[0])
        return lost

    def read(self, tgid, base=0):
        """What PID TGID did since the last clear(): the time of its first
        VM entry (with vm_entries), and its call_rcu1 calls by callback and
        caller. Raises RuntimeError if the buffer lost events, when the
        counts would be wrong."""
        first_entry = None
        if self.probes and self.dropped():
            raise RuntimeError(f"the trace buffer dropped {self.dropped()} events: "
                               "the call_rcu1 count would be short")
        calls, callers, drains = collections.Counter(), collections.Counter(), 0
        with open(INSTANCE + "/trace") as f:
            for line in f:
                m = LINE.search(line)
                if not m or m.group(1) != str(tgid):
                    continue
                ev = m.group(3)
                if ev == "kvm_entry":
                    if first_entry is None:
                        first_entry = float(m.group(2))
                elif ev == "drain_call_rcu":
                    drains += 1
                elif ev == "call_rcu1":
                    args = dict(kv.split("=", 1) for kv in m.group(4).split() if "=" in kv)
                    calls[self.name(int(args["func"], 16) - base)] += 1
                    callers[self.name(int(args["ret"], 16) - base)] += 1
        return {"first_kvm_entry": first_entry, "call_rcu1": sum(calls.values()),
                "drain_call_rcu": drains, "by_callback": dict(calls.most_common()),
                "by_caller": dict(callers.most_common())}


def load_base(pid, binary):
    """Where BINARY's first mapping (file offset 0) starts in PID."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and p[5] == binary and p[2] == "00000000":
                return int(p[0].split("-")[0], 16)
    return 0


def rss_less_guest_kib(pid, guest_bytes):
    """The process's resident memory outside mappings as large as the
    guest's RAM (its RAM blocks): what the VMM itself costs."""
    total = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            p = line.split()
            if "-" in p[0] and len(p) >= 5 and not p[0].endswith(":"):
                a, b = p[0].split("-")
                size = int(b, 16) - int(a, 16)
            elif p[0] == "Rss:" and size < guest_bytes:
                total += int(p[1])
    return total


SHUTDOWNS = TRACEFS + "/instances/shutdowns"
# SVM's exit code for a shutdown (a triple fault); the test host is AMD's.
SVM_EXIT_SHUTDOWN = 0x7f


def watch_shutdowns():
    """Starts recording KVM's shutdown exits (a guest's triple fault) with
    the guest's RIP at the fault. The vmm cannot say where its guest was:
    on AMD, KVM puts the vCPU through INIT before it reports the shutdown
    (the VMCB is undefined after one), so KVM_GET_REGS shows the reset
    state; the kvm_exit tracepoint fires before that. Returns an error
    message where tracing is not available, else None."""
    try:
        if os.path.isdir(SHUTDOWNS):
            os.rmdir(SHUTDOWNS)
        os.mkdir(SHUTDOWNS)
        _write(SHUTDOWNS + "/events/kvm/kvm_exit/filter", f"exit_reason == {SVM_EXIT_SHUTDOWN}")
        _write(SHUTDOWNS + "/events/kvm/kvm_exit/enable", "1")
    except OSError as e:
        return str(e)
    return None


def shutdown_exits():
    """The shutdown exits recorded since the last call, as trace lines
    (process, vCPU thread, time, guest RIP), and clears them."""
    try:
        with open(SHUTDOWNS + "/trace") as f:
            lines = [line.strip() for line in f if "kvm_exit" in line]
        _write(SHUTDOWNS + "/trace", "")
    except OSError:
        return []
    return lines
