//! `vireo`: the command line of the Vireo virtual machine monitor.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::api::client::{ApiClient, ClientError};
use vmm::api::{
    ApiAction, ApiReply, BalloonRequest, MigrateReceiveRequest, MigrateRequest, RestoreRequest,
    SnapshotRequest, VmState,
};
use vmm::config::{Accel, BootProtocol, ConsoleKind, MemSize, SerialMode, VmConfig};
use vmm::exit_code;

mod img;
mod logfmt;
mod progress;
mod top;

const EXIT_CODES: &str = "\
Exit status:
  0  the guest powered off (or you quit with Ctrl-A X, or gdb's kill with --gdb)
  1  Vireo failed: bad input, missing /dev/kvm, a host error (one line on stderr says why)
  2  bad command line
  3  the guest rebooted (keyboard controller or ACPI reset; also after a guest panic with panic=N)
  4  a vCPU triple-faulted
  5  a vCPU hit an instruction its accelerator cannot run (the report names the bytes and RIP)
  6  with --pvpanic: the guest kernel panicked (reported through the pvpanic device)
  (V<<1)|1  with --exit-device: the guest wrote V to the exit device (the last line on stderr
         says so; this can equal 1, 3 or 5, which that line tells apart)
  128+N  killed by signal N (the terminal is restored)

Console: the guest's console (COM1, or hvc0 with --console virtio) is your terminal. Ctrl-A X quits, Ctrl-A Ctrl-A sends Ctrl-A.";

#[derive(Parser)]
#[command(
    name = "vireo",
    version,
    about = "Vireo: a virtual machine monitor for x86-64 Linux hosts",
    long_about = "Vireo runs whole operating systems in virtual machines, on KVM (hardware-assisted) \
or on its own x86-64 CPU engine (software), with paravirtual devices for speed.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace); VIREO_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// A VMM's live-migration key: a file (mode 0600, at least 16 bytes)
    /// holding the same secret on both hosts. A migrate-receive then takes
    /// only a source that proves it holds the key, and a migrating VMM
    /// answers the destination's challenge with it. (For the VMM commands:
    /// run, restore, migrate-receive.)
    #[arg(long, global = true, value_name = "FILE")]
    migration_key_file: Option<PathBuf>,
    /// This VMM's TLS certificate for live migration (PEM, the leaf first,
    /// then any intermediates). With --migration-tls-key, a migrate-receive
    /// speaks only TLS and presents it; a migrating VMM presents it when
    /// the destination asks (mutual TLS). See docs/security.md.
    #[arg(long, global = true, value_name = "FILE")]
    migration_tls_cert: Option<PathBuf>,
    /// The private key of --migration-tls-cert (PEM: PKCS#8, PKCS#1 or
    /// SEC1; mode 0600).
    #[arg(long, global = true, value_name = "FILE")]
    migration_tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) a migrating VMM checks the destination's
    /// certificate against (for the host of --to): it then migrates only
    /// over TLS. A migrate-receive given it takes only a source whose
    /// certificate that CA signed (mutual TLS).
    #[arg(long, global = true, value_name = "FILE")]
    migration_tls_ca: Option<PathBuf>,
    /// A migration being received must arrive whole within this many
    /// seconds of its source being accepted.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 3600)]
    migration_timeout: u64,
    /// The key a VMM signs its snapshots with and checks them against when
    /// restoring (made, 0600, if missing) [default:
    /// ~/.config/vireo/snapshot.key]. A snapshot it does not verify may not
    /// name host files as disks: `vireo restore --disk` names them instead.
    #[arg(long, global = true, value_name = "FILE")]
    snapshot_key_file: Option<PathBuf>,
    /// Log lines as text, or as one JSON object each (with -v, the VMM's
    /// events: boot, pause, resume, snapshot, migration-start/end,
    /// device-reset, exit; see docs/monitoring.md).
    #[arg(long, value_name = "text|json", default_value = "text", global = true)]
    log_format: LogFormat,
    /// seccomp filters on every VMM thread: on (a forbidden system call
    /// ends the VMM with a report naming it and the thread, exit 159), log
    /// (a call outside the filters is allowed and logged by the kernel's
    /// audit log: for finding a missing call) or off (see docs/isolation.md).
    /// (For the VMM commands: run, restore, migrate-receive.)
    #[arg(long, global = true, value_name = "on|log|off", default_value = "on")]
    seccomp: vmm::seccomp::SeccompMode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and attach its serial console to this terminal.
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Check that a running VMM's API answers (prints its version).
    Ping(ApiArgs),
    /// Print a running VM's state, configuration, vCPUs and devices (JSON).
    Info(ApiArgs),
    /// Pause a running VM: every vCPU stops outside the guest.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Press the VM's ACPI power button: the guest shuts itself down.
    PowerButton(ApiArgs),
    /// Stop a VM at once (its VMM exits 0).
    Stop(ApiArgs),
    /// Write a running VM's snapshot to a new directory (pauses it meanwhile).
    Snapshot(SnapshotArgs),
    /// Set the balloon's target: memory the guest is asked to give back
    /// (`vireo info` shows how much it gave and its memory statistics).
    Balloon(BalloonArgs),
    /// Change a running VM's I/O limits: a disk's (`--limit`), a NIC's
    /// per direction (`--rx`, `--tx`), or a rate group's. A limit is
    /// `bw=BYTES_PER_SEC[,ops=N]` (`20M` is 20 MiB/s) or `none`.
    RateLimit(RateLimitArgs),
    /// Change a running VMM's cgroup limits (it was started with
    /// --cgroup): cpu.max, cpu.weight, memory.max, memory.high.
    Cgroup(CgroupLimitArgs),
    /// Start a VM from a snapshot directory in this process.
    #[command(after_help = EXIT_CODES)]
    Restore(RestoreArgs),
    /// Live-migrate a running VM to a `vireo migrate-receive` (the guest
    /// runs while its memory is copied; its VMM exits 0 once handed over).
    /// Prints the total time, the downtime, the bytes and the rounds.
    Migrate(MigrateArgs),
    /// Give up the live migration a `vireo migrate` started (the VM runs on
    /// here; the destination drops what it received).
    MigrateCancel(ApiArgs),
    /// Wait for one live migration on a TCP address and run the VM it brings.
    #[command(after_help = EXIT_CODES)]
    MigrateReceive(MigrateReceiveArgs),
    /// Give an empty VMM (`vireo run --api-socket PATH` alone) a VM
    /// configuration, from the same options as `vireo run`.
    Create(Box<CreateArgs>),
    /// Boot the VM `vireo create` gave an empty VMM.
    Boot(ApiArgs),
    /// Drop the configuration `vireo create` gave (before `vireo boot`).
    Delete(ApiArgs),
    /// Stop the VMM process, with its VM if one runs.
    Shutdown(ApiArgs),
    /// Print a running VM's counters: vCPU exits and time, engine, disks,
    /// NICs, virtio notifications and interrupts, memory (JSON).
    Counters(CountersArgs),
    /// A live view of running VMMs: state, CPU per vCPU, memory, disk,
    /// network and exit rates, refreshed every second (q quits; 1-9 or
    /// Tab pick the sort column).
    Top(top::TopArgs),
    /// Disk images: create, info, check, compare, convert (also from VMDK,
    /// VHDX and block devices: P2V), resize, commit, rebase. See docs/images.md.
    Img(img::ImgArgs),
}

