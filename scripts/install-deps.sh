#!/usr/bin/env bash
# Install, with apt, everything Vireo needs on a fresh Debian 12 (bookworm)
# x86-64 machine: the tools guest/build.sh uses to make the guest images and
# QEMU, the benchmark peer, and virtiofsd (with cargo). Idempotent: packages already installed are skipped
# without touching apt at all, so a warm CI run costs nothing here.
set -euo pipefail

# Tool packages. busybox-static and the kernel are deliberately absent: they are
# guest payload, which guest/build.sh fetches with `apt-get download` and
# unpacks without installing them on the host.
PACKAGES=(
    acpica-tools    # iasl/acpiexec check the ACPI tables Vireo builds (crates/arch/tests/acpica.rs)
    binutils        # as/ld assemble the multiboot test kernel (vireo/tests/multiboot.rs)
    ca-certificates # apt over https mirrors
    coreutils       # sha256sum, md5sum, head, od
    cpio            # packs the initramfs (newc format)
    debootstrap     # guest/build-disk.sh installs Debian 12 into the disk image
    dpkg            # dpkg -x unpacks the downloaded .debs
    e2fsprogs       # mkfs.ext4 for disk images built by tests
    fdisk           # sfdisk partitions the disk image (guest/build-disk.sh)
    file            # identifies the extracted vmlinux as an ELF64
    gcc             # builds guest/vireo-io.c (static) into the initramfs
    gdb             # drives the gdb stub in its test (vireo/tests/gdb.rs)
    gzip            # compresses the initramfs
    iproute2        # ip netns/link/addr for the network tests (crates/net)
    python3-prometheus-client # parses /metrics in the monitoring test (vireo/tests/monitor.rs)
    python3         # guest/kallsyms.py recovers the kernel's System.map
    iputils-ping    # ping from a test network namespace (crates/net)
    libc6-dev       # static libc for guest/vireo-io.c
    kmod            # depmod writes the modules.dep that busybox modprobe reads
    passt           # user-mode networking (--net user): Vireo starts it per NIC (crates/net/src/passt.rs)
    mount           # losetup and mount for the disk image (guest/build-disk.sh)
    lz4             # the Debian cloud kernel is LZ4-compressed; vmlinux extraction
    perl-base       # deterministic test data generator (essential; listed for clarity)
    qemu-system-x86 # the reference/benchmark VMM, also used to check the images
    qemu-utils      # qemu-img and qemu-io for disk images (crates/block tests)
    seabios         # the BIOS image firmware boots use (docs/firmware.md, vireo/tests/firmware.rs)
    qemu-system-data # linuxboot_dma.bin, the option ROM that boots --kernel under --firmware (docs/firmware.md)
    grub-pc-bin     # grub-mkimage and the i386-pc modules: vireo/tests/firmware.rs makes a GRUB disk
    strace          # diagnosing the VMM's host calls (startup analysis)
    util-linux      # runuser: the security tests act as an unprivileged user; partx, blkid
    passwd          # useradd makes that user
    libseccomp-dev  # builds virtiofsd (cargo install, below)
    libcap-ng-dev   # builds virtiofsd
    pkg-config      # virtiofsd's build finds those two with it
)

# virtiofsd (vhost-user virtio-fs backend, `vireo run --fs`) from crates.io,
# into /usr/local/bin so that unprivileged users (the virtio-fs tests run
# Vireo as one) find it on PATH. Debian 12 has no package of it.
VIRTIOFSD_VERSION=1.14.0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "install-deps.sh: not root and sudo is not available; cannot install: ${PACKAGES[*]}" >&2
    exit 1
fi

# Prints the packages of PACKAGES that are not fully installed.
list_missing() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        # dpkg-query prints "install ok installed" only for fully installed packages.
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        if [ "$status" != "install ok installed" ]; then
            echo "$pkg"
        fi
    done
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs one apt-get command with its output in a log that is shown only on
# failure, so CI stays readable but an apt error is never swallowed.
apt_quiet() {
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-deps.sh: apt-get $* failed" >&2
        exit 1
    fi
}

# The unprivileged account the security tests act as a hostile local user
# with (vireo/tests/common/mod.rs TEST_USER: planted links, forged
# snapshots); they say SKIPPED without it.
if ! id vireo-test >/dev/null 2>&1; then
    "${SUDO[@]}" useradd --system --no-create-home --shell /usr/sbin/nologin vireo-test ||
        echo "install-deps.sh: could not create user vireo-test; its tests will be skipped" >&2
fi

# Installs virtiofsd unless that version is already there (after the
# packages: its build needs libseccomp-dev and libcap-ng-dev).
install_virtiofsd() {
    if /usr/local/bin/virtiofsd --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
        return 0
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "install-deps.sh: cargo not found; cannot install virtiofsd (virtio-fs tests will say SKIPPED)" >&2
        return 0
    fi
    echo "install-deps.sh: cargo install virtiofsd $VIRTIOFSD_VERSION"
    if ! "${SUDO[@]}" env PATH="$PATH" cargo install --locked --root /usr/local \
        --version "$VIRTIOFSD_VERSION" virtiofsd >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-deps.sh: cargo install virtiofsd failed" >&2
        exit 1
    fi
}

mapfile -t missing < <(list_missing)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps.sh: all ${#PACKAGES[@]} packages already installed"
    install_virtiofsd
    exit 0
fi

apt_quiet update -q
# Two passes: installing one package can remove another that was installed
# from elsewhere (seen: Debian 12's qemu-system-x86 removes a backported
# qemu-utils 10.x), and the second pass puts the archive's version back.
for _ in 1 2; do
    echo "install-deps.sh: installing ${missing[*]}"
    apt_quiet install -y -q --no-install-recommends "${missing[@]}"
    mapfile -t missing < <(list_missing)
    if [ "${#missing[@]}" -eq 0 ]; then
        install_virtiofsd
        echo "install-deps.sh: done"
        exit 0
    fi
done
echo "install-deps.sh: still not installed after two passes: ${missing[*]}" >&2
exit 1
