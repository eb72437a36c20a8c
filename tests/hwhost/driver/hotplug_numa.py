"""Several virtio-mem devices in NUMA nodes (issue 14, item 5), as the
distribution kernel sees them: two `--hotplug-memory` devices, the second
with `node=1`, each resized over QMP by its id; the guest's per-node
meminfo shows each plug in its device's node and in no other."""

import re
import time

from guest_checks import GIB, boot, meminfo_kib, power_off_after_hotplug
from l2_vm import MIB, Failed, Vm

NODE_SYS = "/sys/devices/system/node"


def sys_line(vm, path):
    """The first line of a sysfs file in the guest, stripped."""
    return vm.sh_ok(f"cat {path}").strip()


def node_memtotal_kib(vm, node):
    """Node NODE's MemTotal in KiB from its sysfs meminfo, or None when the
    guest has no such node directory (a node that is possible but not
    online)."""
    out = vm.sh_ok(f"if [ -e {NODE_SYS}/node{node}/meminfo ]; then "
                   f"sed -n 's/^Node {node} MemTotal: *\\([0-9]*\\) kB$/\\1/p' "
                   f"{NODE_SYS}/node{node}/meminfo; else echo absent; fi").strip()
    if out == "absent":
        return None
    if not out.isdigit():
        raise Failed(f"node{node}/meminfo has no MemTotal line: {out!r}")
    return int(out)


def node_memories(vm):
    """{node: MemTotal KiB or None} for nodes 0 and 1, the global MemTotal,
    and the guest's has_memory node list."""
    return ({n: node_memtotal_kib(vm, n) for n in (0, 1)}, meminfo_kib(vm),
            sys_line(vm, f"{NODE_SYS}/has_memory"))


def wait_nodes(vm, done, timeout):
    """Polls node_memories until DONE(nodes, total, has_memory) holds or
    TIMEOUT seconds pass; returns the last reading. The guest onlines and
    offlines memory a while after the device reports its size."""
    t0 = time.monotonic()
    while True:
        got = node_memories(vm)
        if done(*got) or time.monotonic() - t0 > timeout:
            return got
        time.sleep(1)


def sizes(vm):
    """{id: plugged size} from query-memory-devices."""
    return {d["data"]["id"]: d["data"]["size"] for d in vm.cmd("query-memory-devices")}


