"""What the per-operation scripts (io-per-request.py, net-per-mib.py) read
from a running VMM: Vireo's counters over its API socket, each host
thread's run and run-queue time, and each thread's system calls.
"""
import json, os, signal, socket, subprocess


def counters(sock):
    """GET /api/v1/vm.counters on Vireo's API socket, flattened (see flat)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"GET /api/v1/vm.counters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    head, body = data.split(b"\r\n\r\n", 1)
    if b"chunked" in head.lower():
        out, rest = b"", body
        while True:
            n, rest = rest.split(b"\r\n", 1)
            n = int(n, 16)
            if n == 0:
                break
            out += rest[:n]
            rest = rest[n + 2:]
        body = out
    return flat(json.loads(body))


def flat(d, pre=""):
    """{"a": {"b": [1]}} -> {"a.b.0": 1}: numbers only."""
    r = {}
    if isinstance(d, dict):
        for k, v in d.items():
            r.update(flat(v, f"{pre}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            r.update(flat(v, f"{pre}{i}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        r[pre[:-1]] = d
    return r


def threads(pids):
    """{tid: (comm, ns run, ns waiting to run)} of every thread of pids."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                st = open(f"/proc/{pid}/task/{tid}/stat").read()
                comm = st[st.index("(") + 1:st.rindex(")")]
                sched = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
                out[tid] = (comm, int(sched[0]), int(sched[1]))
            except OSError:
                pass
    return out


def cpu_by_comm(th0, th1):
    """{comm: [ns run, ns waiting]} between two threads() readings."""
    comms = {}
    for tid, (comm, run1, wait1) in th1.items():
        run0, wait0 = th0.get(tid, (comm, 0, 0))[1:3]
        a = comms.setdefault(comm, [0, 0])
        a[0] += run1 - run0
        a[1] += wait1 - wait0
    return comms


def start_syscall_count(pids, names):
    """perf stat on the sys_enter tracepoints of names, per thread (root)."""
    ev = ",".join(f"syscalls:sys_enter_{s}" for s in names)
    return subprocess.Popen(["perf", "stat", "--per-thread", "-x,", "-e", ev,
                             "-p", ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_syscall_count(perf):
    """{comm: {syscall: count}} from start_syscall_count's perf."""
    sc = {}
    if perf is None:
        return sc
    perf.send_signal(signal.SIGINT)
    err = perf.communicate()[1].decode()
    for line in err.splitlines():
        f = line.split(",")
        if len(f) >= 4 and f[1].strip().isdigit():
            comm = f[0].strip().rsplit("-", 1)[0]
            ev = f[3].split("sys_enter_")[-1]
            sc.setdefault(comm, {})[ev] = sc.get(comm, {}).get(ev, 0) + int(f[1])
    return sc