#[derive(Args)]
struct CountersArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print the Prometheus text of GET /metrics instead of JSON.
    #[arg(long)]
    prometheus: bool,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Where `vireo migrate-receive --listen` waits (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// Cap the copy while the guest runs at N MiB/s (the short paused
    /// round is not capped) [default: no cap].
    #[arg(long, value_name = "N")]
    max_bandwidth_mib: Option<u64>,
}

#[derive(Args)]
struct MigrateReceiveArgs {
    /// The TCP address to wait on (ADDR:PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    #[command(flatten)]
    start: StartArgs,
}

/// How a VM that comes from elsewhere (a snapshot, a migration) starts.
#[derive(Args)]
struct StartArgs {
    /// Serial console: stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "stdio|file:PATH|none")]
    serial: Option<SerialMode>,
    /// Serve the management API on this Unix socket once the VM runs.
    #[arg(long, value_name = "PATH", conflicts_with = "into")]
    api_socket: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus text) and GET /api/v1/vm.counters on
    /// this TCP address once the VM runs.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "into")]
    metrics: Option<std::net::SocketAddr>,
    /// Start it inside the empty VMM serving the API at PATH (`vireo run
    /// --api-socket PATH` alone) instead of in this process (answers once
    /// the VM runs there).
    #[arg(long, value_name = "PATH")]
    into: Option<PathBuf>,
    /// The accelerator to run it under [default: the one that made the
    /// snapshot or ran the source]. The other one works when every CPU
    /// feature the guest saw (CPUID leaves 1, 7, 0xd, 0x80000001,
    /// 0x80000007/8 and the KVM leaves, recorded in the VM's state) is
    /// offered here, and the guest's TSC rate can be kept (or
    /// --allow-tsc-change); KVM guests started with --cpu-model portable fit
    /// the engine.
    #[arg(long, value_name = "kvm|emu")]
    accel: Option<Accel>,
    /// Under the other accelerator, accept a guest TSC that runs at
    /// another rate than before (its value stays continuous; a guest that
    /// keeps time by the TSC sees its clock run faster or slower).
    #[arg(long)]
    allow_tsc_change: bool,
}

impl StartArgs {
    fn servers(&self) -> vmm::Servers {
        vmm::Servers {
            api_socket: self.api_socket.clone(),
            metrics: self.metrics,
            gdb: None,
        }
    }

    fn options(&self) -> vmm::RestoreOptions {
        vmm::RestoreOptions {
            accel: self.accel,
            allow_tsc_change: self.allow_tsc_change,
        }
    }

