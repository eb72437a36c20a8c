"""The main job's QMP side: waits for the guest, plugs 256 MiB of memory,
waits until the guest has it, unplugs it, waits until the host has it back,
and ends the VM. Uses QEMU's own Python client (qemu.qmp), as any QMP user
would. Progress goes to stderr, prefixed 'demo:'.

Usage: demo.py SOCKET [PLUG_MIB]
"""

import asyncio
import sys
import time

from qmp_connect import connect

MIB = 1 << 20


def say(msg):
    print(f"demo: {msg}", file=sys.stderr, flush=True)


async def main(path, plug_mib):
    q = await connect("demo", path, 60)
    v = await q.execute("query-version")
    say(f"connected to QMP ({v['package']})")

    async def events():
        async for ev in q.events:
            data = ev.get("data")
            say(f"event {ev['event']} {dict(data) if data else ''}")

    listener = asyncio.create_task(events())

    async def device():
        return (await q.execute("query-memory-devices"))[0]["data"]

    async def wait(pred, what, limit=900):
        t0 = time.time()
        while time.time() - t0 < limit:
            if await pred():
                return time.time() - t0
            await asyncio.sleep(0.25)
        raise SystemExit(f"timed out waiting for {what}")

    d = await device()
    say(f"virtio-mem vmem0: {d['max-size'] // MIB} MiB region at {d['memaddr']:#x}, "
        f"block {d['block-size'] // MIB} MiB")
    say(f"asking the guest to plug {plug_mib} MiB (qom-set requested-size)")
    await q.execute("qom-set", {"path": "vmem0", "property": "requested-size",
                                "value": plug_mib * MIB})

    async def plugged():
        return (await device())["size"] == plug_mib * MIB

    took = await wait(plugged, "the guest to plug")
    s = await q.execute("query-memory-size-summary")
    h = await q.execute("x-query-hotplug")
    say(f"guest plugged {plug_mib} MiB in {took:.1f} s: base {s['base-memory'] // MIB} MiB + "
        f"plugged {s['plugged-memory'] // MIB} MiB; {len(h['mapped-slots'])} hot-plug slots mapped")

    say("asking the guest to unplug everything")
    await q.execute("qom-set", {"path": "/machine/peripheral/vmem0",
                                "property": "requested-size", "value": 0})

    async def returned():
        h = await q.execute("x-query-hotplug")
        st = h["stats"]
        return ((await device())["size"] == 0 and not h["mapped-slots"]
                and st["slots_unmapped"] == st["slots_retired"])

    took = await wait(returned, "the guest to unplug and the host to get the memory back")
    r = await q.execute("x-query-rcu")
    say(f"unplugged and returned to the host in {took:.1f} s "
        f"(call_rcu so far {r['call_rcu']}, force_rcu {r['force_rcu']})")
    say("ending the VM (quit)")
    await q.execute("quit")
    listener.cancel()
    try:
        await q.disconnect()
    except Exception:
        pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256))
