"""The integration tests that need hardware virtualization, run on the
test host's KVM."""

import os
import re
import subprocess
import time


def cargo_tests(res, args):
    """The integration tests that need hardware virtualization (they skip,
    or take their emulation branch, on software-nested hosts), run here on
    L1's /dev/kvm: the test binaries run.sh put in /opt/vmm/tests, each with
    the filter in its .args file."""
    d = "/opt/vmm/tests"
    names = sorted(n for n in os.listdir(d) if not n.endswith(".args")) if os.path.isdir(d) else []
    res.check("test binaries present", bool(names), d)
    env = dict(os.environ, VMM_GUEST_KIT="/kit", RUST_BACKTRACE="1")
    # The tests run the debug vmm at the absolute path it was built at
    # (CARGO_BIN_EXE_vmm): make that path lead to the copy run.sh brought.
    with open("/opt/vmm/vmm-debug.path") as f:
        built_at = f.read().strip()
    if not os.path.exists(built_at):
        os.makedirs(os.path.dirname(built_at), exist_ok=True)
        os.symlink("/opt/vmm/vmm-debug", built_at)
    for n in names:
        extra = []
        if os.path.exists(os.path.join(d, n + ".args")):
            with open(os.path.join(d, n + ".args")) as f:
                extra = f.read().split()
        t0 = time.monotonic()
        p = subprocess.run([os.path.join(d, n), "--nocapture", "--test-threads=1", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           timeout=1800)
        out = p.stdout.decode(errors="replace")
        for line in out.splitlines():
            print(f"[{n}] {line}", flush=True)
        skipped = [line for line in out.splitlines() if "SKIPPED" in line]
        m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", out)
        res.figure(f"{n}: passed", int(m.group(2)) if m else 0)
        res.figure(f"{n}: seconds", round(time.monotonic() - t0, 1), "s")
        res.check(f"{n} {' '.join(extra)}: every test passes, none skipped",
                  p.returncode == 0 and m is not None and int(m.group(2)) > 0 and not skipped,
                  {"status": p.returncode, "skipped": skipped,
                   "tail": "\n".join(out.splitlines()[-30:])})
