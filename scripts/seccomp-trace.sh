#!/bin/bash
# Regenerate the evidence for the seccomp allow-lists (docs/isolation.md):
# run Vireo under `strace -f` with every device kind and API operation, on
# each accelerator, with --seccomp off, and print the system calls each
# thread role made. Compare with crates/vmm/src/seccomp/lists.rs.
#   scripts/seccomp-trace.sh [VIREO] [GUEST_DIR] > roles.txt
# Needs root (a tap NIC), strace, passt, and the guest images.
set -u
VIREO=${1:-target/release/vireo}
G=${2:-${VIREO_GUEST_DIR:-guest/out}}
T=$(mktemp -d /tmp/vireo-trace.XXXXXX)
trap 'rm -rf "$T"' EXIT
ACCELS="emu"
[ -w /dev/kvm ] && ACCELS="kvm emu"
CMD='exec </dev/console >/dev/console 2>&1; dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null; dd if=/dev/zero of=/dev/vdb bs=64k count=64 2>/dev/null; sync; head -c 4096 /dev/hwrng | md5sum; timeout 20 udhcpc -i eth1 -n -q -t 5 >/dev/null 2>&1; ip link set eth0 up; echo hi | timeout 5 vireo-io vsock-connect 2 5000; sleep 6; echo TRACE-DONE'
for accel in $ACCELS; do
    rm -f "$T"/*.sock* "$T"/*.img
    truncate -s 8M "$T/raw.img"
    "$VIREO" img create -f qcow2 "$T/q.qcow2" 8M >/dev/null 2>&1 || qemu-img create -q -f qcow2 "$T/q.qcow2" 8M
    python3 -c "import socket,os; s=socket.socket(socket.AF_UNIX); s.bind('$T/v.sock_5000'); s.listen(); c,_=s.accept(); c.recv(10)" &
    strace -f -qq -o "$T/run-$accel.trace" "$VIREO" --seccomp off run --accel "$accel" --memory 256M --cpus 2 \
        --kernel "$G/vmlinux" --initrd "$G/initramfs.cpio.gz" --rng --balloon --console virtio \
        --disk "path=$T/raw.img" --disk "path=$T/q.qcow2,format=qcow2" \
        --net user --vsock "cid=3,socket=$T/v.sock" \
        --metrics 127.0.0.1:0 --api-socket "$T/api.sock" --serial "file:$T/serial-$accel.txt" \
        --cmdline "console=hvc0 reboot=k panic=1 quiet vireo.cmd=\"$CMD\"" &
    vmm=$!
    for _ in $(seq 600); do grep -q TRACE-DONE "$T/serial-$accel.txt" 2>/dev/null && break; sleep 0.2; done
    for op in info counters "counters --prometheus" pause resume "balloon --target-mib 16"; do
        "$VIREO" $op --api-socket "$T/api.sock" >/dev/null
    done
    "$VIREO" snapshot --dir "$T/snap-$accel" --api-socket "$T/api.sock" >/dev/null
    # A migration to a traced receiver, which then stops.
    port=$((20000 + RANDOM % 20000))
    strace -f -qq -o "$T/recv-$accel.trace" "$VIREO" --seccomp off migrate-receive --listen "127.0.0.1:$port" \
        --serial none --api-socket "$T/recv.sock" &
    recv=$!
    sleep 1
    "$VIREO" migrate --to "127.0.0.1:$port" --api-socket "$T/api.sock" >/dev/null
    sleep 1
    "$VIREO" stop --api-socket "$T/recv.sock" >/dev/null
    wait $vmm $recv
    # A restore of the snapshot, stopped through its API.
    strace -f -qq -o "$T/restore-$accel.trace" "$VIREO" --seccomp off restore --from "$T/snap-$accel" \
        --serial none --api-socket "$T/rest.sock" &
    rest=$!
    sleep 3
    "$VIREO" stop --api-socket "$T/rest.sock" >/dev/null
    wait $rest
done
python3 - "$T"/*.trace <<'PY'
import re, sys, collections
role_of = lambda n: ("vcpu" if re.fullmatch(r"vcpu\d+", n) else "worker" if n.startswith("virtio-")
    else "helper" if n.startswith(("passt-", "vsock-")) else "api" if n in ("api", "metrics")
    else n if n in ("api-request", "console", "spawner") else "main")
roles = collections.defaultdict(set)
for path in sys.argv[1:]:
    calls = collections.defaultdict(set); names = {}; leader = None
    for line in open(path):
        m = re.match(r"(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if not m: continue
        tid, call = int(m.group(1)), m.group(2)
        leader = leader or tid
        calls[tid].add(call)
        n = re.search(r'prctl\(PR_SET_NAME, "([^"]*)"', line)
        if n: names[tid] = n.group(1)
    for tid, cs in calls.items():
        if tid != leader and "execve" in cs: continue  # a child process (passt)
        roles[role_of(names.get(tid, "main")) if tid != leader else "main"] |= cs
for r in sorted(roles):
    print(f"{r}: {' '.join(sorted(roles[r]))}")
PY
