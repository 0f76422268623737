#!/usr/bin/env python3
"""Write a System.map for a vmlinux whose symbol table was stripped, from
the kernel's own compressed symbol table (kallsyms).

    guest/kallsyms.py VMLINUX > System.map

Debian's linux-image package ships /boot/System.map as a one-line
placeholder (the real one is in the ~280 MB -dbg package); the kernel keeps
every symbol in .rodata for /proc/kallsyms, so the map is recovered from
there. Written for the layout of Linux 5.x-6.1 (scripts/kallsyms.c) with
CONFIG_KALLSYMS_BASE_RELATIVE, each table 8-byte aligned, in this order:

    kallsyms_offsets      s32 per symbol
    kallsyms_relative_base u64
    kallsyms_num_syms     u32
    kallsyms_names        per symbol: length (1 byte, or 2 when the first
                          has bit 7 set) then that many token indexes
    kallsyms_markers      u32 per 256 symbols: offset of its name
    (kallsyms_seqs_of_names, in some kernels: 3 bytes per symbol)
    kallsyms_token_table  256 NUL-terminated strings
    kallsyms_token_index  u16 per token: offset in the token table

A symbol's expanded name starts with its type letter. Addresses:
offset >= 0 is absolute (per-CPU symbols with
CONFIG_KALLSYMS_ABSOLUTE_PERCPU), otherwise relative_base - 1 - offset.
Every table found is cross-checked (token index against token table,
markers against names, names ending where markers start); any mismatch
is an error, never a wrong map.
"""

import struct
import sys


def die(msg):
    sys.stderr.write("kallsyms.py: %s\n" % msg)
    sys.exit(1)


def align8(x):
    return (x + 7) & ~7


def find_token_table(data):
    # Single-character tokens stand for themselves, and digits occur in
    # symbol names uncompressed: tokens 0x30-0x39 are "0".."9".
    digits = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
    pos = data.find(digits)
    while pos >= 0:
        start = pos
        ok = True
        for _ in range(0x30):
            if start < 2 or data[start - 1] != 0:
                ok = False
                break
            start -= 1
            while start > 0 and data[start - 1] != 0:
                start -= 1
        if ok:
            # Walk the 256 strings, then check the index that follows.
            offs = []
            p = start
            for _ in range(256):
                offs.append(p - start)
                end = data.find(b"\0", p)
                if end < 0:
                    ok = False
                    break
                p = end + 1
            if ok:
                idx = align8(p)
                got = struct.unpack_from("<256H", data, idx)
                if list(got) == offs:
                    return start, offs
        pos = data.find(digits, pos + 1)
    die("no kallsyms token table found (not a kallsyms kernel?)")


def decode_names(data, start, n, limit):
    """The n names at start if the markers after them agree, else None."""
    off = start
    names = []
    starts = []
    for i in range(n):
        if i % 256 == 0:
            starts.append(off - start)
        if off >= limit:
            return None
        ln = data[off]
        off += 1
        if ln & 0x80:
            ln = (ln & 0x7F) | (data[off] << 7)
            off += 1
        if ln == 0:
            return None
        names.append(data[off:off + ln])
        off += ln
    markers_at = align8(off)
    if markers_at + 4 * len(starts) > limit:
        return None
    got = struct.unpack_from("<%dI" % len(starts), data, markers_at)
    return names if list(got) == starts else None


def main():
    if len(sys.argv) != 2:
        die("usage: kallsyms.py VMLINUX > System.map")
    data = open(sys.argv[1], "rb").read()
    tt_start, tt_offs = find_token_table(data)
    tokens = []
    for o in tt_offs:
        end = data.index(b"\0", tt_start + o)
        tokens.append(data[tt_start + o:end].decode("latin-1"))

    # kallsyms_relative_base (a kernel text address) and kallsyms_num_syms,
    # then the names, whose offsets every 256 symbols the markers that
    # follow them repeat. (Some kernels put kallsyms_seqs_of_names, three
    # bytes per symbol, between the markers and the token table: the
    # search does not depend on what lies there.)
    q = tt_start & ~7
    lowest = max(8, tt_start - 64 * 1024 * 1024)
    while q >= lowest:
        q -= 8
        relbase, n, pad = struct.unpack_from("<QII", data, q - 8)
        if relbase < 0xFFFFFFFF80000000 or pad != 0 or not 1000 <= n <= 10_000_000:
            continue
        names = decode_names(data, q + 8, n, tt_start)
        if names is not None:
            break
    else:
        die("no kallsyms_num_syms found before the token table")

    relbase = struct.unpack_from("<Q", data, q - 8)[0]
    offsets_start = q - 8 - align8(4 * n)
    offsets = struct.unpack_from("<%di" % n, data, offsets_start)
    out = []
    for name, off in zip(names, offsets):
        s = "".join(tokens[b] for b in name)
        addr = off if off >= 0 else (relbase - 1 - off) & 0xFFFFFFFFFFFFFFFF
        out.append((addr, s[0], s[1:]))
    out.sort(key=lambda e: (e[0], e[2]))
    w = sys.stdout.write
    for addr, t, s in out:
        w("%016x %s %s\n" % (addr, t, s))


if __name__ == "__main__":
    main()