def resize(vm, dev, size, timeout):
    """Sets DEV's requested-size to SIZE over QMP and waits for its plugged
    size to reach it and for the MEMORY_DEVICE_SIZE_CHANGE with that id and
    size; returns (seconds, ids of the size-change events on the way)."""
    ev0 = len(vm.pull_events())
    t0 = time.monotonic()
    vm.cmd("qom-set", path=dev, property="requested-size", value=size)
    while True:
        got = sizes(vm).get(dev)
        if got == size:
            break
        if time.monotonic() - t0 > timeout:
            raise Failed(f"{dev}: size {got}, not {size}, after {timeout} s: "
                         f"{vm.cmd('query-memory-devices')}")
        time.sleep(0.5)
    secs = time.monotonic() - t0
    vm.wait_event("MEMORY_DEVICE_SIZE_CHANGE", 30,
                  lambda e: e["data"]["id"] == dev and e["data"]["size"] == size, after=ev0)
    ids = [e["data"].get("id") for e in vm.events[ev0:]
           if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
    return secs, ids


def hotplug_numa(res, args):
    """2 vCPUs, 1 GiB, two virtio-mem devices with 2 GiB regions each:
    `vmem0` (no node=: node 0, where the SRAT puts its range) and `fast`
    (node=1, a node with no CPU and no boot memory). The guest knows node 1
    from the SRAT; plug 512 MiB into `fast`: node 1 has 512 MiB, node 0
    unchanged; plug 256 MiB into vmem0: node 0 grows by 256 MiB, node 1
    unchanged; unplug `fast` then vmem0 to 0: each node back to its base;
    `poweroff -f` -> exit 0 and callbacks_run == call_rcu."""
    region = 2 * GIB
    fast_plug = (args.plug_mib or 512) * MIB
    vmem0_plug = 256 * MIB
    vm = Vm("hotplug-numa", 2, "1G", hotplug=f"size={region >> 30}G,id=vmem0",
            extra=["--hotplug-memory", f"size={region >> 30}G,id=fast,node=1"])
    # The layout rule: 1 GiB of RAM ends below the 32-bit hole, so hot-plug
    # starts at 4 GiB; the second region follows the first.
    vmem0_base, fast_base = 4 * GIB, 4 * GIB + region
    try:
        boot(res, vm)
        vm.connect_qmp()
        devs = {d["data"]["id"]: d["data"] for d in vm.cmd("query-memory-devices")}
        res.check("query-memory-devices: vmem0 in node 0 and fast in node 1, at their bases",
                  set(devs) == {"vmem0", "fast"}
                  and (devs["vmem0"]["memaddr"], devs["vmem0"]["node"]) == (vmem0_base, 0)
                  and (devs["fast"]["memaddr"], devs["fast"]["node"]) == (fast_base, 1)
                  and all(d["max-size"] == region and d["size"] == 0 for d in devs.values()),
                  devs)

        # What the guest knows of its nodes before any plug.
        listing = vm.sh_ok(f"ls {NODE_SYS}/").split()
        res.figure("guest's /sys/devices/system/node before the plug", " ".join(listing))
        possible = sys_line(vm, f"{NODE_SYS}/possible")
        res.check("guest's possible NUMA nodes are 0 and 1 (the SRAT's)", possible == "0-1",
                  possible)
        res.check("guest has node0", "node0" in listing, listing)
        res.figure("guest's online nodes before the plug", sys_line(vm, f"{NODE_SYS}/online"))
        has_cpu = sys_line(vm, f"{NODE_SYS}/has_cpu")
        res.check("only node 0 has CPUs", has_cpu == "0", has_cpu)
        nodes0, total0, has0 = node_memories(vm)
        res.check("before the plug only node 0 has memory",
                  has0 == "0" and nodes0[0] and not nodes0[1],
                  {"has_memory": has0, "memtotal_kib": nodes0})
        base0 = nodes0[0]
        res.figure("node 0 MemTotal before the plug", base0, "KiB")

        # The guest's SRAT as it parsed it, and each virtio-mem driver's node:
        # the driver prints its start address and nid.
        dm = vm.sh_ok("dmesg | grep -E 'SRAT|virtio_mem' || true")
        for dev, node, base in (("vmem0", 0, vmem0_base), ("fast", 1, fast_base)):
            srat = (rf"SRAT: Node {node} PXM {node} "
                    rf"\[mem 0x0*{base:x}-0x0*{base + region - 1:x}\] hotplug")
            res.check(f"the guest's SRAT puts {dev}'s region in node {node}, hot-pluggable",
                      re.search(srat, dm) is not None,
                      [line for line in dm.splitlines() if "SRAT" in line])
        by_dev = {}
        for m in re.finditer(r"virtio_mem (virtio\d+): (start address|nid): (\S+)", dm):
            by_dev.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
        nid_at = {int(v["start address"], 16): int(v["nid"]) for v in by_dev.values()
                  if "start address" in v and "nid" in v}
        res.check("the guest's virtio-mem drivers: vmem0's region in node 0, fast's in node 1",
                  nid_at == {vmem0_base: 0, fast_base: 1}, by_dev)

        # Plug fast: node 1 gets exactly the plug, node 0 nothing.
        secs, ids = resize(vm, "fast", fast_plug, 600)
        res.figure(f"plug {fast_plug >> 20} MiB into fast (QMP to size reached)",
                   round(secs, 1), "s")
        res.check("size-change events of the fast plug carry id fast",
                  ids and all(i == "fast" for i in ids), ids)
        res.check("vmem0 stays empty", sizes(vm)["vmem0"] == 0, sizes(vm))
        want = {0: base0, 1: fast_plug // 1024}
        nodes, total, has = wait_nodes(vm, lambda n, t, h: n == want and h == "0-1", 120)
        res.check("node 1 MemTotal is fast's plug, node 0's unchanged", nodes == want,
                  {"want_kib": want, "got_kib": nodes})
        res.check("guest MemTotal grew by fast's plug", total == total0 + fast_plug // 1024,
                  {"before_kib": total0, "now_kib": total})
        res.check("nodes 0 and 1 have memory", has == "0-1", has)
        res.check("node 1 is online", sys_line(vm, f"{NODE_SYS}/online") == "0-1",
                  sys_line(vm, f"{NODE_SYS}/online"))

        # Plug vmem0: node 0 grows, node 1 keeps fast's plug.
        secs, ids = resize(vm, "vmem0", vmem0_plug, 600)
        res.figure(f"plug {vmem0_plug >> 20} MiB into vmem0 (QMP to size reached)",
                   round(secs, 1), "s")
        res.check("size-change events of the vmem0 plug carry id vmem0",
                  ids and all(i == "vmem0" for i in ids), ids)
        res.check("fast keeps its plug", sizes(vm)["fast"] == fast_plug, sizes(vm))
        want = {0: base0 + vmem0_plug // 1024, 1: fast_plug // 1024}
        nodes, total, _ = wait_nodes(vm, lambda n, t, h: n == want, 120)
        res.check("node 0 grew by vmem0's plug, node 1 unchanged", nodes == want,
                  {"want_kib": want, "got_kib": nodes})
        res.check("guest MemTotal is the base plus both plugs",
                  total == total0 + (fast_plug + vmem0_plug) // 1024,
                  {"before_kib": total0, "now_kib": total})

        # Unplug fast: node 1 back to no memory (its directory may go with
        # it: Linux offlines a node left without memory or CPUs).
        secs, ids = resize(vm, "fast", 0, 900)
        res.figure("unplug fast to 0 (QMP to size 0)", round(secs, 1), "s")
        res.check("size-change events of the fast unplug carry id fast",
                  ids and all(i == "fast" for i in ids), ids)
        res.check("vmem0 keeps its plug", sizes(vm)["vmem0"] == vmem0_plug, sizes(vm))
        nodes, total, has = wait_nodes(
            vm, lambda n, t, h: n[0] == base0 + vmem0_plug // 1024 and not n[1] and h == "0",
            120)
        res.check("after fast's unplug node 1 has no memory, node 0 keeps vmem0's plug",
                  nodes[0] == base0 + vmem0_plug // 1024 and not nodes[1] and has == "0",
                  {"memtotal_kib": nodes, "has_memory": has})
        res.figure("guest's online nodes after fast's unplug", sys_line(vm, f"{NODE_SYS}/online"))

        # Unplug vmem0: node 0 back to its base.
        secs, ids = resize(vm, "vmem0", 0, 900)
        res.figure("unplug vmem0 to 0 (QMP to size 0)", round(secs, 1), "s")
        res.check("size-change events of the vmem0 unplug carry id vmem0",
                  ids and all(i == "vmem0" for i in ids), ids)
        nodes, total, has = wait_nodes(
            vm, lambda n, t, h: n[0] == base0 and not n[1] and h == "0", 120)
        res.check("node 0 back to its base, node 1 still without memory",
                  nodes[0] == base0 and not nodes[1] and has == "0",
                  {"base0_kib": base0, "memtotal_kib": nodes, "has_memory": has})
        res.check("guest MemTotal back to its base", total == total0,
                  {"before_kib": total0, "now_kib": total})
        res.check("both devices at 0", sizes(vm) == {"vmem0": 0, "fast": 0}, sizes(vm))

        power_off_after_hotplug(res, vm)
    finally:
        vm.kill()
