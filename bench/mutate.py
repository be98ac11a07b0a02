#!/usr/bin/env python3
"""Overwrite a fraction of a disk image with scattered random writes (a guest's day).

usage: mutate.py PATH FRACTION [WRITE_KIB=64] [ALIGN_KIB=64] [SEED=7]
                 [--changes OUT.json] [--qcow2 IMAGE.qcow2]

Prints the number of bytes written. Writes never overlap each other.
--changes writes the writes as a VMware DiskChangeInfo list (for cbt=changes:FILE).
--qcow2 applies the same writes to a qcow2 image through qemu-io, so that its enabled
dirty bitmaps record them (for cbt=bitmap:auto).
"""
import json
import os
import random
import subprocess
import sys
import tempfile


def main():
    args, flags = [], {}
    argv = sys.argv[1:]
    while argv:
        a = argv.pop(0)
        if a.startswith("--"):
            flags[a] = argv.pop(0)
        else:
            args.append(a)
    path, fraction = args[0], float(args[1])
    write = int(args[2]) * 1024 if len(args) > 2 else 65536
    align = int(args[3]) * 1024 if len(args) > 3 else 65536
    rng = random.Random(int(args[4]) if len(args) > 4 else 7)
    size = os.path.getsize(path)
    count = int(size * fraction / write)
    slots = (size - write) // align
    taken = set()
    writes = []
    with open(path, "r+b") as f:
        while len(writes) < count:
            off = rng.randrange(0, slots) * align
            span = range(off // 4096, (off + write) // 4096)
            if any(s in taken for s in span):
                continue
            taken.update(span)
            data = rng.randbytes(write)
            f.seek(off)
            f.write(data)
            writes.append((off, data))
    if "--changes" in flags:
        areas = [{"start": off, "length": len(d)} for off, d in sorted(writes)]
        with open(flags["--changes"], "w") as out:
            json.dump({"startOffset": 0, "length": size, "changedArea": areas}, out)
    if "--qcow2" in flags:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["qemu-io", "-f", "qcow2"]
            for i, (off, data) in enumerate(writes):
                p = os.path.join(tmp, str(i))
                with open(p, "wb") as d:
                    d.write(data)
                cmd += ["-c", f"write -q -s {p} {off} {len(data)}"]
            cmd.append(flags["--qcow2"])
            # qemu-io takes every command on its command line; split long lists.
            head, cmds = cmd[:3], cmd[3:-1]
            for i in range(0, len(cmds), 2000):
                subprocess.run(head + cmds[i:i + 2000] + [cmd[-1]], check=True, stdout=subprocess.DEVNULL)
    print(count * write)


if __name__ == "__main__":
    main()
