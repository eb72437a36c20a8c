"""Connecting QEMU's qemu.qmp client to a VMM that is still starting."""

import asyncio
import time

from qemu.qmp import QMPClient


async def connect(name, path, timeout_s, poll_s=0.1):
    """A QMPClient called NAME connected to the socket at PATH, retrying
    until it exists and accepts (qemu.qmp raises ConnectError until then);
    exits with a message after TIMEOUT_S seconds."""
    q = QMPClient(name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await q.connect(path)
            return q
        except Exception:  # ConnectError until the socket exists
            if time.monotonic() >= deadline:
                raise SystemExit(f"cannot connect to {path} within {timeout_s} s")
            await asyncio.sleep(poll_s)
