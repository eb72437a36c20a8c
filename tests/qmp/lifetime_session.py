"""One VM lifetime for the RCU experiment: waits for the guest, runs K
plug/unplug cycles of SIZE MiB over QMP (QEMU's qemu.qmp client), timing
each plug (qom-set until the guest reports the size) and each unplug
(qom-set 0 until the host has unmapped the slot memory), then quits.
Prints one JSON object on stdout. Against QEMU, which has no
x-query-hotplug, an unplug is complete when the device reports size 0, and
the host-side figures are left out.

Usage: lifetime_session.py SOCKET CYCLES SIZE_MIB
"""

import asyncio
import json
import sys
import time

from qmp_connect import connect

MIB = 1 << 20


async def main(path, cycles, size_mib):
    t_start = time.time()
    q = await connect("rcu-experiment", path, 300, poll_s=0.05)

    ours = "x-query-hotplug" in [c["name"] for c in await q.execute("query-commands")]

    async def device():
        return (await q.execute("query-memory-devices"))[0]["data"]

    async def hotplug():
        return await q.execute("x-query-hotplug")

    async def size_is(want):
        return (await device())["size"] == want

    async def wait(pred, limit=900):
        t0 = time.time()
        while time.time() - t0 < limit:
            if await pred():
                return time.time() - t0
            await asyncio.sleep(0.05)
        raise SystemExit("timed out")

    out = {"cycles": []}
    for _ in range(cycles):
        c = {}
        t0 = time.time()
        await q.execute("qom-set", {"path": "vmem0", "property": "requested-size",
                                    "value": size_mib * MIB})
        c["plug_s"] = await wait(lambda: size_is(size_mib * MIB))
        await q.execute("qom-set", {"path": "vmem0", "property": "requested-size", "value": 0})

        async def returned():
            if not ours:
                return await size_is(0)
            h = await hotplug()
            st = h["stats"]
            return (await device())["size"] == 0 and not h["mapped-slots"] \
                and st["slots_unmapped"] == st["slots_retired"]

        c["unplug_s"] = await wait(returned)
        if not ours:
            out["cycles"].append(c)
            continue
        h = await hotplug()
        c["retire_to_unmap_us"] = h["stats"]["last_retire_to_unmap_ns"] / 1000
        c["last_swap_us"] = h["stats"]["last_swap_ns"] / 1000
        out["cycles"].append(c)

    if ours:
        out["hotplug"] = await hotplug()
    out["wall_s"] = time.time() - t_start
    await q.execute("quit")
    try:
        await q.disconnect()
    except Exception:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    sock, cycles, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(main(sock, cycles, size))
