#!/usr/bin/env python3
"""Per-MiB figures of guest TCP under Vireo's engine or QEMU TCG, through
passt or (--tap) a tap.

Boots the bench guest (guest/build.sh output, $VIREO_GUEST_DIR) on user
networking, Vireo's `--net user` or QEMU's `-netdev stream` on a passt
started here the way `vireo-bench net --backend user` starts it, and runs
`vireo-io tcp-send` then `tcp-recv` against listeners on the host's
loopback (passt maps the guest's gateway to it). With --tap (root) the NIC
is on a tap in a network namespace made here, as `vireo-bench net` does,
and the script runs inside it. For each direction,
between the test's BEGIN and result lines, it reads:

- the guest's own view, printed by the guest before and after each test
  (so the same for both VMMs): its MTU, frames and bytes each way
  (/sys/class/net/eth0/statistics) and its virtio interrupts
  (/proc/interrupts);
- each host thread's run and run-queue time (/proc/PID/task/TID/schedstat)
  of the VMM and of passt;
- unless --noperf, each thread's system calls (perf stat on the syscall
  tracepoints; needs root);
- Vireo's counters (GET /api/v1/vm.counters: guest instructions, exits,
  notifications, interrupts).

and prints them per MiB moved. Per-MiB figures move far less with the
host's load than throughput does (docs/engine-profile.md).

usage: net-per-mib.py VIREO_BINARY [SECS] [--qemu] [--tap] [--noperf] [--mtu=N] [--net=OPTS]
  --qemu: the same guest under qemu-system-x86_64 -accel tcg
  --tap: a tap NIC (vhost off for QEMU) instead of passt
  --mtu=N: the MTU QEMU's passt is started with (default 1500, as the bench)
  --net=OPTS: appended to Vireo's `--net user,` or `--net tap=...,` (e.g. --net=mtu=1500)
  NICE=N: run the VMM under `nice -n N`
"""
import os, re, socket, subprocess, sys, time, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmmprobe  # noqa: E402

GUEST = os.environ.get("VIREO_GUEST_DIR", "guest/out")
SYSCALLS = ["read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
            "poll", "ppoll", "epoll_wait", "epoll_pwait", "futex", "ioctl", "clock_nanosleep",
            "timerfd_settime", "splice", "sched_yield", "nanosleep"]
UP, DOWN = 5555, 5556
MAC = "52:54:00:12:34:56"

pos = [a for a in sys.argv[1:] if not a.startswith("--")]
if not pos:
    sys.exit(__doc__)
vireo = pos[0]
secs = int(pos[1]) if len(pos) > 1 else 5
qemu = "--qemu" in sys.argv
perf_on = "--noperf" not in sys.argv
opt = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--") and "=" in a}
mtu = opt.get("--mtu", "1500")
net_extra = opt.get("--net", "")
tap = "--tap" in sys.argv
HOST_IP, GUEST_IP = "10.213.9.1", "10.213.9.2"
TAP = f"vnm{os.getpid() % 100000}"