    /// The same settings as an API request (`restore --into`).
    fn restore_request(
        &self,
        source: &Path,
        overlays: &[PathBuf],
        taps: &[String],
        disks: &[PathBuf],
    ) -> RestoreRequest {
        RestoreRequest {
            source: source.to_path_buf(),
            accel: self.accel,
            allow_tsc_change: self.allow_tsc_change,
            overlays: overlays.to_vec(),
            taps: taps.to_vec(),
            disks: disks.to_vec(),
            serial: self.serial.clone(),
        }
    }

    /// The same settings as an API request (`migrate-receive --into`).
    fn receive_request(&self, listen: &str) -> MigrateReceiveRequest {
        MigrateReceiveRequest {
            listen: listen.into(),
            accel: self.accel,
            allow_tsc_change: self.allow_tsc_change,
            serial: self.serial.clone(),
        }
    }
}

#[derive(Args)]
struct SnapshotArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Directory to create for the snapshot.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Leave the VM paused afterwards (default: resume it if it was running).
    #[arg(long)]
    stay_paused: bool,
}

#[derive(Args)]
struct BalloonArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Balloon size in MiB (0 gives everything back; at most the guest's RAM).
    #[arg(long, value_name = "N")]
    target_mib: u64,
}

#[derive(Args)]
struct RateLimitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The device (disk0, net1, as `vireo counters` names them) or rate group.
    #[arg(value_name = "TARGET")]
    target: String,
    /// A disk's (or disk group's) limit: `bw=20M,ops=1000` or `none`.
    #[arg(long, value_name = "LIMIT", value_parser = parse_limit)]
    limit: Option<vmm::config::RateLimiterConfig>,
    /// A NIC's limit on frames to the guest.
    #[arg(long, value_name = "LIMIT", value_parser = parse_limit)]
    rx: Option<vmm::config::RateLimiterConfig>,
    /// A NIC's limit on frames from the guest.
    #[arg(long, value_name = "LIMIT", value_parser = parse_limit)]
    tx: Option<vmm::config::RateLimiterConfig>,
}

