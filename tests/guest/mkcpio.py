#!/usr/bin/env python3
"""Writes an uncompressed newc cpio archive (a Linux initramfs) without root.

Usage: mkcpio.py SPEC OUTPUT     (SPEC may be "-" for standard input)

SPEC uses the line format of the kernel's usr/gen_init_cpio:
    dir   <name> <mode> <uid> <gid>
    file  <name> <source> <mode> <uid> <gid>
    nod   <name> <mode> <uid> <gid> <c|b> <major> <minor>
    slink <name> <target> <mode> <uid> <gid>
Blank lines and lines starting with '#' are ignored. Modes are octal.
Entries are written in SPEC order (list a directory before its contents).
Every timestamp is 0, so the same SPEC and sources give the same bytes.
The output is written to a temporary file and renamed into place.
"""

import os
import stat
import sys
import tempfile

TRAILER = "TRAILER!!!"


class SpecError(Exception):
    """A SPEC line that cannot be turned into an archive entry."""


def _header(ino, mode, uid, gid, nlink, filesize, rmajor, rminor, namesize):
    fields = (ino, mode, uid, gid, nlink, 0, filesize, 0, 0, rmajor, rminor, namesize, 0)
    return ("070701" + "".join("%08X" % f for f in fields)).encode("ascii")


def _pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def _entry(ino, name, mode, uid, gid, nlink=1, data=b"", rdev=(0, 0)):
    name_b = name.encode() + b"\0"
    hdr = _header(ino, mode, uid, gid, nlink, len(data), rdev[0], rdev[1], len(name_b))
    out = hdr + name_b
    out += _pad(len(out))
    out += data + _pad(len(data))
    return out


def _parse_line(words, lineno):
    kind = words[0]
    try:
        if kind == "dir" and len(words) == 5:
            name, mode, uid, gid = words[1], int(words[2], 8), int(words[3]), int(words[4])
            return dict(name=name, mode=stat.S_IFDIR | mode, uid=uid, gid=gid, nlink=2)
        if kind == "file" and len(words) == 6:
            name, src = words[1], words[2]
            mode, uid, gid = int(words[3], 8), int(words[4]), int(words[5])
            with open(src, "rb") as f:
                data = f.read()
            return dict(name=name, mode=stat.S_IFREG | mode, uid=uid, gid=gid, data=data)
        if kind == "nod" and len(words) == 8:
            name, mode, uid, gid = words[1], int(words[2], 8), int(words[3]), int(words[4])
            if words[5] not in ("c", "b"):
                raise SpecError("line %d: device type must be c or b" % lineno)
            kind_bits = stat.S_IFCHR if words[5] == "c" else stat.S_IFBLK
            rdev = (int(words[6]), int(words[7]))
            return dict(name=name, mode=kind_bits | mode, uid=uid, gid=gid, rdev=rdev)
        if kind == "slink" and len(words) == 6:
            name, target = words[1], words[2]
            mode, uid, gid = int(words[3], 8), int(words[4]), int(words[5])
            return dict(name=name, mode=stat.S_IFLNK | mode, uid=uid, gid=gid,
                        data=target.encode())
    except ValueError as e:
        raise SpecError("line %d: %s" % (lineno, e)) from e
    except OSError as e:
        raise SpecError("line %d: %s" % (lineno, e)) from e
    raise SpecError("line %d: cannot parse %r" % (lineno, " ".join(words)))


def build(spec_lines):
    """Returns the archive bytes for the given SPEC lines."""
    out = bytearray()
    seen = set()
    ino = 721
    for lineno, line in enumerate(spec_lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        e = _parse_line(words, lineno)
        name = e.pop("name").lstrip("/")
        if not name or name in seen:
            raise SpecError("line %d: empty or duplicate name" % lineno)
        seen.add(name)
        out += _entry(ino, name, **e)
        ino += 1
    out += _entry(0, TRAILER, 0, 0, 0, nlink=1)
    return bytes(out)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    spec_path, output = argv[1], argv[2]
    try:
        if spec_path == "-":
            data = build(sys.stdin.read().splitlines())
        else:
            with open(spec_path) as f:
                data = build(f.read().splitlines())
    except (SpecError, OSError) as e:
        sys.stderr.write("mkcpio: %s\n" % e)
        return 1
    out_dir = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".mkcpio-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
