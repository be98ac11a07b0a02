#!/usr/bin/env python3
"""Deterministic benchmark disk images.

usage: gen_image.py PATH SIZE_MIB [SEED]

Per 1 MiB block, chosen by a seeded RNG: about 35% zeros, 25% random bytes, 35%
text-like data (compressible, never identical at chunk granularity), 5% copies of an
earlier block (duplicated regions, as a copied file or a cloned template would leave).
"""
import os
import random
import sys

MIB = 1 << 20


def main():
    path, size_mib = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    rng = random.Random(seed)
    words = [w.encode() for w in (
        "the of and to in is for on that with by this be are from at as or an it was "
        "kernel module device driver backup restore snapshot block disk volume file "
        "system user root home var log etc usr lib bin config service network address "
        "error warning info debug start stop running failed success connection request").split()]
    corpus = bytearray()
    while len(corpus) < 16 * MIB:
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        corpus += line + b" %d\n" % rng.randint(0, 10**6)
    written = []
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
        for i in range(size_mib):
            r = rng.random()
            if r < 0.35:
                written.append(None)
                continue
            if r < 0.60:
                block = rng.randbytes(MIB)
            elif r < 0.95 or not [b for b in written if b is not None]:
                off = rng.randrange(0, len(corpus) - MIB)
                block = bytes(corpus[off:off + MIB])
            else:
                block = rng.choice([b for b in written[-64:] if b is not None] or [bytes(MIB)])
            f.seek(i * MIB)
            f.write(block)
            written.append(block if r >= 0.60 else None)
            if len(written) > 64:
                written = written[-64:]


if __name__ == "__main__":
    main()
