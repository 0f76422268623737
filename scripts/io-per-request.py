#!/usr/bin/env python3
"""Per-request figures of virtio-blk under the engine, or under QEMU TCG.

Boots the bench guest (guest/build.sh output, $VIREO_GUEST_DIR) with a raw
disk and runs `vireo-io blk` tests in it. Between each test's BEGIN and result
lines it reads the VMM's counters (GET /api/v1/vm.counters: guest
instructions, interrupts, notifications, exits), each host thread's run and
run-queue time (/proc/PID/task/TID/schedstat) and, unless --noperf, each
thread's system calls (perf stat on the syscall tracepoints; needs root), and
prints them per request. Figures per request move far less with the host's
load than throughput does (docs/engine-profile.md).

usage: io-per-request.py VIREO_BINARY DISK.raw [SECS] [TEST:BS:QD,...] [--qemu] [--noperf]
  e.g. io-per-request.py target/release/vireo /tmp/disk.raw 4 randread:4k:16
  (the disk is read and, by the write tests, overwritten; 256 MiB is enough)
  --qemu: the same guest under qemu-system-x86_64 -accel tcg (no counters)
  NICE=N: run the VMM under `nice -n N`
"""
import os, re, subprocess, sys, time, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmmprobe  # noqa: E402

GUEST = os.environ.get("VIREO_GUEST_DIR", "guest/out")
SYSCALLS = ["preadv", "pwritev", "preadv2", "pwritev2", "pread64", "pwrite64", "read", "write",
            "poll", "ppoll", "futex", "ioctl", "io_uring_enter", "clock_nanosleep", "sched_yield",
            "epoll_wait", "rt_sigtimedwait", "fdatasync", "sendmsg", "recvmsg", "nanosleep"]

pos = [a for a in sys.argv[1:] if not a.startswith("--")]
if len(pos) < 2:
    sys.exit(__doc__)
vireo, DISK = pos[0], pos[1]
secs = int(pos[2]) if len(pos) > 2 else 4
tests = (pos[3] if len(pos) > 3 else "read:1M:4,write:1M:4,randread:4k:16,randwrite:4k:16").split(",")
qemu = "--qemu" in sys.argv
perf_on = "--noperf" not in sys.argv
cmd = "; ".join(f"vireo-io blk /dev/vda {t.split(':')[0]} {t.split(':')[1]} {t.split(':')[2]} {secs}" for t in tests)
append = f'console=ttyS0 quiet reboot=k panic=-1 vireo.cmd="{cmd}"'
sock = f"/tmp/blkm-{os.getpid()}.sock"
if qemu:
    argv = ["nice", "-n", os.environ.get("NICE", "0"), "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "512", "-nographic", "-no-reboot",
            "-nic", "none", "-name", "debug-threads=on", "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.cpio.gz",
            "-append", append, "-drive", f"file={DISK},if=none,format=raw,id=d0",
            "-device", "virtio-blk-pci,drive=d0"]
else:
    argv = ["nice", "-n", os.environ.get("NICE", "0"), vireo, "run", "--accel", "emu", "--memory", "512M", "--kernel", f"{GUEST}/vmlinuz",
            "--initrd", f"{GUEST}/initramfs.cpio.gz", "--cmdline", append,
            "--disk", f"path={DISK},format=raw", "--api-socket", sock]
p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
TCK = os.sysconf("SC_CLK_TCK")


state = {}
results = []
for raw in p.stdout:
    line = raw.decode(errors="replace").rstrip()
    m = re.search(r"VIREO-IO-BEGIN (\S+)", line)
    if m:
        name = m.group(1)
        time.sleep(0.3)  # past the test's start-up
        perf = vmmprobe.start_syscall_count([p.pid], SYSCALLS) if perf_on else None
        state[name] = (time.monotonic(), {} if qemu else vmmprobe.counters(sock), vmmprobe.threads([p.pid]), perf)
        continue
    m = re.search(r"VIREO-IO (\S+) ops=(\d+) bytes=(\d+) ns=(\d+)", line)
    if m and m.group(1) in state:
        name = m.group(1)
        t1 = time.monotonic()
        c1 = {} if qemu else vmmprobe.counters(sock)
        th1 = vmmprobe.threads([p.pid])
        t0, c0, th0, perf = state[name]
        sc = vmmprobe.stop_syscall_count(perf)
        # Requests in the window: the disk's counters, else (QEMU) the guest's rate.
        d = {k: c1[k] - c0.get(k, 0) for k in c1 if isinstance(c1[k], (int, float))}
        reqs = d.get("disks.0.read.requests", 0) + d.get("disks.0.write.requests", 0)
        if not reqs:
            reqs = int(m.group(2)) * (t1 - t0) / (int(m.group(4)) / 1e9)
        print(f"== {name}: guest ops={m.group(2)} in {int(m.group(4))/1e9:.2f}s; window {t1-t0:.2f}s, requests {reqs:.0f}")
        for k in sorted(d):
            if d[k] and ("exits" in k or k.startswith("virtio.0.") or k.endswith(".instructions")
                         or k.endswith("engine.interrupts")):
                print(f"   {k:40} {d[k]:>14}  per req {d[k]/reqs:10.2f}")
        comms = vmmprobe.cpu_by_comm(th0, th1)
        for comm, (run, wait) in sorted(comms.items(), key=lambda x: -x[1][0]):
            if run > 1e6:
                print(f"   cpu {comm:20} {run/1e6:9.1f} ms run ({run/1e3/reqs:7.2f} us/req), {wait/1e6:8.1f} ms runq")
        for comm, evs in sorted(sc.items()):
            tot = sum(evs.values())
            if tot:
                s = ", ".join(f"{k} {v/reqs:.2f}" for k, v in sorted(evs.items(), key=lambda x: -x[1]) if v)
                print(f"   sys {comm:20} {tot/reqs:6.2f}/req: {s}")
        sys.stdout.flush()
    if "VIREO-IO-ERROR" in line or "panic" in line.lower():
        print(line)
p.wait()