fn parse_limit(s: &str) -> Result<vmm::config::RateLimiterConfig, String> {
    vmm::config::parse_limit(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot directory (`vireo snapshot --dir`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    #[command(flatten)]
    start: StartArgs,
    /// Clone: create this qcow2 overlay over the snapshot's disk and run on
    /// it, leaving the snapshot's disk unchanged (once per disk, in order).
    #[arg(long, value_name = "PATH")]
    overlay: Vec<PathBuf>,
    /// Clone: use this tap for the snapshot's next NIC instead of its own.
    #[arg(long, value_name = "NAME")]
    tap: Vec<String>,
    /// The snapshot's next disk file, named by you (once per disk, in
    /// order): needed to restore a snapshot not signed with your snapshot
    /// key (another user's, or edited), which may not name host files on
    /// its own.
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
}

#[derive(Args)]
struct ApiArgs {
    /// The API socket the VMM was started with (`vireo run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmOptions,
    /// Serve the management API (HTTP + JSON, see docs/openapi.json) on this
    /// Unix socket. Given alone (no --kernel or --config), the VMM starts
    /// empty and waits for `vireo create` + `vireo boot`, `vireo restore
    /// --into` or `vireo migrate-receive --into`.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus text, for a Prometheus server to
    /// scrape) and GET /api/v1/vm.counters on this TCP address, e.g.
    /// 127.0.0.1:9100. Only these reads are served there.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Serve the gdb remote protocol on tcp:HOST:PORT or unix:PATH (gdb's
    /// `target remote`); one gdb thread per vCPU. See docs/debugging.md.
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    gdb: Option<vmm::gdb::GdbAddr>,
    /// With --gdb: hold the guest before its first instruction until gdb
    /// attaches.
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
    #[command(flatten)]
    cgroup: CgroupArgs,
    #[command(flatten)]
    jail: JailArgs,
}

/// The jail (see docs/isolation.md, "The jail").
#[derive(Args)]
struct JailArgs {
    /// Run the VMM jailed (needs root): in new mount, PID, IPC and UTS
    /// namespaces with DIR as its root, as --uid/--gid with no
    /// capabilities. Every file named (kernel, initrd, disks, the API
    /// socket...) must be under DIR, by its host path; DIR/dev must be
    /// absent or empty (Vireo fills it with the device nodes the VM needs).
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
    jail: Option<PathBuf>,
    /// With --jail: the user the VMM runs as (not 0).
    #[arg(long, value_name = "N", requires = "jail")]
    uid: Option<u32>,
    /// With --jail: the group the VMM runs as (not 0).
    #[arg(long, value_name = "N", requires = "jail")]
    gid: Option<u32>,
    /// With --jail: join this network namespace (/var/run/netns/NAME, as
    /// `ip netns add` makes) [default: the host's].
    #[arg(long, value_name = "PATH", requires = "jail")]
    netns: Option<PathBuf>,
    /// With --jail: resource limits of the jailed VMM [default:
    /// nofile=2048,nproc=512, no fsize limit].
    #[arg(long, value_name = "nofile=N,nproc=N,fsize=SIZE", requires = "jail")]
    jail_limits: Option<vmm::jail::JailLimits>,
}

impl JailArgs {
    fn options(&self) -> Option<vmm::jail::JailOptions> {
        Some(vmm::jail::JailOptions {
            dir: self.jail.clone()?,
            uid: self.uid?,
            gid: self.gid?,
            netns: self.netns.clone(),
            limits: self.jail_limits.unwrap_or_default(),
        })
    }
}

/// The VMM's cgroup (cgroup v2; see docs/limits.md).
#[derive(Args)]
struct CgroupArgs {
    /// Run the VMM in a cgroup of its own, PARENT/vireo-PID (made now,
    /// removed at exit), with vCPU threads and the other threads in
    /// threaded sub-groups. PARENT is a path in the cgroup v2 hierarchy
    /// (/vms) or under its mount (/sys/fs/cgroup/vms).
    #[arg(long, value_name = "PARENT")]
    cgroup: Option<PathBuf>,
    /// cpu.max of the VMM's cgroup: 150% (one and a half CPUs),
    /// QUOTA/PERIOD in µs (50000/100000) or max.
    #[arg(long, value_name = "LIMIT", requires = "cgroup")]
    cpu_max: Option<vmm::cgroup::CpuMax>,
    /// cpu.weight of the VMM's cgroup (1-10000; the kernel's default 100).
    #[arg(long, value_name = "N", requires = "cgroup")]
    cpu_weight: Option<u32>,
    /// memory.max of the VMM's cgroup (512M, 2G, max); guest RAM counts.
    #[arg(long, value_name = "SIZE", requires = "cgroup")]
    memory_max: Option<vmm::cgroup::MemoryLimit>,
    /// memory.high of the VMM's cgroup: where reclaim and throttling start.
    #[arg(long, value_name = "SIZE", requires = "cgroup")]
    memory_high: Option<vmm::cgroup::MemoryLimit>,
}

impl CgroupArgs {
    fn limits(&self) -> vmm::cgroup::CgroupLimits {
        vmm::cgroup::CgroupLimits {
            cpu_max: self.cpu_max,
            cpu_weight: self.cpu_weight,
            memory_max: self.memory_max,
            memory_high: self.memory_high,
        }
    }
}

/// `vireo cgroup`: new limits for a running VMM's cgroup.
#[derive(Args)]
struct CgroupLimitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// cpu.max: 150%, QUOTA/PERIOD in µs, or max.
    #[arg(long, value_name = "LIMIT")]
    cpu_max: Option<vmm::cgroup::CpuMax>,
    /// cpu.weight (1-10000).
    #[arg(long, value_name = "N")]
    cpu_weight: Option<u32>,
    /// memory.max (512M, 2G, max).
    #[arg(long, value_name = "SIZE")]
    memory_max: Option<vmm::cgroup::MemoryLimit>,
    /// memory.high (512M, 2G, max).
    #[arg(long, value_name = "SIZE")]
    memory_high: Option<vmm::cgroup::MemoryLimit>,
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    vm: VmOptions,
}

/// Everything that describes a VM (for `run` and `create`).
#[derive(Args)]
struct VmOptions {
    /// Read the VM's settings from a TOML or JSON file (same names as the
    /// options: kernel, initrd, cmdline, memory, cpus, accel, cpu_model, serial, console, boot, rng,
    /// disks, nets, balloon, exit_device, pvpanic, cpu_affinity,
    /// cloud_init);
    /// options given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel to boot: an uncompressed ELF vmlinux, a bzImage, or a multiboot
    /// (v1) kernel (the initrd is then its module).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs) to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Boot through a BIOS image: the first disk when no --kernel is given
    /// (then the default), else the --kernel, handed to the firmware
    /// through fw_cfg. `--firmware` alone names the default
    /// [default: /usr/share/seabios/bios-256k.bin, Debian's seabios] (docs/firmware.md).
    #[arg(long, value_name = "PATH", num_args = 0..=1,
          default_missing_value = vmm::config::DEFAULT_FIRMWARE)]
    firmware: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// How guest code runs: kvm (hardware), emu (Vireo's CPU engine), or auto:
    /// KVM on VT-x/AMD-V hosts, the engine without KVM or on nested PVM KVM [default: auto].
    #[arg(long, value_name = "kvm|emu|auto")]
    accel: Option<Accel>,
    /// The CPU a KVM guest is shown: host (everything this KVM offers) or
    /// portable (only what Vireo's CPU engine implements, so the VM's
    /// snapshots and migrations also restore under --accel emu) [default: host].
    #[arg(long, value_name = "host|portable")]
    cpu_model: Option<hypervisor::CpuModel>,
    /// Where the console goes: stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "stdio|file:PATH|none")]
    serial: Option<SerialMode>,
    /// The console device: serial (COM1, the guest's ttyS0) or virtio
    /// (virtio-console, hvc0; COM1 is then disconnected and the default
    /// command line says console=hvc0) [default: serial].
    #[arg(long, value_name = "serial|virtio")]
    console: Option<ConsoleKind>,
    /// Entry protocol for an ELF vmlinux: linux (64-bit boot protocol) or pvh [default: linux].
    #[arg(long, value_name = "linux|pvh")]
    boot: Option<BootProtocol>,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2|vmdk|vhdx][,readonly=on][,serial=ID]
    /// [,bootindex=N]; repeatable (vmdk and vhdx only with readonly=on).
    /// bootindex: the disk's place in a firmware boot's order (lowest first;
    /// disks without one after those with, in the order given).
    #[arg(long, value_name = "path=FILE,...")]
    disk: Vec<vmm::config::DiskConfig>,
    /// A virtio-net NIC on a tap: tap=NAME[,mac=52:54:00:12:34:56] (NAME may
    /// contain %d; the tap is created if missing), or user-mode networking
    /// without privileges through passt: user[,hostfwd=tcp:127.0.0.1:2222-:22]...
    /// (the guest gets its address by DHCP); repeatable.
    #[arg(long, value_name = "tap=NAME|user,...")]
    net: Vec<vmm::config::NetConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// Give the guest a virtio-balloon, optionally [deflate_on_oom=on|off][,stats=on|off]
    /// (both on by default); `vireo balloon` sets its size.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<vmm::config::BalloonConfig>,
    /// A virtio-vsock device: cid=N,socket=PATH. Host programs connect to
    /// PATH and write "CONNECT <port>\n"; guest connections to CID 2 port P
    /// reach the Unix socket PATH_P (the Firecracker convention).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<vmm::config::VsockConfig>,
    /// A host directory in the guest over virtio-fs (vhost-user):
    /// tag=NAME,socket=PATH connects to a virtiofsd you started;
    /// tag=NAME,dir=DIR starts one sharing DIR (stopped with the VM). The
    /// guest mounts it with `mount -t virtiofs NAME /mnt`; repeatable.
    /// Such a VM cannot be snapshotted or migrated.
    #[arg(long, value_name = "tag=NAME,socket=PATH|dir=DIR")]
    fs: Vec<vmm::config::FsConfig>,
    /// The virtiofsd binary for --fs ...,dir=DIR [default: virtiofsd on
    /// PATH, in ~/.cargo/bin or /usr/libexec].
    #[arg(long, value_name = "PATH")]
    virtiofsd: Option<PathBuf>,
    /// An exit device for test kernels (QEMU's isa-debug-exit), optionally
    /// [port=N][,size=1|2|4] (port 0xf4, 4 bytes by default): writing V
    /// there ends the VM with exit status (V << 1) | 1.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    exit_device: Option<vmm::config::ExitDeviceConfig>,
    /// A cloud-init NoCloud seed: user-data=FILE[,meta-data=FILE][,network-config=FILE].
    /// Vireo writes the files to a small read-only disk labelled CIDATA
    /// (VFAT), attached after the --disk disks; the files are checked
    /// before boot. Without meta-data the guest gets an instance-id made
    /// from the user-data and the hostname "vireo".
    #[arg(long, value_name = "user-data=FILE,...")]
    cloud_init: Option<vmm::cloud_init::CloudInitConfig>,
    /// A pvpanic PCI device: a guest kernel panic is logged (a guest-panic
    /// event) and stops the VM with exit status 6, unless the guest has a
    /// crash kernel loaded (kdump then runs).
    #[arg(long)]
    pvpanic: bool,
    /// The VM's name: the SMBIOS product name a firmware-booted guest sees
    /// [default: "Vireo VM"] (docs/firmware.md).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The VM's UUID, 8-4-4-4-12 hex digits: the SMBIOS system UUID of a
    /// firmware boot [default: a random one per start].
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// Pin vCPU threads to host CPUs: VCPU=CPU[,VCPU=CPU...], e.g. 0=2,1=3,
    /// or VCPU=FIRST-LAST for a range (each CPU must be one this process
    /// may run on) [default: no pinning].
    #[arg(long, value_name = "VCPU=CPU,...")]
    cpu_affinity: Option<vmm::config::CpuAffinity>,
}

