#!/usr/bin/env python3
"""Writes the realistic seeds of the virtio-mem fuzz targets.

Both targets read their input with `arbitrary::Unstructured`, so a seed is
the byte sequence that makes them take the wanted choices. The encoding
mirrors arbitrary 1.x: `int_in_range(a..=b)` takes one byte per 8 bits of
`b - a` (most significant first) and adds the value modulo `b - a + 1` to
`a`; `ratio(n, d)` is `int_in_range(1..=d) <= n`; `bytes(n)` and arrays take
bytes as they are; `arbitrary::<u16>()` is little-endian.

Run from anywhere: `python3 fuzz/seeds/make_virtio_seeds.py`.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = 512

PLUG, UNPLUG, UNPLUG_ALL, STATE = 0, 2, 4, 5  # `kind` picks in request()


def blocks(n):
    """int_in_range(0..=512): two bytes."""
    return bytes([n >> 8, n & 0xff])


# ---- virtio_mem_request ---------------------------------------------------

def request(kind, block, nb, fail=False, shape=0, extra=b""):
    """One request op: kind pick, address pick 0 (block index), small
    nb_blocks, zero padding, backend failure flag, chain shape."""
    out = bytes([0, kind, 0]) + struct.pack(">H", block)
    out += bytes([0, nb])  # ratio(3, 4) true, then int_in_range(0..=8)
    out += bytes(24)  # raw request bytes (type, addr, count are overwritten)
    out += bytes([0 if fail else 1])  # ratio(1, 8)
    out += bytes([shape]) + extra
    return out


def set_size(n):
    return bytes([7]) + blocks(n)


HANDSHAKE = bytes([8])
SYSTEM_RESET = bytes([9])


def request_seeds():
    linux = blocks(64)
    for i in range(8):
        linux += request(PLUG, i * 2, 2)
    linux += request(STATE, 0, 8) + request(STATE, 14, 4)
    linux += request(UNPLUG, 4, 2) + request(STATE, 0, 8)
    linux += set_size(16) + request(UNPLUG, 8, 8) + request(UNPLUG_ALL, 0, 0)

    refused = blocks(4)
    refused += request(PLUG, 0, 8)  # more than requested: NACK
    refused += request(PLUG, 0, 0)  # no blocks: ERROR
    refused += request(PLUG, 512, 1)  # past the region: ERROR
    refused += request(UNPLUG, 0, 1)  # unplugged: ERROR
    refused += request(PLUG, 0, 2, fail=True)  # backend fails: BUSY
    refused += request(PLUG, 0, 2) + request(PLUG, 1, 2)  # overlap: ERROR

    malformed = blocks(8)
    for shape in [6, 7, 8, 9, 10, 11, 12, 13, 14]:
        extra = {6: bytes([16]), 7: bytes([4]), 9: bytes([1]), 10: bytes([4]),
                 11: bytes([0, 1]), 13: bytes([0, 0x20]), 14: bytes([0, 0x20])}
        malformed += request(PLUG, shape, 1, shape=shape, extra=extra.get(shape, b""))
        malformed += request(STATE, shape, 1)
    malformed += request(PLUG, 20, 1, shape=5, extra=bytes([7, 5]))

    resets = blocks(32) + request(PLUG, 0, 4) + HANDSHAKE + request(STATE, 0, 4)
    resets += SYSTEM_RESET + request(STATE, 0, 4) + set_size(0) + request(PLUG, 0, 1)
    resets += set_size(512) + request(PLUG, 500, 8) + request(UNPLUG_ALL, 0, 0)
    return {"linux_session": linux, "refused": refused, "malformed": malformed,
            "resets": resets}


# ---- virtio_mem_queue -----------------------------------------------------

def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue_seed(requested, table, avail_idx, ring, steps):
    table = table + bytes(256 - len(table))
    avail = struct.pack("<HH", 0, 0) + b"".join(struct.pack("<H", h) for h in ring)
    avail = avail + bytes(36 - len(avail))
    return blocks(requested) + table + avail + bytes([0, avail_idx]) + steps


def mem_write(addr, data):
    """Step 0: write `data` (1..=64 bytes) at `addr`."""
    return bytes([0]) + struct.pack("<H", addr) + bytes([len(data) - 1]) + data


def reg_write(offset, value):
    """Step 2: a register write with a raw value (ratio(1, 2) false)."""
    return bytes([2, offset // 4, 1]) + struct.pack("<I", value)


KICK = bytes([5])


def plug_request(block, nb):
    return struct.pack("<HHHHQHHHH", 0, 0, 0, 0, (1 << 32) + block * (2 << 20), nb, 0, 0, 0)


def queue_seeds():
    good = [desc(0x8000, 24, 1, 1), desc(0x9000, 10, 2, 0)]
    plug = queue_seed(16, b"".join(good), 1, [0],
                      mem_write(0x8000, plug_request(0, 2)) + KICK)
    loop = queue_seed(16, desc(0x8000, 24, 1, 1) + desc(0x9000, 10, 3, 0), 1, [0],
                      mem_write(0x8000, plug_request(0, 1)) + KICK)
    many = queue_seed(64, b"".join(desc(0x8000 + 32 * i, 24, 1, (2 * i + 1) % 16) +
                                   desc(0x9000 + 16 * i, 10, 2, 0) for i in range(8)),
                      8, list(range(0, 16, 2)),
                      b"".join(mem_write(0x8000 + 32 * i, plug_request(i, 1)) for i in range(8)) +
                      KICK)
    regs = queue_seed(16, b"".join(good), 1, [0],
                      reg_write(0x70, 0) + KICK + reg_write(0x70, 1) + reg_write(0x70, 3) +
                      reg_write(0x38, 3) + KICK + bytes([8]) + KICK)
    return {"plug": plug, "loop": loop, "eight_plugs": many, "registers": regs}


def main():
    for target, seeds in [("virtio_mem_request", request_seeds()),
                          ("virtio_mem_queue", queue_seeds())]:
        for name, data in seeds.items():
            with open(os.path.join(HERE, target, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