if tap and not os.environ.get("VNM_NETNS"):
    # Everything (VMM, listeners) runs inside a namespace of its own.
    ns = f"vnm{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        env = dict(os.environ, VNM_NETNS=ns)
        rc = subprocess.run(["ip", "netns", "exec", ns, sys.executable] + sys.argv, env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    sys.exit(rc)

S = ("echo NETSTAT $(cat /sys/class/net/eth0/mtu /sys/class/net/eth0/statistics/rx_packets "
     "/sys/class/net/eth0/statistics/rx_bytes /sys/class/net/eth0/statistics/tx_packets "
     "/sys/class/net/eth0/statistics/tx_bytes) $(grep virtio /proc/interrupts | tr -s ' ' | cut -d' ' -f3)")
if tap:
    up_net = f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && gw={HOST_IP}"
else:
    up_net = ("timeout 60 udhcpc -i eth0 -n -q -t 10 >/dev/null && "
              "gw=$(ip route | grep default | cut -d' ' -f3)")
cmd = (f"{up_net} && echo NETFEAT $(cut -c1-24 /sys/class/net/eth0/device/features) && {S} && "
       f"vireo-io tcp-send $gw {UP} {secs}; {S}; vireo-io tcp-recv $gw {DOWN}; {S}")
append = f'console=ttyS0 quiet reboot=k panic=-1 vireo.cmd="{cmd}"'
sock = f"/tmp/netm-{os.getpid()}.sock"
nice = ["nice", "-n", os.environ.get("NICE", "0")]

passt = None
pass_fds = ()
if qemu and tap:
    argv = nice + ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "512", "-nographic",
                   "-no-reboot", "-nic", "none", "-name", "debug-threads=on",
                   "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.cpio.gz",
                   "-append", append,
                   "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
elif qemu:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # passt gets one end as its fd 3, QEMU the other as its fd 3.
    passt = subprocess.Popen(["passt", "--foreground", "--quiet", "--mtu", mtu, "--fd", "3"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, pass_fds=(3,),
                             preexec_fn=lambda: os.dup2(b.fileno(), 3))
    b.close()
    argv = nice + ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "512", "-nographic",
                   "-no-reboot", "-nic", "none", "-name", "debug-threads=on",
                   "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.cpio.gz",
                   "-append", append, "-netdev", "stream,id=n0,server=off,addr.type=fd,addr.str=3",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, pass_fds=(3,),
                         preexec_fn=lambda: os.dup2(a.fileno(), 3))
    a.close()
else:
    netopt = (f"tap={TAP}," if tap else "user,") + "mac=" + MAC + ("," + net_extra if net_extra else "")
    argv = nice + [vireo, "run", "--accel", "emu", "--memory", "512M",
                   "--kernel", f"{GUEST}/vmlinuz", "--initrd", f"{GUEST}/initramfs.cpio.gz",
                   "--cmdline", append, "--net", netopt, "--api-socket", sock]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)


def listen(port):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0" if tap else "127.0.0.1", port))
    l.listen(1)
    return l


def take_upload(l):
    c, _ = l.accept()
    while c.recv(1 << 17):
        pass
    c.close()


def give_download(l):
    c, _ = l.accept()
    buf = b"\x5a" * (128 << 10)
    end = time.monotonic() + secs
    while time.monotonic() < end:
        c.sendall(buf)
    c.close()


for port, f in ((UP, take_upload), (DOWN, give_download)):
    threading.Thread(target=f, args=(listen(port),), daemon=True).start()


def tap_up():
    """Give the tap the host's address once the VMM has made it."""
    for _ in range(1200):
        if subprocess.run(["ip", "link", "show", TAP], capture_output=True).returncode == 0:
            subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
            return
        time.sleep(0.05)
    print(f"the VMM made no tap {TAP}")


if tap:
    threading.Thread(target=tap_up, daemon=True).start()


def counters():
    return {} if qemu else vmmprobe.counters(sock)


def passt_pids():
    if passt:
        return [passt.pid]
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                st = open(f"/proc/{pid}/stat").read()
                if "(passt" in st and int(st[st.rindex(")") + 2:].split()[1]) == p.pid:
                    out.append(int(pid))
            except (OSError, ValueError, IndexError):
                pass
    return out