impl VmOptions {
    /// No option at all: `vireo run --api-socket PATH` alone.
    fn is_empty(&self) -> bool {
        self.config.is_none()
            && self.kernel.is_none()
            && self.initrd.is_none()
            && self.firmware.is_none()
            && self.cmdline.is_none()
            && self.memory.is_none()
            && self.cpus.is_none()
            && self.accel.is_none()
            && self.serial.is_none()
            && self.console.is_none()
            && self.boot.is_none()
            && self.disk.is_empty()
            && self.net.is_empty()
            && !self.rng
            && self.balloon.is_none()
            && self.vsock.is_none()
            && self.fs.is_empty()
            && self.virtiofsd.is_none()
            && self.exit_device.is_none()
            && self.cloud_init.is_none()
            && !self.pvpanic
            && self.name.is_none()
            && self.uuid.is_none()
            && self.cpu_affinity.is_none()
    }

    /// The config file (if any) with every option given on the command line on top.
    fn into_config(self) -> Result<VmConfig, vmm::VmmError> {
        let mut cfg = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => match &self.kernel {
                Some(k) => VmConfig::new(k.clone()),
                // No kernel: boot the disk through firmware.
                None if !self.disk.is_empty() || self.firmware.is_some() => {
                    VmConfig::with_firmware(vmm::config::DEFAULT_FIRMWARE.into())
                }
                None => {
                    return Err(vmm::VmmError::Config(
                        "--kernel PATH is required (or --disk path=FILE to boot a disk through firmware, or --config FILE)".into(),
                    ))
                }
            },
        };
        if let Some(f) = self.firmware {
            cfg.firmware = Some(f);
        }
        if let Some(k) = self.kernel {
            cfg.kernel = k;
        }
        if let Some(i) = self.initrd {
            cfg.initrd = Some(i);
        }
        if let Some(c) = self.cmdline {
            cfg.cmdline = c;
        }
        if let Some(m) = self.memory {
            cfg.memory = m;
        }
        if let Some(n) = self.cpus {
            cfg.cpus = n;
        }
        if let Some(a) = self.accel {
            cfg.accel = a;
        }
        if let Some(m) = self.cpu_model {
            cfg.cpu_model = m;
        }
        if let Some(s) = self.serial {
            cfg.serial = s;
        }
        if let Some(b) = self.boot {
            cfg.boot = b;
        }
        if let Some(c) = self.console {
            cfg.console = c;
        }
        if let Some(b) = self.balloon {
            cfg.balloon = Some(b);
        }
        if let Some(v) = self.vsock {
            cfg.vsock = Some(v);
        }
        if self.rng {
            cfg.rng = true;
        }
        if let Some(x) = self.exit_device {
            cfg.exit_device = Some(x);
        }
        if let Some(p) = self.virtiofsd {
            cfg.virtiofsd = Some(p);
        }
        if let Some(c) = self.cloud_init {
            cfg.cloud_init = Some(c);
        }
        if self.pvpanic {
            cfg.pvpanic = true;
        }
        if let Some(n) = self.name {
            cfg.name = Some(n);
        }
        if let Some(u) = self.uuid {
            cfg.uuid = Some(u);
        }
        if let Some(a) = self.cpu_affinity {
            cfg.cpu_affinity = a;
        }
        cfg.disks.extend(self.disk);
        cfg.nets.extend(self.net);
        cfg.fs.extend(self.fs);
        Ok(cfg)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.event_format(logfmt::JsonLines).try_init(),
    };
}

