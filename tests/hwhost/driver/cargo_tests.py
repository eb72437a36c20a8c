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
    # --runs N repeats each binary N times (default 1), to catch a test
    # that fails only now and then; every failed run is reported with its
    # output's tail.
    runs = args.runs or 1
    for n in names:
        extra = []
        if os.path.exists(os.path.join(d, n + ".args")):
            with open(os.path.join(d, n + ".args")) as f:
                extra = f.read().split()
        passed, failed_runs = 0, []
        t0 = time.monotonic()
        for r in range(1, runs + 1):
            p = subprocess.run([os.path.join(d, n), "--nocapture", "--test-threads=1", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               timeout=1800)
            out = p.stdout.decode(errors="replace")
            for line in out.splitlines():
                print(f"[{n} run {r}] {line}", flush=True)
            skipped = [line for line in out.splitlines() if "SKIPPED" in line]
            m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", out)
            passed += int(m.group(2)) if m else 0
            if not (p.returncode == 0 and m is not None and int(m.group(2)) > 0 and not skipped):
                tail = "\n".join(out.splitlines()[-60:])
                failed_runs.append(f"run {r}: status {p.returncode}, skipped {skipped}, "
                                   f"last lines:\n{tail}")
        res.figure(f"{n}: passed", passed)
        res.figure(f"{n}: seconds per run", round((time.monotonic() - t0) / runs, 1), "s")
        res.check(f"{n} {' '.join(extra)}: every test passes in each of {runs} run(s), none skipped",
                  not failed_runs, "\n".join(failed_runs))