vmm_pid = None
state = {}
stats = []
for raw in p.stdout:
    line = raw.decode(errors="replace").rstrip()
    if vmm_pid is None:
        # `nice` execs the VMM: the same pid.
        vmm_pid = p.pid
    m = re.search(r"NETFEAT (\d+)", line)
    if m:
        bits = m.group(1)
        names = {0: "CSUM", 1: "GUEST_CSUM", 3: "MTU", 7: "GUEST_TSO4", 11: "HOST_TSO4", 15: "MRG_RXBUF"}
        print("negotiated: " + " ".join(n for b, n in sorted(names.items()) if b < len(bits) and bits[b] == "1"))
        continue
    m = re.search(r"NETSTAT (.*)", line)
    if m:
        f = [int(x) for x in m.group(1).split()]
        stats.append({"mtu": f[0], "rx_packets": f[1], "rx_bytes": f[2], "tx_packets": f[3],
                      "tx_bytes": f[4], "irqs": sum(f[5:])})
        if len(stats) == 1:
            print(f"guest MTU {f[0]}; virtio interrupt lines: {len(f) - 5}")
        continue
    m = re.search(r"VIREO-IO-BEGIN (\S+)", line)
    if m:
        name = m.group(1)
        pids = [vmm_pid] + passt_pids()
        perf = vmmprobe.start_syscall_count(pids, SYSCALLS) if perf_on else None
        state[name] = (time.monotonic(), counters(), vmmprobe.threads(pids), perf, pids)
        continue
    m = re.search(r"VIREO-IO (\S+) ops=(\d+) bytes=(\d+) ns=(\d+)", line)
    if m and m.group(1) in state:
        name = m.group(1)
        t1 = time.monotonic()
        t0, c0, th0, perf, pids = state[name]
        c1 = counters()
        th1 = vmmprobe.threads(pids)
        sc = vmmprobe.stop_syscall_count(perf)
        state[name] = (t0, t1, c0, c1, th0, th1, sc, int(m.group(3)), int(m.group(4)))
        continue
    if "VIREO-IO-ERROR" in line or "panic" in line.lower():
        print(line)
p.wait()
if passt:
    passt.kill()

# stats: [before send, after send, after recv]
for k, name in enumerate(["tcp-send", "tcp-recv"]):
    if not isinstance(state.get(name), tuple) or len(state[name]) != 9 or len(stats) < k + 2:
        print(f"== {name}: no figures")
        continue
    t0, t1, c0, c1, th0, th1, sc, gbytes, gns = state[name]
    g0, g1 = stats[k], stats[k + 1]
    d = {key: g1[key] - g0[key] for key in g0 if key != "mtu"}
    moved = d["tx_bytes"] if name == "tcp-send" else d["rx_bytes"]
    mib = moved / (1 << 20)
    print(f"== {name}: {gbytes / (1 << 20) / (gns / 1e9):.1f} MiB/s (guest clock), "
          f"{mib:.1f} MiB on the wire, MTU {g1['mtu']}, window {t1 - t0:.2f} s")
    for key in ["rx_packets", "tx_packets", "irqs"]:
        print(f"   guest {key:34} {d[key]:>12}  per MiB {d[key] / mib:10.1f}")
    for key, pk in [("rx_bytes", "rx_packets"), ("tx_bytes", "tx_packets")]:
        if d[pk]:
            print(f"   guest mean {key[:2]} frame {d[key] / d[pk]:10.0f} bytes")
    dc = {key: c1[key] - c0.get(key, 0) for key in c1}
    for key in sorted(dc):
        if dc[key] and ("exits" in key or ".notifications" in key or ".interrupts" in key
                        or key.endswith("instructions") or key.startswith("nets.")):
            print(f"   vmm {key:40} {dc[key]:>14}  per MiB {dc[key] / mib:12.1f}")
    comms = vmmprobe.cpu_by_comm(th0, th1)
    total = 0
    for comm, (run, wait) in sorted(comms.items(), key=lambda x: -x[1][0]):
        total += run
        if run > 1e6:
            print(f"   cpu {comm:20} {run / 1e6:9.1f} ms run ({run / 1e6 / mib:6.2f} ms/MiB, "
                  f"{100 * run / 1e9 / (t1 - t0):5.1f}% of the window), {wait / 1e6:8.1f} ms runq")
    print(f"   cpu all threads          {total / 1e6 / mib:6.2f} ms/MiB")
    for comm, evs in sorted(sc.items()):
        tot = sum(evs.values())
        if tot:
            s = ", ".join(f"{k2} {v / mib:.1f}" for k2, v in sorted(evs.items(), key=lambda x: -x[1]) if v)
            print(f"   sys {comm:20} {tot / mib:8.1f}/MiB: {s}")
    sys.stdout.flush()