fn main() -> ExitCode {
    // Before any other thread starts, so that vm.info lists it first.
    threads::register_current(threads::Role::Main);
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    // The environment is read here, in the binary; the library crates take
    // the KVM device node and the translator settings as parameters.
    if let Some(dev) = std::env::var_os("VIREO_KVM_DEVICE") {
        vmm::set_kvm_device(dev.to_string_lossy().into_owned());
    }
    vmm::set_engine_jit(vmm::config::engine_jit(
        std::env::var("VIREO_JIT").ok().as_deref(),
        std::env::var_os("VIREO_JIT_PERFMAP").is_some(),
    ));
    let key = match cli
        .migration_key_file
        .as_deref()
        .map(vmm::auth::Key::from_file)
    {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            eprintln!("vireo: error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let tls = match vmm::tls::MigrationTls::load(
        cli.migration_tls_cert.as_deref(),
        cli.migration_tls_key.as_deref(),
        cli.migration_tls_ca.as_deref(),
    ) {
        Ok(t) => t.map(std::sync::Arc::new),
        Err(e) => {
            let e = vmm::VmmError::from(e);
            eprintln!("vireo: error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    vmm::migration::set_migration_settings(vmm::migration::MigrationSettings {
        key,
        tls,
        receive_deadline: std::time::Duration::from_secs(cli.migration_timeout.max(1)),
    });
    if matches!(
        cli.command,
        Command::Run(_) | Command::Restore(_) | Command::MigrateReceive(_)
    ) {
        vmm::snapshot::set_snapshot_key(snapshot_key(cli.snapshot_key_file.as_deref()));
    }
    // `run` installs the filters itself, after its jail (if any).
    if matches!(
        cli.command,
        Command::Restore(_) | Command::MigrateReceive(_)
    ) {
        if let Err(code) = install_seccomp(cli.seccomp) {
            return ExitCode::from(code as u8);
        }
    }
    let code = match cli.command {
        Command::Run(args) => run(*args, cli.seccomp),
        Command::Ping(a) => api_call(&a.api_socket, ApiAction::VmmPing),
        Command::Info(a) => api_call(&a.api_socket, ApiAction::VmInfo),
        Command::Pause(a) => api_call(&a.api_socket, ApiAction::VmPause),
        Command::Resume(a) => api_call(&a.api_socket, ApiAction::VmResume),
        Command::PowerButton(a) => api_call(&a.api_socket, ApiAction::VmPowerButton),
        Command::Stop(a) => api_call(&a.api_socket, ApiAction::VmStop),
        Command::Snapshot(a) => report(snapshot(&a)),
        Command::Balloon(a) => report(balloon(&a)),
        Command::RateLimit(a) => report(rate_limit(&a)),
        Command::Cgroup(a) => report(cgroup_limits(&a)),
        Command::Migrate(a) => report(migrate(&a)),
        Command::MigrateReceive(a) => match &a.start.into {
            Some(sock) => api_call(
                sock,
                ApiAction::VmMigrateReceive(a.start.receive_request(&a.listen)),
            ),
            None => finish(vmm::migrate_receive(
                &a.listen,
                a.start.options(),
                &a.start.serial.clone().unwrap_or_default(),
                &a.start.servers(),
            )),
        },
        Command::Create(a) => match a.vm.into_config() {
            Ok(cfg) => api_call(&a.api.api_socket, ApiAction::VmCreate(Box::new(cfg))),
            Err(e) => {
                eprintln!("vireo: error: {e}");
                e.exit_code()
            }
        },
        Command::MigrateCancel(a) => api_call(&a.api_socket, ApiAction::VmMigrateCancel),
        Command::Boot(a) => api_call(&a.api_socket, ApiAction::VmBoot),
        Command::Delete(a) => api_call(&a.api_socket, ApiAction::VmDelete),
        Command::Shutdown(a) => api_call(&a.api_socket, ApiAction::VmmShutdown),
        Command::Counters(a) => match a.prometheus {
            true => api_call(&a.api.api_socket, ApiAction::Metrics),
            false => api_call(&a.api.api_socket, ApiAction::VmCounters),
        },
        Command::Top(a) => top::run(&a),
        Command::Img(a) => img::run(a),
        Command::Restore(a) => match &a.start.into {
            Some(sock) => {
                let req = a
                    .start
                    .restore_request(&a.from, &a.overlay, &a.tap, &a.disk);
                api_call(sock, ApiAction::VmRestore(req))
            }
            None => {
                let clone = vmm::CloneOptions {
                    overlays: a.overlay,
                    taps: a.tap,
                    disks: a.disk,
                };
                finish(vmm::restore(
                    &a.from,
                    a.start.options(),
                    &clone,
                    &a.start.serial.clone().unwrap_or_default(),
                    &a.start.servers(),
                ))
            }
        },
    };
    ExitCode::from(code as u8)
}

/// The VMM's snapshot key: the file given, else the user's default one
/// (made on first use). Without one (no home directory, an unusable file)
/// snapshots are written unsigned and restored only over disks the
/// restorer names; said once on stderr.
fn snapshot_key(given: Option<&Path>) -> Option<vmm::auth::Key> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let base = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
            base.join("vireo").join("snapshot.key")
        }
    };
    match vmm::auth::Key::load_or_create(&path) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!("no snapshot key ({e}): snapshots are written unsigned");
            None
        }
    }
}

