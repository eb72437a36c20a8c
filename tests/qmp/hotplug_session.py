"""Drives a running vmm over QMP with QEMU's own client (qemu.qmp) and
records what it sees, as one JSON object on stdout. The Rust test that runs
this script makes the assertions; this script only acts and observes.

Usage: hotplug_session.py SOCKET PID SIZES
  SOCKET  the vmm's QMP socket
  PID     the vmm's process id (for /proc/PID/maps and status)
  SIZES   comma-separated plug sizes in MiB, one plug/unplug cycle each
Phase 1 sends bad input (raw sockets and typed mistakes) while the guest
runs; phase 2 plugs and unplugs memory; then it quits the VM.
"""

import asyncio
import json
import socket
import sys
import time

from qemu.qmp import ExecuteError
from qmp_connect import connect

MIB = 1 << 20
LIMIT = 600  # seconds to wait for the guest's driver; it is emulated here


def proc_maps(pid):
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            a, b = line.split()[0].split("-")
            out.append((int(a, 16), int(b, 16), line.strip()))
    return out


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def raw_exchange(path, payloads, settle=1.0):
    """Sends raw bytes on a fresh connection, one payload at a time, and
    collects every reply line that arrives until `settle` seconds pass with
    nothing new; returns the replies (greeting first) and whether the
    server closed the connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    buf = b""
    replies = []
    closed = False

    def drain(limit):
        nonlocal buf, closed
        s.settimeout(limit)
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return
            except ConnectionResetError:
                closed = True
                return
            if not chunk:
                closed = True
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    replies.append(json.loads(line))
            s.settimeout(settle)

    drain(10)
    for p in payloads:
        if closed:
            break
        try:
            s.sendall(p)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        drain(settle)
    s.close()
    return {"replies": replies, "closed": closed}


async def error_of(q, cmd, args=None):
    try:
        await q.execute(cmd, args)
        return None
    except ExecuteError as e:
        return {"class": e.error.error.class_, "desc": e.error.error.desc}


async def main(path, pid, sizes):
    q = await connect("vmm-hotplug-test", path, 60)
    events = []

    async def collect():
        async for ev in q.events:
            raw = json.loads(bytes(ev))
            events.append({"event": raw["event"], "data": raw.get("data"), "t": time.time()})

    collector = asyncio.create_task(collect())
    rep = {}

    # Phase 1: bad input while the guest runs.
    bad = {}
    bad["before_negotiation"] = raw_exchange(
        path, [b'{"execute": "query-status", "id": 1}'])
    neg = b'{"execute": "qmp_capabilities"}'
    bad["malformed_json"] = raw_exchange(
        path, [neg, b'{"execute": "query-status", "id": ]}\n', b'{"execute": "query-status", "id": 2}'])
    bad["not_an_object"] = raw_exchange(path, [neg, b'[1, 2, 3]'])
    bad["ten_mib_line"] = raw_exchange(path, [neg, b'{"execute": "' + b"x" * (10 * MIB) + b'"}'])
    # A client that disconnects mid-message.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(neg + b'{"execute": "query-st')
    s.close()
    # 100 connects and disconnects.
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.close()
    bad["unknown_command"] = await error_of(q, "no-such-command")
    bad["wrong_type"] = await error_of(
        q, "qom-set", {"path": "vmem0", "property": "requested-size", "value": "256M"})
    bad["missing_argument"] = await error_of(q, "qom-set", {"path": "vmem0", "property": "requested-size"})
    bad["unexpected_argument"] = await error_of(q, "query-status", {"verbose": True})
    bad["not_block_multiple"] = await error_of(
        q, "qom-set", {"path": "vmem0", "property": "requested-size", "value": MIB + 4096})
    bad["too_large"] = await error_of(
        q, "qom-set", {"path": "vmem0", "property": "requested-size", "value": 64 << 30})
    bad["unknown_device"] = await error_of(
        q, "qom-set", {"path": "vmem9", "property": "requested-size", "value": 0})
    bad["status_after"] = await q.execute("query-status")
    rep["bad_input"] = bad

    rep["cpus"] = await q.execute("query-cpus-fast")
    rep["version"] = await q.execute("query-version")

    # Phase 2: plug/unplug cycles.
    cycles = []
    rep["maps_before"] = [m[2] for m in proc_maps(pid)]
    rep["rss_before_kib"] = vm_rss_kib(pid)

    async def size_now():
        return (await q.execute("query-memory-devices"))[0]["data"]["size"]

    async def size_is(want):
        return await size_now() == want

    async def event_seen(size):
        last = [e for e in events if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
        return bool(last) and last[-1]["data"]["size"] == size

    async def wait_until(pred, limit):
        end = time.time() + limit
        while time.time() < end:
            if await pred():
                return True
            await asyncio.sleep(0.25)
        return False

    for mib in sizes:
        c = {"size": mib * MIB}
        c["rcu_before"] = await q.execute("x-query-rcu")
        c["hotplug_before"] = await q.execute("x-query-hotplug")
        t0 = time.time()
        await q.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": mib * MIB})
        c["plugged"] = await wait_until(lambda: size_is(mib * MIB), LIMIT)
        c["plug_s"] = time.time() - t0
        # Size-change events are rate-limited as in QEMU (one per second per
        # device, the last value always delivered): wait for the final one.
        c["plug_event"] = await wait_until(lambda: event_seen(mib * MIB), 5)
        c["devices_plugged"] = await q.execute("query-memory-devices")
        c["summary_plugged"] = await q.execute("query-memory-size-summary")
        c["hotplug_plugged"] = await q.execute("x-query-hotplug")
        c["maps_plugged"] = [m[2] for m in proc_maps(pid)]
        c["rcu_plugged"] = await q.execute("x-query-rcu")
        t0 = time.time()
        await q.execute("qom-set", {"path": "/machine/peripheral/vmem0",
                                    "property": "requested-size", "value": 0})
        c["unplugged"] = await wait_until(lambda: size_is(0), LIMIT)

        async def unmapped():
            h = await q.execute("x-query-hotplug")
            st = h["stats"]
            return not h["mapped-slots"] and st["slots_unmapped"] == st["slots_retired"]

        c["returned"] = await wait_until(unmapped, 60)
        c["unplug_s"] = time.time() - t0
        c["unplug_event"] = await wait_until(lambda: event_seen(0), 5)
        c["hotplug_after"] = await q.execute("x-query-hotplug")
        c["rcu_after"] = await q.execute("x-query-rcu")
        c["maps_after"] = [m[2] for m in proc_maps(pid)]
        c["rss_after_kib"] = vm_rss_kib(pid)
        cycles.append(c)

    rep["cycles"] = cycles
    await asyncio.sleep(0.5)
    rep["events"] = list(events)
    rep["status_end"] = await q.execute("query-status")
    # The last live report: the test compares it with --rcu-stats's file.
    rep["rcu_end"] = await q.execute("x-query-rcu")
    await q.execute("quit")
    collector.cancel()
    try:
        await q.disconnect()
    except Exception:
        pass
    print(json.dumps(rep))


if __name__ == "__main__":
    sock, pid, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    asyncio.run(main(sock, pid, sizes))
