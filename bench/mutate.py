#!/usr/bin/env python3
"""Overwrite a fraction of a disk image with scattered random writes (a guest's day).

usage: mutate.py PATH FRACTION [WRITE_KIB=64] [ALIGN_KIB=64] [SEED=7]

Prints the number of bytes written. Writes never overlap each other.
"""
import os
import random
import sys


def main():
    path, fraction = sys.argv[1], float(sys.argv[2])
    write = int(sys.argv[3]) * 1024 if len(sys.argv) > 3 else 65536
    align = int(sys.argv[4]) * 1024 if len(sys.argv) > 4 else 65536
    rng = random.Random(int(sys.argv[5]) if len(sys.argv) > 5 else 7)
    size = os.path.getsize(path)
    count = int(size * fraction / write)
    slots = (size - write) // align
    taken = set()
    with open(path, "r+b") as f:
        done = 0
        while done < count:
            off = rng.randrange(0, slots) * align
            span = range(off // 4096, (off + write) // 4096)
            if any(s in taken for s in span):
                continue
            taken.update(span)
            f.seek(off)
            f.write(rng.randbytes(write))
            done += 1
    print(count * write)


if __name__ == "__main__":
    main()