/// Print one line of a client command's answer. A reader that went away
/// (`vireo info | head -c 10`) is not an error of ours: the request was
/// carried out, so the rest of the answer is dropped and nothing is said
/// (println! would panic on the broken pipe). Any other failure to write
/// is one line on stderr.
fn out(line: std::fmt::Arguments) {
    write_out(&format!("{line}\n"));
}

/// [`out`] for text that brings its own line ends.
fn write_out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "vireo: error: cannot write the answer: {e}"
            );
        }
    }
}

/// The exit code of a client command; a failure is one line on stderr.
fn report(result: Result<(), ClientError>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vireo: error: {e}");
            exit_code::VMM_ERROR
        }
    }
}

/// One API request; prints the JSON answer, if there is one.
fn api_call(sock: &Path, action: ApiAction) -> i32 {
    report(ApiClient::new(sock).call(&action).map(|reply| {
        let text = match &reply {
            ApiReply::Empty => return,
            ApiReply::Ping(p) => serde_json::to_string_pretty(p),
            ApiReply::Info(i) => serde_json::to_string_pretty(i),
            ApiReply::Migrated(m) => serde_json::to_string_pretty(m),
            ApiReply::Counters(c) => serde_json::to_string_pretty(c),
            ApiReply::Metrics(t) => {
                write_out(t);
                return;
            }
        };
        if let Ok(text) = text {
            out(format_args!("{text}"));
        }
    }))
}

/// Pause (if running), snapshot, resume (if it was running and not told otherwise).
fn snapshot(a: &SnapshotArgs) -> Result<(), ClientError> {
    let client = ApiClient::new(&a.api.api_socket);
    let was_running = client.info()?.state == VmState::Running;
    if was_running {
        client.pause()?;
    }
    let written = {
        let _progress = progress::Progress::start(a.api.api_socket.clone());
        client.snapshot(SnapshotRequest {
            destination: a.dir.clone(),
        })
    };
    if written.is_ok() {
        out(format_args!("snapshot written to {}", a.dir.display()));
    }
    if was_running && !a.stay_paused {
        let resumed = client.resume();
        // The snapshot's own error matters more than the resume's.
        return written.and(resumed);
    }
    written
}

