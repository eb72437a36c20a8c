"""One run of our `vmm` inside the test host: the process, its serial
console (the guest's busybox shell) and its QMP socket, driven with QEMU's
own client (qemu.qmp's synchronous `legacy` API, as QEMU's iotests use).

Everything here observes and acts; the scenarios decide what is right.
"""

import os
import re
import subprocess
import threading
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

VMM = os.environ.get("HWHOST_VMM", "/opt/vmm/vmm")
L2_KERNEL = "/kit/distro/vmlinuz"
L2_INITRD = "/kit/distro/initramfs.cpio.gz"
MIB = 1 << 20
# The guest kernel's log level: "quiet" unless the driver is run with
# --loud (every kernel line then shows on the console, slower to boot).
GUEST_QUIET = ["quiet"]


class Failed(Exception):
    """A check or an expected event did not happen; the message says what."""


def parse_size(s):
    """'512M', '4G' or bytes, as the vmm reads them."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1].upper() in units:
        return int(s[:-1]) * units[s[-1].upper()]
    return int(s)


def proc_status(pid, key):
    """A /proc/PID/status value in KiB (VmRSS, VmSize), or -1 once gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def proc_maps(pid):
    """(start, end) of every mapping of PID."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            a, b = line.split()[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def new_ranges(before, after, min_len):
    """The address ranges of at least MIN_LEN bytes mapped in AFTER but not in
    BEFORE (proc_maps snapshots): what a plug mapped, found without the VMM
    telling its host addresses."""
    out = []
    for a, b in after:
        for oa, ob in before:
            if ob <= a or oa >= b:
                continue
            if oa > a:
                out.append((a, oa))
            a = max(a, ob)
        if a < b:
            out.append((a, b))
    return [(a, b) for a, b in out if b - a >= min_len]


def vm_flags(pid, addr):
    """The VmFlags of PID's mapping that holds ADDR (empty if none does)."""
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a <= addr < b
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []


