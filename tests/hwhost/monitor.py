#!/usr/bin/env python3
"""Runs the test host (QEMU TCG) and reads its results as they arrive.

Usage: monitor.py --out DIR --timeout S --stall S -- QEMU-COMMAND...

QEMU's first serial port is written to DIR/console.log (the test host's
console, with the L2 consoles the driver echoes), the second to
DIR/results.jsonl (the driver's JSON lines, see driver/hwhost_driver.py).
DIR/outcome gets one line on how the run ended: 'done', 'qemu-exited' (QEMU
ended before the driver said it was done), 'stalled' (killed after --stall
seconds with nothing new), 'killed' (killed at --timeout) or 'fatal', then
QEMU's exit status.
Prints each scenario's checks and figures as they come, then a summary,
and the closing line 'hwhost: N passed, M failed'. Exits 0 only if every
scenario passed and the driver said it was done. Kills QEMU when the whole
run exceeds --timeout seconds or nothing new arrives for --stall seconds.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--stall", type=float, required=True)
    ap.add_argument("--expect", default="", help="comma-separated scenarios that must end")
    ap.add_argument("--follow", action="store_true", help="also print the console as it comes")
    ap.add_argument("qemu", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    qemu = a.qemu[1:] if a.qemu and a.qemu[0] == "--" else a.qemu
    console = os.path.join(a.out, "console.log")
    results = os.path.join(a.out, "results.jsonl")
    for p in (console, results):
        open(p, "w").close()
    with open(os.path.join(a.out, "qemu.log"), "w") as qlog:
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    last_change = t0
    sizes = (0, 0)
    pos = 0
    cpos = 0
    partial = ""
    ended = {}  # scenario -> end record
    figures = {}  # scenario -> [(name, value, unit)]
    done = fatal = None
    killed = None
    stalled = False
    data = open(os.path.join(a.out, "data.jsonl"), "w")

    def handle(rec):
        nonlocal done, fatal
        t = rec.get("t")
        s = rec.get("scenario")
        at = f"{time.monotonic() - t0:7.1f}s"
        if t == "begin":
            print(f"hwhost: {at} scenario {s} begins", flush=True)
        elif t == "check":
            mark = "ok  " if rec["ok"] else "FAIL"
            line = f"hwhost: {at}   {mark} {rec['check']}"
            if not rec["ok"]:
                line += f"\n{json.dumps(rec.get('detail'), indent=1)[:4000]}"
            print(line, flush=True)
        elif t == "figure":
            figures.setdefault(s, []).append((rec["name"], rec["value"], rec.get("unit", "")))
            print(f"hwhost: {at}   figure {rec['name']}: {rec['value']} {rec.get('unit', '')}",
                  flush=True)
        elif t == "data":
            data.write(json.dumps(rec) + "\n")
            data.flush()
        elif t == "end":
            ended[s] = rec
            word = "passed" if rec["ok"] else "FAILED"
            print(f"hwhost: {at} scenario {s} {word} after {rec['secs']} s (test-host clock)",
                  flush=True)
            if rec.get("error"):
                print(rec["error"][:6000], flush=True)
        elif t == "done":
            done = rec
        elif t == "fatal":
            fatal = rec["msg"]
            print(f"hwhost: FATAL in the test host: {fatal}", flush=True)

    while True:
        running = proc.poll() is None
        with open(results, errors="replace") as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        if chunk:
            partial += chunk.replace("\r", "")
            *lines, partial = partial.split("\n")
            for line in lines:
                line = line.strip()
                if not line:
                    continue
                try:
                    handle(json.loads(line))
                except (ValueError, KeyError):
                    print(f"hwhost: unreadable result line: {line[:200]}", flush=True)
        if a.follow:
            with open(console, "rb") as f:
                f.seek(cpos)
                text = f.read()
                cpos += len(text)
            sys.stdout.write(text.decode(errors="replace").replace("\r", ""))
            sys.stdout.flush()
        now_sizes = (pos, os.path.getsize(console))
        if now_sizes != sizes:
            sizes = now_sizes
            last_change = time.monotonic()
        if not running:
            break
        now = time.monotonic()
        if now - t0 > a.timeout:
            killed = f"the run exceeded its limit of {a.timeout:.0f} s"
        elif now - last_change > a.stall:
            killed = f"nothing new from the test host for {a.stall:.0f} s"
            stalled = True
        if killed:
            proc.kill()
            proc.wait()
            print(f"hwhost: stopped QEMU: {killed}", flush=True)
            break
        time.sleep(0.5)

    elapsed = time.monotonic() - t0
    expected = [s for s in a.expect.split(",") if s]
    passed = [s for s, r in ended.items() if r["ok"]]
    failed = [s for s, r in ended.items() if not r["ok"]]
    missing = [s for s in expected if s not in ended]
    ok = not failed and not missing and done is not None and not fatal and not killed
    why = ""
    if not ok:
        why = fatal or killed or ("QEMU exited before the driver finished" if done is None else "")
        if why:
            print(f"hwhost: {why}; QEMU status {proc.returncode}; last lines of "
                  f"{console}:\n{tail(console, 80)}\nqemu.log:\n{tail(os.path.join(a.out, 'qemu.log'), 20)}",
                  flush=True)
    print(f"\nhwhost: summary after {elapsed:.0f} s (logs in {a.out})")
    for s, r in ended.items():
        print(f"  {'passed' if r['ok'] else 'FAILED'}  {s}  ({r['secs']} s)")
        for name, value, unit in figures.get(s, []):
            print(f"            {name}: {value} {unit}")
        if not r["ok"] and r.get("error"):
            # Again here, at the end: CI shows a run's last lines first.
            print(f"            why: {r['error'][-3000:]}")
    for s in missing:
        print(f"  NOT RUN {s}")
    # How the run ended, for run.sh's retry rules: one line, a word first.
    early = ("fatal" if fatal else "stalled" if stalled else "killed" if killed
             else "qemu-exited" if done is None else "done")
    with open(os.path.join(a.out, "outcome"), "w") as f:
        f.write(f"{early} {proc.returncode}\n")
    if not ok and why:
        # Once more at the very end, where CI's excerpt of a long log starts.
        print(f"hwhost: the run ended early: {why}; QEMU status {proc.returncode}", flush=True)
    print(f"hwhost: {len(passed)} passed, {len(failed) + len(missing)} failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