/// Migrate through the API and print how it went.
fn migrate(a: &MigrateArgs) -> Result<(), ClientError> {
    let r = {
        let _progress = progress::Progress::start(a.api.api_socket.clone());
        ApiClient::new(&a.api.api_socket).migrate_send(MigrateRequest {
            destination: a.to.clone(),
            max_bandwidth_mib: a.max_bandwidth_mib,
        })?
    };
    out(format_args!(
        "migrated to {}: total {} ms, downtime {:.1} ms, {} bytes, {} iterations; \
         paused: {} pages, {} bytes",
        a.to,
        r.total_ms,
        r.downtime_us as f64 / 1000.0,
        r.bytes,
        r.iterations,
        r.final_pages,
        r.final_bytes
    ));
    Ok(())
}

/// Set the balloon's target size.
fn balloon(a: &BalloonArgs) -> Result<(), ClientError> {
    ApiClient::new(&a.api.api_socket).balloon(BalloonRequest {
        target_mib: a.target_mib,
    })?;
    out(format_args!("balloon target set to {} MiB", a.target_mib));
    Ok(())
}

/// Change the VMM's cgroup limits.
fn cgroup_limits(a: &CgroupLimitArgs) -> Result<(), ClientError> {
    ApiClient::new(&a.api.api_socket).cgroup(vmm::cgroup::CgroupLimits {
        cpu_max: a.cpu_max,
        cpu_weight: a.cpu_weight,
        memory_max: a.memory_max,
        memory_high: a.memory_high,
    })?;
    out(format_args!("cgroup limits set"));
    Ok(())
}

/// Change a device's or a group's I/O limits.
fn rate_limit(a: &RateLimitArgs) -> Result<(), ClientError> {
    ApiClient::new(&a.api.api_socket).rate_limit(vmm::api::RateLimitRequest {
        target: a.target.clone(),
        rate_limiter: a.limit,
        rx_rate_limiter: a.rx,
        tx_rate_limiter: a.tx,
    })?;
    out(format_args!("rate limits of {} set", a.target));
    Ok(())
}

/// Report how a VM ended and turn it into the process exit code.
fn finish(result: Result<vmm::VmExit, vmm::VmmError>) -> i32 {
    match result {
        Ok(exit) => {
            eprintln!("\r\nvireo: {exit}");
            exit.code()
        }
        Err(e) => {
            eprintln!("vireo: error: {e}");
            e.exit_code()
        }
    }
}

/// The seccomp filters, before the VMM starts any thread. The test-only
/// variable makes a thread of that role attempt a forbidden call.
fn install_seccomp(mode: vmm::seccomp::SeccompMode) -> Result<(), i32> {
    let test_forbidden = std::env::var("VIREO_TEST_FORBIDDEN_SYSCALL")
        .ok()
        .and_then(|r| threads::RoleKind::parse(&r));
    let settings = vmm::seccomp::SeccompSettings {
        mode,
        test_forbidden,
    };
    vmm::seccomp::install(settings).map_err(|e| {
        eprintln!("vireo: error: {e}");
        e.exit_code()
    })
}

fn run(args: RunArgs, seccomp: vmm::seccomp::SeccompMode) -> i32 {
    let mut servers = vmm::Servers {
        api_socket: args.api_socket.clone(),
        metrics: args.metrics,
        gdb: args.gdb.clone().map(|addr| vmm::gdb::GdbOptions {
            addr,
            wait: args.gdb_wait,
        }),
    };
    // None: an empty VMM that waits on its API (`--api-socket` alone).
    let mut cfg = if servers.api_socket.is_some() && args.vm.is_empty() {
        None
    } else {
        match args.vm.into_config() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("vireo: error: {e}");
                return e.exit_code();
            }
        }
    };
    if let Some(opts) = args.jail.options() {
        // Checked whole before anything changes; then this process stays
        // outside, waits for the jailed VMM and exits as it did.
        let entered = vmm::jail::prepare(
            &opts,
            cfg.as_mut(),
            &mut servers,
            args.cgroup.cgroup.is_some(),
        )
        .and_then(vmm::jail::enter);
        match entered {
            Ok(vmm::jail::Side::Inside) => {}
            Ok(vmm::jail::Side::Outside(code)) => return code,
            Err(e) => {
                let e = vmm::VmmError::from(e);
                eprintln!("vireo: error: {e}");
                return e.exit_code();
            }
        }
    }
    if let Err(code) = install_seccomp(seccomp) {
        return code;
    }
    // Before the VM is built: its memory is charged to the cgroup from
    // the first page. Left (and removed) when this function returns.
    let _cgroup = match &args.cgroup.cgroup {
        Some(parent) => {
            let opts = vmm::cgroup::CgroupOptions {
                parent: parent.clone(),
                limits: args.cgroup.limits(),
            };
            match vmm::cgroup::enter(&opts) {
                Ok(g) => Some(g),
                Err(e) => {
                    let e = vmm::VmmError::from(e);
                    eprintln!("vireo: error: {e}");
                    return e.exit_code();
                }
            }
        }
        None => None,
    };
    match cfg {
        Some(cfg) => finish(vmm::run(&cfg, &servers)),
        // No configuration only with an API socket (see above).
        None => {
            let sock = servers.api_socket.clone().unwrap_or_default();
            finish(vmm::serve(&sock, servers.metrics))
        }
    }
}