class Vm:
    """Starts `vmm` with the distribution kit and the given options.

    `name` labels the echoed console lines on the test host's console.
    The console is read on a thread and kept whole, with the time each
    chunk arrived (the test host's monotonic clock).
    """

    def __init__(self, name, cpus, memory, hotplug=None, qmp=True, cmdline=None,
                 extra=(), workdir="/tmp", argv=None):
        self.name = name
        self.cpus = cpus
        self.memory = memory
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.qmp_path = os.path.join(self.dir, "qmp.sock") if qmp else None
        self.stats_path = os.path.join(self.dir, "rcu.json")
        self.metrics_path = os.path.join(self.dir, "metrics.json")
        if cmdline is None:
            cmdline = " ".join(GUEST_QUIET)
        args = [VMM, "--kernel", L2_KERNEL, "--initrd", L2_INITRD, "--cpus", str(cpus),
                "--memory", memory, "--cmdline", cmdline,
                "--rcu-stats", self.stats_path, "--metrics", self.metrics_path]
        if hotplug:
            args += ["--hotplug-memory", hotplug]
        if qmp:
            args += ["--qmp", self.qmp_path]
        args += list(extra)
        # Another VMM (QEMU, for side-by-side figures) with its own argv:
        # "{qmp}" in it stands for the QMP socket's path.
        if argv is not None:
            args = [a.replace("{qmp}", self.qmp_path or "") for a in argv]
        self.args = args
        self._buf = bytearray()
        self._chunks = []  # (offset, monotonic time) per chunk read
        self._cv = threading.Condition()
        self._cmd_no = 0
        self.qmp = None
        self.events = []
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self.t_exit = None
        self.stderr = b""
        threading.Thread(target=self._read_console, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    # ------------------------------------------------------------ console
    def _read_console(self):
        line = bytearray()
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            with self._cv:
                if chunk:
                    self._chunks.append((len(self._buf), now))
                    self._buf += chunk
                else:
                    self.proc.wait()
                    self.t_exit = now
                self._cv.notify_all()
            if not chunk:
                return
            # Echo whole lines on the test host's console, labelled.
            line += chunk
            *whole, rest = line.split(b"\n")
            for w in whole:
                print(f"[{self.name}] {w.decode(errors='replace').rstrip()}", flush=True)
            line = bytearray(rest)

    def thread_report(self, sample_s=1.0):
        """One line per thread of the vmm: name, scheduler state, where it
        is and wchan. Where: KVM_RUN for a vCPU thread in that ioctl, a
        system call's number, or, for a thread on a CPU (the kernel cannot
        name a running thread's system call: /proc's syscall file says
        'running' even inside KVM_RUN), what its CPU time over SAMPLE_S
        seconds went to. A running thread whose time went to the guest or
        the kernel, not to user space, counts as in KVM_RUN (the test
        host's KVM running the guest, or emulating it). It tells a guest
        stalled by the emulation (its vCPU threads in KVM_RUN) from one
        stalled by the vmm (a vCPU thread anywhere else)."""
        hz = os.sysconf("SC_CLK_TCK")

        def read(base):
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"{base}/syscall") as f:
                sc = f.read().split()
            with open(f"{base}/wchan") as f:
                wchan = f.read().strip() or "-"
            # stat fields 14 utime, 15 stime, 43 guest_time (utime
            # includes it), counted from field 3, the state.
            ticks = (int(fields[11]), int(fields[12]), int(fields[40]))
            return comm, fields[0], sc, wchan, ticks

        try:
            tids = sorted(os.listdir(f"/proc/{self.pid}/task"), key=int)
        except OSError as e:
            return f"  (cannot list: {e})"
        first = {}
        for tid in tids:
            try:
                first[tid] = read(f"/proc/{self.pid}/task/{tid}")[4]
            except (OSError, IndexError, ValueError):
                pass
        time.sleep(sample_s)
        lines = []
        for tid in tids:
            try:
                comm, state, sc, wchan, ticks = read(f"/proc/{self.pid}/task/{tid}")
            except (OSError, IndexError, ValueError) as e:
                lines.append(f"  {tid}: (gone: {e})")
                continue
            extra = ""
            if sc and sc[0] == "16" and len(sc) > 2 and int(sc[2], 16) == 0xAE80:
                call = "KVM_RUN"
            elif sc and sc[0] == "running" and tid in first:
                u, k, g = (b - a for a, b in zip(first[tid], ticks))
                user, guest, kernel = (max(u - g, 0), g, k)
                ms = lambda t: round(1000 * t / hz)
                extra = (f", CPU over {sample_s:g} s: guest {ms(guest)} ms, kernel "
                         f"{ms(kernel)} ms, user space {ms(user)} ms")
                busy = user + guest + kernel
                call = "KVM_RUN" if busy > 0 and 4 * user < busy else "running"
            else:
                call = sc[0] if sc else "?"
            lines.append(f"  {tid} {comm}: state {state}, in {call}, wchan {wchan}{extra}")
        return "\n".join(lines)

    def _read_stderr(self):
        # Echoed as it comes, labelled, so that what the vmm logged (a
        # reset it saw, a warning) is in the test host's console log even
        # when the scenario fails and the vmm is killed.
        data = bytearray()
        for line in iter(self.proc.stderr.readline, b""):
            data += line
            print(f"[{self.name} vmm stderr] {line.decode(errors='replace').rstrip()}",
                  flush=True)
        with self._cv:
            self.stderr = bytes(data)
            self._cv.notify_all()

    @property
    def console(self):
        with self._cv:
            return self._buf.decode(errors="replace")

    def mark(self):
        """The console's current length: later waits can start there."""
        with self._cv:
            return len(self._buf)

    def time_of(self, offset):
        """When the console byte at OFFSET arrived (monotonic seconds)."""
        with self._cv:
            t = None
            for off, at in self._chunks:
                if off > offset:
                    break
                t = at
            return t

    def tail(self, n=40):
        return "\n".join(self.console.splitlines()[-n:])

    def wait_for(self, pattern, timeout, start=0, what=None):
        """Waits until regex PATTERN appears in the console after offset
        START; returns the match (its .start() is an offset). Raises Failed
        naming WHAT on timeout, or at once if the vmm exits first."""
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                m = rx.search(self._buf.decode(errors="replace"), start)
                if m:
                    return m
                if self.t_exit is not None:
                    raise Failed(f"{what or pattern!r}: the vmm exited with status "
                                 f"{self.proc.returncode} first; stderr: "
                                 f"{self.stderr.decode(errors='replace')[-2000:]}\n"
                                 f"console tail:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failed(f"{what or pattern!r} did not appear within {timeout} s; "
                                 f"console tail:\n{self.tail()}\n"
                                 f"vmm threads:\n{self.thread_report()}")
                self._cv.wait(min(left, 1.0))

    def type(self, text):
        """Types TEXT on the guest's console."""
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def sh(self, command, timeout=120):
        """Runs COMMAND in the guest's shell; returns (output, status).

        The markers are typed as arithmetic, so the terminal's echo of the
        typed line never matches what the shell prints."""
        self._cmd_no += 1
        n = self._cmd_no
        start = self.mark()
        self.type(f"echo @@B$(({n}+0)); {command}; echo @@E$(({n}+0)) $?\n")
        m = self.wait_for(rf"@@B{n}\r?\n(.*?)@@E{n} (\d+)\r?\n", timeout, start,
                          what=f"output of {command!r}")
        return m.group(1).replace("\r", ""), int(m.group(2))

    def sh_ok(self, command, timeout=120):
        out, rc = self.sh(command, timeout)
        if rc != 0:
            raise Failed(f"guest command {command!r} exited {rc}: {out[-2000:]}")
        return out

    # ------------------------------------------------------------ QMP
    def connect_qmp(self, timeout=60):
        """Connects QEMU's client to the vmm's QMP socket (retrying while
        the vmm starts) and negotiates capabilities."""
        deadline = time.monotonic() + timeout
        while True:
            q = QEMUMonitorProtocol(self.qmp_path)
            try:
                q.connect()
                self.qmp = q
                q.settimeout(60)
                return q
            except Exception as e:  # ConnectError until the socket accepts
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise Failed(f"cannot connect to QMP at {self.qmp_path}: {e}") from e
                time.sleep(0.1)

    def cmd(self, name, **args):
        """Runs a QMP command; returns its `return` value (raises on error)."""
        if self.qmp is None:
            self.connect_qmp()
        return self.qmp.cmd(name, **args)

    def pull_events(self):
        """Moves every event received so far into self.events."""
        if self.qmp is None:
            return self.events
        try:
            for ev in self.qmp.get_events(wait=False):
                ev["_t"] = time.monotonic()
                self.events.append(ev)
        except Exception:  # the vmm closed the socket at exit
            pass
        return self.events

    def wait_event(self, name, timeout, pred=lambda ev: True, after=0):
        """Waits for event NAME (matching PRED) among the events from index
        AFTER on; returns it. Raises Failed on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.pull_events()
            for ev in self.events[after:]:
                if ev["event"] == name and pred(ev):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"no {name} event within {timeout} s; got "
                             f"{[e['event'] for e in self.events]}")
            try:
                ev = self.qmp.pull_event(wait=min(left, 1.0))
                if ev:
                    ev["_t"] = time.monotonic()
                    self.events.append(ev)
            except Exception:
                if self.proc.poll() is not None:
                    self.pull_events()
                    for ev in self.events[after:]:
                        if ev["event"] == name and pred(ev):
                            return ev
                    raise Failed(f"the vmm exited before a {name} event") from None

    # ------------------------------------------------------------ lifetime
    def wait_exit(self, timeout):
        """Waits for the vmm to exit; returns its status."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.t_exit is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failed(f"the vmm did not exit within {timeout} s; console tail:\n"
                                 f"{self.tail()}")
                self._cv.wait(min(left, 1.0))
        if self.qmp is not None:
            self.pull_events()
            try:
                self.qmp.close()
            except Exception:  # EOF: the vmm already closed the socket
                pass
            self.qmp = None
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def rss_kib(self):
        return proc_status(self.pid, "VmRSS")
