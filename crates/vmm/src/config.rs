//! Everything a user can set for one VM, in one serde struct: the CLI and
//! `--config FILE` (TOML or JSON) both produce a [`VmConfig`].

use std::path::PathBuf;
use std::str::FromStr;

pub use block::ImageFormat;
use serde::{Deserialize, Serialize};
pub use virtio::rate_limit::{RateLimiterConfig, TokenBucketConfig};

use crate::VmmError;
use options::{OptionError, Options};

pub mod options;

/// Default kernel command line: serial console, reboot through the keyboard
/// controller, reboot one second after a panic (exit code 3).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// The same for `--console virtio`: the console is hvc0.
pub const DEFAULT_CMDLINE_VIRTIO_CONSOLE: &str = "console=hvc0 reboot=k panic=1";
pub const DEFAULT_MEMORY: u64 = 512 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Emu,
    /// KVM when /dev/kvm is usable, the software engine otherwise.
    #[default]
    Auto,
}

/// The software engine's translator settings as the environment states
/// them: `VIREO_JIT=off|N` (no translation, or compile a block on its N-th
/// run) and `VIREO_JIT_PERFMAP` set (write /tmp/perf-PID.map for `perf`).
/// The `vireo` binary passes the two values here and hands the result to
/// [`crate::set_engine_jit`]; the library itself reads no environment.
pub fn engine_jit(threshold: Option<&str>, perf_map: bool) -> emu::jit::JitConfig {
    let mut cfg = emu::jit::JitConfig::default();
    if let Some(v) = threshold {
        cfg.threshold = emu::jit::JitConfig::parse_threshold(v);
    }
    cfg.perf_map = perf_map;
    cfg
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            "auto" => Ok(Accel::Auto),
            _ => Err(format!(
                "unknown accelerator '{s}' (expected kvm, emu or auto)"
            )),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialMode {
    /// The host terminal: output to stdout, input from stdin (raw mode on a tty).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Disconnected: output discarded, no input.
    None,
}

impl FromStr for SerialMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "none" => Ok(SerialMode::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
                _ => Err(format!(
                    "bad serial mode '{s}' (expected stdio, none or file:PATH)"
                )),
            },
        }
    }
}

impl std::fmt::Display for SerialMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialMode::Stdio => write!(f, "stdio"),
            SerialMode::None => write!(f, "none"),
            SerialMode::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Serialize for SerialMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SerialMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which device is the guest's console, connected to the host side that
/// `serial` names (terminal, file or nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    /// The COM1 UART (the guest's ttyS0).
    #[default]
    Serial,
    /// A virtio-console on PCI (the guest's hvc0); COM1 is then
    /// disconnected (its output discarded).
    Virtio,
}

impl FromStr for ConsoleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "serial" => Ok(ConsoleKind::Serial),
            "virtio" => Ok(ConsoleKind::Virtio),
            _ => Err(format!("unknown console '{s}' (expected serial or virtio)")),
        }
    }
}

/// How to enter an ELF vmlinux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// The 64-bit Linux boot protocol (startup_64 with boot_params).
    #[default]
    Linux,
    /// The PVH entry named by the kernel's ELF note (32-bit, paging off).
    Pvh,
}

impl FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linux" => Ok(BootProtocol::Linux),
            "pvh" => Ok(BootProtocol::Pvh),
            _ => Err(format!(
                "unknown boot protocol '{s}' (expected linux or pvh)"
            )),
        }
    }
}

/// A memory size: bytes, or a number with a K/M/G/T suffix (binary units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl FromStr for MemSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (num, shift) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 10),
            Some('M' | 'm') => (&t[..t.len() - 1], 20),
            Some('G' | 'g') => (&t[..t.len() - 1], 30),
            Some('T' | 't') => (&t[..t.len() - 1], 40),
            _ => (t, 0),
        };
        let n: u64 = num
            .trim()
            .parse()
            .map_err(|_| format!("bad memory size '{s}' (examples: 512M, 2G, 1073741824)"))?;
        n.checked_mul(1u64 << shift)
            .map(MemSize)
            .ok_or_else(|| format!("memory size '{s}' is too large"))
    }
}

impl Serialize for MemSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1 << 20) {
            s.serialize_str(&format!("{}M", self.0 >> 20))
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MemSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Default for MemSize {
    fn default() -> Self {
        MemSize(DEFAULT_MEMORY)
    }
}

/// A bucket that allows `rate` tokens a second, refilled every 100 ms
/// when the rate divides (so the burst at the start is a tenth of a
/// second's worth), every second otherwise. What `bw=` and `iops=` give.
pub fn bucket_for_rate(rate: u64) -> TokenBucketConfig {
    let (size, refill_time) = if rate >= 10 && rate.is_multiple_of(10) {
        (rate / 10, 100)
    } else {
        (rate, 1000)
    };
    TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time,
    }
}

/// The limiter `bw=` (bytes a second, `20M`) and `iops=` (operations a
/// second) give, `None` when neither is there.
fn limiter_option(
    o: &Options<'_>,
    bw_key: &'static str,
    ops_key: &'static str,
) -> Result<Option<RateLimiterConfig>, OptionError> {
    let bw: Option<MemSize> = o.value(bw_key)?;
    let ops: Option<u64> = o.value(ops_key)?;
    for (key, v) in [(bw_key, bw.map(|b| b.0)), (ops_key, ops)] {
        if v == Some(0) {
            return Err(o.bad(
                key,
                "0",
                "a rate must be at least 1 (leave it out for no limit)",
            ));
        }
    }
    if bw.is_none() && ops.is_none() {
        return Ok(None);
    }
    Ok(Some(RateLimiterConfig {
        bandwidth: bw.map(|b| bucket_for_rate(b.0)),
        ops: ops.map(bucket_for_rate),
    }))
}

/// A limit as `vireo rate-limit` takes it: `bw=BYTES_PER_SEC[,ops=N]`
/// (`iops=` and `pps=` also name the operations bucket), or `none` (no
/// limit).
pub fn parse_limit(s: &str) -> Result<RateLimiterConfig, OptionError> {
    if s.trim() == "none" {
        return Ok(RateLimiterConfig::default());
    }
    let o = Options::parse("limit", s, &["bw", "ops", "iops", "pps"])?;
    let ops_key = ["iops", "pps"]
        .into_iter()
        .find(|k| o.get(k).is_some())
        .unwrap_or("ops");
    limiter_option(&o, "bw", ops_key)?.ok_or_else(|| OptionError::Missing {
        option: "limit",
        key: "bw",
        text: s.into(),
    })
}

/// One virtio-blk disk: `path=FILE[,format=raw|qcow2|vmdk|vhdx][,readonly=on][,serial=ID]
/// [,bw=BYTES_PER_SEC][,iops=N][,group=NAME][,bootindex=N]` (VMDK and VHDX
/// images are read-only: with `readonly=on`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The image format; probed from the file when absent.
    #[serde(default)]
    pub format: Option<ImageFormat>,
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's serial (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// The disk's token buckets (bandwidth in bytes, ops in requests);
    /// none: unlimited (the API may set one later).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Disks naming the same group draw from one limiter; the group's
    /// limit is the one its disks give (they must agree).
    #[serde(default)]
    pub rate_group: Option<String>,
    /// The disk's place in a firmware boot's boot order (QEMU's
    /// `bootindex`): the firmware tries disks with an index first, lowest
    /// first, then the others in the order given. Only for a firmware
    /// boot; no two devices share an index.
    #[serde(default)]
    pub bootindex: Option<u32>,
}

impl FromStr for DiskConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        const KEYS: &[&str] = &[
            "path",
            "format",
            "readonly",
            "ro",
            "serial",
            "bw",
            "iops",
            "group",
            "bootindex",
        ];
        let o = Options::parse("disk", s, KEYS)?;
        let path: PathBuf = o.required("path")?;
        if path.as_os_str().is_empty() {
            return Err(OptionError::Missing {
                option: "disk",
                key: "path",
                text: s.into(),
            });
        }
        Ok(DiskConfig {
            path,
            format: o.value("format")?,
            readonly: o.toggle("readonly")?.or(o.toggle("ro")?).unwrap_or(false),
            serial: o.value("serial")?,
            rate_limiter: limiter_option(&o, "bw", "iops")?,
            rate_group: o.value("group")?,
            bootindex: o.value("bootindex")?,
        })
    }
}

/// Why `--net ...,bootindex=N` is refused.
pub const NIC_CANNOT_BOOT: &str = "a NIC cannot boot: Vireo gives the firmware no network boot (PXE) ROM; give bootindex= on a --disk";

/// Where a NIC's frames go on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBackendKind {
    /// A tap interface (needs root or CAP_NET_ADMIN).
    #[default]
    Tap,
    /// User-mode networking through passt, started by Vireo: no privileges.
    User,
}

/// One virtio-net NIC: on a tap, `[tap,]tap=NAME[,mac=52:54:00:12:34:56]`,
/// or user-mode through passt,
/// `user[,hostfwd=tcp:127.0.0.1:2222-:22]...[,mac=...]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap or user (passt); tap when absent, as before user networking.
    #[serde(default)]
    pub backend: NetBackendKind,
    /// The tap to attach to or create; "vireo%d" lets the kernel number it.
    #[serde(default = "default_tap")]
    pub tap: String,
    /// The guest NIC's address; a random local one when absent.
    #[serde(default)]
    pub mac: Option<net::MacAddr>,
    /// Host ports forwarded to the guest (user networking only).
    #[serde(default)]
    pub hostfwd: Vec<net::HostFwd>,
    /// Token buckets for frames the guest receives (bandwidth in bytes,
    /// ops in packets); none: unlimited (the API may set one later).
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// The same for frames the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// NICs naming the same group share a receive and a transmit limiter.
    #[serde(default)]
    pub rate_group: Option<String>,
    /// Offer merged receive buffers (VIRTIO_NET_F_MRG_RXBUF): on or off;
    /// absent: on for user networking, off for a tap (see `virtio::net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrg_rxbuf: Option<bool>,
    /// The link's MTU (user networking only: passt's, which it gives the
    /// guest by DHCP and NDP), 68 to 65520; absent: 65520 with merged
    /// receive buffers, 1500 without (see [`NetConfig::user_mtu`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

fn default_tap() -> String {
    "vireo%d".into()
}

impl NetConfig {
    /// A tap NIC: what `--net tap=NAME` gives.
    pub fn tap(name: &str) -> Self {
        NetConfig {
            backend: NetBackendKind::Tap,
            tap: name.into(),
            mac: None,
            hostfwd: Vec::new(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            rate_group: None,
            mrg_rxbuf: None,
            mtu: None,
        }
    }

    /// The MTU of a user-networking link: the one asked for, else passt's
    /// 65520 where the guest is offered merged receive buffers (it then
    /// takes a 64 KiB frame in page-sized pieces: ~45x fewer frames per
    /// byte than at 1500, each of which costs an engine guest thousands of
    /// instructions; docs/engine-profile.md), else 1500, which any driver
    /// receives.
    pub fn user_mtu(&self) -> u16 {
        match (self.mtu, self.mrg_rxbuf) {
            (Some(m), _) => m,
            (None, Some(false)) => 1500,
            (None, _) => net::passt::DEFAULT_MTU,
        }
    }

    /// Settings that only one backend takes, given to the other, and
    /// values out of range.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|(_, why)| why)
    }

    /// [`NetConfig::validate`], with the option key at fault.
    fn check(&self) -> Result<(), (&'static str, String)> {
        match self.backend {
            NetBackendKind::Tap if !self.hostfwd.is_empty() => Err((
                "hostfwd",
                "hostfwd= needs user networking (--net user,hostfwd=...); a tap NIC is reached on its own address"
                    .into(),
            )),
            NetBackendKind::Tap if self.mtu.is_some() => Err((
                "mtu",
                "mtu= is user networking's (passt's); a tap's MTU is set on the tap and in the guest"
                    .into(),
            )),
            NetBackendKind::User if self.tap != default_tap() => Err((
                "tap",
                "tap= names a tap; user networking (--net user) has none".into(),
            )),
            NetBackendKind::User => match self.mtu {
                Some(m) if !(net::passt::MIN_MTU..=net::passt::DEFAULT_MTU).contains(&m) => Err((
                    "mtu",
                    format!("an MTU of {m}: passt takes 68 to 65520"),
                )),
                Some(m) if m > 1500 && self.mrg_rxbuf == Some(false) => Err((
                    "mtu",
                    format!(
                        "an MTU of {m} with mrg_rxbuf=off: frames above 1500 bytes need merged receive buffers"
                    ),
                )),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

impl FromStr for NetConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        const SPEC: options::Spec = options::Spec {
            known: &[
                "tap",
                "mac",
                "hostfwd",
                "rx_bw",
                "rx_pps",
                "tx_bw",
                "tx_pps",
                "group",
                "mrg_rxbuf",
                "bootindex",
                "mtu",
            ],
            kinds: &["tap", "user"],
            repeatable: &["hostfwd"],
        };
        let o = Options::parse_spec("net", s, SPEC)?;
        if let Some(v) = o.get("bootindex") {
            // Known, so that the answer says why rather than "unknown option".
            return Err(o.bad("bootindex", v, NIC_CANNOT_BOOT));
        }
        let backend = match o.kind() {
            Some("user") => NetBackendKind::User,
            _ => NetBackendKind::Tap,
        };
        let n = NetConfig {
            backend,
            tap: o.value("tap")?.unwrap_or_else(default_tap),
            mac: o.value("mac")?,
            hostfwd: o.all("hostfwd")?,
            rx_rate_limiter: limiter_option(&o, "rx_bw", "rx_pps")?,
            tx_rate_limiter: limiter_option(&o, "tx_bw", "tx_pps")?,
            rate_group: o.value("group")?,
            mrg_rxbuf: o.toggle("mrg_rxbuf")?,
            mtu: o.value("mtu")?,
        };
        n.check().map_err(|(key, reason)| OptionError::BadValue {
            option: "net",
            key,
            value: s.into(),
            reason,
        })?;
        Ok(n)
    }
}

/// The virtio-vsock device: `cid=N,socket=PATH`. Host programs connect
/// to PATH and write `CONNECT <port>\n`; guest connections to the host
/// (CID 2) port P reach the Unix socket `PATH_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 or more (0-2 are reserved), below 2^32-1.
    pub cid: u64,
    /// The Unix socket Vireo listens on for host-initiated connections.
    pub socket: PathBuf,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.cid < 3 || self.cid >= u32::MAX as u64 {
            return Err(format!(
                "cid {} is reserved or too large (3 to {})",
                self.cid,
                u32::MAX - 1
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err("socket= is empty".into());
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse("vsock", s, &["cid", "socket"])?;
        let v = VsockConfig {
            cid: o.required("cid")?,
            socket: o.required("socket")?,
        };
        v.validate().map_err(|reason| OptionError::BadValue {
            option: "vsock",
            key: "cid",
            value: v.cid.to_string(),
            reason,
        })?;
        Ok(v)
    }
}

/// A virtio-fs device: `tag=NAME,socket=PATH` to connect to a virtiofsd
/// the user started, or `tag=NAME,dir=DIR` (also `path=DIR`) for a
/// virtiofsd Vireo starts itself sharing DIR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
    /// A running vhost-user backend's socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// A host directory to share through a virtiofsd Vireo starts.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl FsConfig {
    pub fn validate(&self) -> Result<(), String> {
        virtio::fs::check_tag(&self.tag).map_err(|e| e.to_string())?;
        match (&self.socket, &self.dir) {
            (Some(_), Some(_)) => Err("give socket= or dir=, not both".into()),
            (None, None) => Err("give socket=PATH (a running virtiofsd) or dir=DIR".into()),
            (Some(p), None) | (None, Some(p)) if p.as_os_str().is_empty() => {
                Err("an empty path".into())
            }
            _ => Ok(()),
        }
    }
}

impl FromStr for FsConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse("fs", s, &["tag", "socket", "dir", "path"])?;
        let dir: Option<PathBuf> = o.value("dir")?;
        let path: Option<PathBuf> = o.value("path")?;
        if dir.is_some() && path.is_some() {
            return Err(o.bad("path", s, "dir= and path= are the same option: give one"));
        }
        let f = FsConfig {
            tag: o.required("tag")?,
            socket: o.value("socket")?,
            dir: dir.or(path),
        };
        f.validate()
            .map_err(|reason| o.bad("tag", &f.tag, reason))?;
        Ok(f)
    }
}

fn yes() -> bool {
    true
}

/// The virtio-balloon: `[deflate_on_oom=on|off][,stats=on|off]`, both on
/// unless turned off. The balloon starts empty; its target is set through
/// the API (`vireo balloon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back
    /// from the balloon when it runs out of memory (it then counts
    /// ballooned memory as used rather than removing it from MemTotal).
    #[serde(default = "yes")]
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ: the guest reports memory statistics.
    #[serde(default = "yes")]
    pub stats: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            deflate_on_oom: true,
            stats: true,
        }
    }
}

impl FromStr for BalloonConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse("balloon", s, &["deflate_on_oom", "stats"])?;
        let d = BalloonConfig::default();
        Ok(BalloonConfig {
            deflate_on_oom: o.toggle("deflate_on_oom")?.unwrap_or(d.deflate_on_oom),
            stats: o.toggle("stats")?.unwrap_or(d.stats),
        })
    }
}

/// The exit device (QEMU's isa-debug-exit, for test kernels):
/// `[port=N][,size=1|2|4]`, port 0xf4 and 4 bytes unless given. A write of
/// V there ends the VM with process status `(V << 1) | 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitDeviceConfig {
    #[serde(default = "default_exit_port")]
    pub port: u16,
    #[serde(default = "default_exit_size")]
    pub size: u8,
}

fn default_exit_port() -> u16 {
    0xf4
}

fn default_exit_size() -> u8 {
    4
}

impl Default for ExitDeviceConfig {
    fn default() -> Self {
        ExitDeviceConfig {
            port: default_exit_port(),
            size: default_exit_size(),
        }
    }
}

/// A port number in decimal or 0x-prefixed hexadecimal.
fn parse_port(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("not a port number (0-0xffff): {e}"))
}

impl FromStr for ExitDeviceConfig {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse("exit-device", s, &["port", "size"])?;
        let d = ExitDeviceConfig::default();
        let port = match o.get("port") {
            Some(p) => parse_port(p).map_err(|e| o.bad("port", p, e))?,
            None => d.port,
        };
        let size = match o.value::<u8>("size")? {
            Some(n @ (1 | 2 | 4)) => n,
            Some(n) => return Err(o.bad("size", &n.to_string(), "must be 1, 2 or 4")),
            None => d.size,
        };
        Ok(ExitDeviceConfig { port, size })
    }
}

/// Which host CPUs each vCPU thread may run on: `0=2,1=3` pins vCPU 0 to
/// host CPU 2 and vCPU 1 to host CPU 3; `0=2-5` lets vCPU 0 run on host
/// CPUs 2 to 5. vCPUs not named run wherever the host puts them. The
/// config file takes the same text (`cpu_affinity = "0=2,1=3"`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuAffinity(pub std::collections::BTreeMap<u32, Vec<usize>>);

impl CpuAffinity {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The host CPUs vCPU `index` is pinned to, if any.
    pub fn of(&self, index: u32) -> Option<&[usize]> {
        self.0.get(&index).map(|v| v.as_slice())
    }

    /// Every vCPU named exists and every host CPU named is one this
    /// process may run on (its affinity mask, which cpusets and taskset
    /// narrow).
    pub fn check(&self, cpus: u32) -> Result<(), String> {
        let allowed = host_cpus()?;
        for (&vcpu, host) in &self.0 {
            if vcpu >= cpus {
                return Err(format!(
                    "--cpu-affinity names vCPU {vcpu}, but the VM has {cpus} (0 to {})",
                    cpus - 1
                ));
            }
            for c in host {
                if !allowed.contains(c) {
                    return Err(format!(
                        "--cpu-affinity: host CPU {c} (for vCPU {vcpu}) is not one this process may run on (allowed: {})",
                        cpu_list(&allowed)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The host CPUs this process may run on.
pub fn host_cpus() -> Result<Vec<usize>, String> {
    // SAFETY: cpu_set_t is plain data, filled by sched_getaffinity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most the size given into `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(format!(
            "cannot read this process's CPU affinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads inside `set` for any index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// `0-3,6` for a sorted list of CPUs.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

impl FromStr for CpuAffinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("bad --cpu-affinity '{s}': {why} (example: 0=2,1=3 or 0=2-5)");
        let mut map = std::collections::BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (vcpu, host) = entry
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{entry}' is not VCPU=HOSTCPU")))?;
            let vcpu: u32 = vcpu
                .trim()
                .parse()
                .map_err(|_| bad(&format!("'{vcpu}' is not a vCPU number")))?;
            let num = |t: &str| -> Result<usize, String> {
                t.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c < libc::CPU_SETSIZE as usize)
                    .ok_or_else(|| bad(&format!("'{t}' is not a host CPU number")))
            };
            let cpus: Vec<usize> = match host.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad(&format!("the range {a}-{b} is empty")));
                    }
                    (a..=b).collect()
                }
                None => vec![num(host)?],
            };
            if map.insert(vcpu, cpus).is_some() {
                return Err(bad(&format!("vCPU {vcpu} is named twice")));
            }
        }
        Ok(CpuAffinity(map))
    }
}

impl std::fmt::Display for CpuAffinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|(v, c)| match c.as_slice() {
                [one] => format!("{v}={one}"),
                _ => format!("{v}={}-{}", c[0], c[c.len() - 1]),
            })
            .collect();
        f.write_str(&entries.join(","))
    }
}

impl Serialize for CpuAffinity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CpuAffinity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// One VM's settings. Every field a user can set lives here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel to boot directly; empty when the VM boots its disk
    /// through firmware (`firmware`).
    #[serde(default)]
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub memory: MemSize,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub accel: Accel,
    /// The CPU a KVM guest is shown: host (all KVM offers) or portable
    /// (only what the software engine implements, so its snapshots and
    /// migrations also restore under --accel emu). The engine always shows
    /// its own CPU.
    #[serde(default)]
    pub cpu_model: hypervisor::CpuModel,
    #[serde(default)]
    pub serial: SerialMode,
    #[serde(default)]
    pub boot: BootProtocol,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, after the disks.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-balloon device.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices (vhost-user), after the vsock.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// The virtiofsd to start for `fs` entries with `dir=` (found on PATH,
    /// in ~/.cargo/bin or /usr/libexec when not given).
    #[serde(default)]
    pub virtiofsd: Option<PathBuf>,
    /// Which device is the console: serial (ttyS0) or virtio (hvc0).
    #[serde(default)]
    pub console: ConsoleKind,
    /// The exit device for test kernels (off unless asked for).
    #[serde(default)]
    pub exit_device: Option<ExitDeviceConfig>,
    /// A cloud-init NoCloud seed made from these files and attached as a
    /// read-only disk after `disks`.
    #[serde(default)]
    pub cloud_init: Option<crate::cloud_init::CloudInitConfig>,
    /// Boot through this BIOS image (SeaBIOS) from the first disk
    /// instead of a kernel (docs/firmware.md).
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// A pvpanic PCI device: the guest kernel reports its panics.
    #[serde(default)]
    pub pvpanic: bool,
    /// The VM's name: the SMBIOS product name a firmware-booted guest
    /// reads (Linux: /sys/class/dmi/id/product_name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The VM's UUID (8-4-4-4-12 hex digits): the SMBIOS system UUID of a
    /// firmware boot (/sys/class/dmi/id/product_uuid); random when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Host CPUs for the vCPU threads (none: wherever the host puts them).
    #[serde(default, skip_serializing_if = "CpuAffinity::is_empty")]
    pub cpu_affinity: CpuAffinity,
}

/// The BIOS image `vireo run --disk ...` boots with when no kernel and no
/// `--firmware` are given: Debian's `seabios` package.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/seabios/bios-256k.bin";

/// Memory the guest must have at least: page tables, tables and a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Most vCPUs the boot tables describe (one IOAPIC id after them).
pub const MAX_CPUS: u32 = 254;

/// The most guest memory Vireo runs (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// The limits every VM is held to, however it is made: `vm.create` and
/// `vireo run` check its configuration, a restore and a migration the
/// memory and vCPUs their manifest claims.
pub fn check_size(memory: u64, cpus: u32) -> Result<(), VmmError> {
    if cpus == 0 {
        return Err(VmmError::Config("--cpus must be at least 1".into()));
    }
    if cpus > MAX_CPUS {
        return Err(VmmError::Config(format!(
            "--cpus {cpus} is more than the {MAX_CPUS} Vireo supports"
        )));
    }
    if memory < MIN_MEMORY {
        return Err(VmmError::Config(format!(
            "--memory {} MiB is too small (at least {} MiB)",
            memory >> 20,
            MIN_MEMORY >> 20
        )));
    }
    if memory > MAX_MEMORY {
        return Err(VmmError::Config(format!(
            "--memory {} GiB is more than Vireo supports (1 TiB)",
            memory >> 30
        )));
    }
    Ok(())
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            memory: MemSize::default(),
            cpus: 1,
            accel: Accel::Auto,
            cpu_model: hypervisor::CpuModel::Host,
            serial: SerialMode::Stdio,
            boot: BootProtocol::Linux,
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            balloon: None,
            vsock: None,
            fs: Vec::new(),
            virtiofsd: None,
            console: ConsoleKind::Serial,
            exit_device: None,
            cloud_init: None,
            pvpanic: false,
            name: None,
            uuid: None,
            cpu_affinity: CpuAffinity::default(),
            firmware: None,
        }
    }

    /// A VM that boots its first disk through the BIOS image `firmware`.
    pub fn with_firmware(firmware: PathBuf) -> Self {
        VmConfig {
            firmware: Some(firmware),
            ..VmConfig::new(PathBuf::new())
        }
    }

    /// The kernel command line to boot with: Vireo's default one names the
    /// console device chosen (hvc0 for `--console virtio`); one the user
    /// wrote is kept as it is.
    pub fn effective_cmdline(&self) -> String {
        if self.console == ConsoleKind::Virtio && self.cmdline == DEFAULT_CMDLINE {
            DEFAULT_CMDLINE_VIRTIO_CONSOLE.to_string()
        } else {
            self.cmdline.clone()
        }
    }

    /// Read a configuration file: JSON when it ends in .json, TOML otherwise.
    pub fn from_file(path: &std::path::Path) -> Result<Self, VmmError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            VmmError::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            // toml's Display draws the offending line; keep the error to one line.
            toml::from_str(&text).map_err(|e| {
                let at = e
                    .span()
                    .map(|r| format!(" (line {})", text[..r.start].lines().count().max(1)))
                    .unwrap_or_default();
                format!("{}{at}", e.message().trim())
            })
        };
        parsed.map_err(|e| VmmError::Config(format!("bad config file {}: {e}", path.display())))
    }

    /// Check what can be checked before touching the host.
    pub fn validate(&self) -> Result<(), VmmError> {
        check_size(self.memory.0, self.cpus)?;
        match (&self.firmware, self.kernel.as_os_str().is_empty()) {
            (None, true) => {
                return Err(VmmError::Config(
                    "nothing to boot: give a kernel, or a disk to boot through firmware".into(),
                ))
            }
            (Some(_), true) if self.disks.is_empty() => {
                return Err(VmmError::Config(
                    "firmware boot needs a disk to boot from (--disk path=...)".into(),
                ))
            }
            _ => {}
        }
        self.validate_boot_order()?;
        if let Some(u) = &self.uuid {
            crate::firmware::parse_uuid(u).map_err(VmmError::Config)?;
        }
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_control()) {
                return Err(VmmError::Config(format!(
                    "--name {n:?}: a VM name is 1-64 characters, none of them control characters"
                )));
            }
        }
        for n in &self.nets {
            // A config file skips the option parser: check the same here.
            n.validate().map_err(VmmError::Config)?;
        }
        if let Some(v) = &self.vsock {
            v.validate()
                .map_err(|e| VmmError::Config(format!("vsock: {e}")))?;
        }
        let mut tags = std::collections::HashSet::new();
        for f in &self.fs {
            f.validate()
                .map_err(|e| VmmError::Config(format!("fs tag={}: {e}", f.tag)))?;
            if !tags.insert(&f.tag) {
                return Err(VmmError::Config(format!(
                    "fs tag={} is given twice: the guest tells devices apart by tag",
                    f.tag
                )));
            }
        }
        self.cpu_affinity
            .check(self.cpus)
            .map_err(VmmError::Config)?;
        self.validate_rate_limits()
    }

    /// `bootindex` only where firmware boots the disks, and no index twice.
    fn validate_boot_order(&self) -> Result<(), VmmError> {
        let mut seen: std::collections::HashMap<u32, usize> = Default::default();
        for (i, d) in self.disks.iter().enumerate() {
            let Some(n) = d.bootindex else { continue };
            if self.firmware.is_none() {
                return Err(VmmError::Config(format!(
                    "disk {} has bootindex={n}, but the VM boots its kernel directly: a boot order is for a firmware boot (leave out --kernel, or add --firmware)",
                    d.path.display()
                )));
            }
            if let Some(first) = seen.insert(n, i) {
                return Err(VmmError::Config(format!(
                    "disks {} and {} both have bootindex={n}: give each device its own",
                    self.disks[first].path.display(),
                    d.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Every bucket is valid; the disks (or NICs) of one group give one
    /// limit between them; a group name is the disks' or the NICs', not both.
    fn validate_rate_limits(&self) -> Result<(), VmmError> {
        use std::collections::HashMap;
        let bad =
            |what: String, e: &dyn std::fmt::Display| VmmError::Config(format!("{what}: {e}"));
        // Per group: who set its limit first, and that limit.
        let mut disk_groups: HashMap<&str, (usize, RateLimiterConfig)> = HashMap::new();
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(c) = &d.rate_limiter {
                c.validate().map_err(|e| bad(format!("disk{i}"), &e))?;
            }
            let (Some(g), Some(c)) = (&d.rate_group, &d.rate_limiter) else {
                continue;
            };
            match disk_groups.get(g.as_str()) {
                Some((first, other)) if other != c => {
                    return Err(VmmError::Config(format!(
                        "disk{i} and disk{first} are both in rate group '{g}' but give different limits (give the limit on one of them, or the same on each)"
                    )))
                }
                Some(_) => {}
                None => {
                    disk_groups.insert(g, (i, *c));
                }
            }
        }
        type NetLimit = (Option<RateLimiterConfig>, Option<RateLimiterConfig>);
        let mut net_groups: HashMap<&str, (usize, NetLimit)> = HashMap::new();
        for (i, n) in self.nets.iter().enumerate() {
            for c in [&n.rx_rate_limiter, &n.tx_rate_limiter]
                .into_iter()
                .flatten()
            {
                c.validate().map_err(|e| bad(format!("net{i}"), &e))?;
            }
            let Some(g) = &n.rate_group else { continue };
            if self.disks.iter().any(|d| d.rate_group.as_ref() == Some(g)) {
                return Err(VmmError::Config(format!(
                    "rate group '{g}' names both disks and NICs: give them groups of their own"
                )));
            }
            let lim = (n.rx_rate_limiter, n.tx_rate_limiter);
            if lim == (None, None) {
                continue;
            }
            match net_groups.get(g.as_str()) {
                Some((first, other)) if *other != lim => {
                    return Err(VmmError::Config(format!(
                        "net{i} and net{first} are both in rate group '{g}' but give different limits (give the limits on one of them, or the same on each)"
                    )))
                }
                Some(_) => {}
                None => {
                    net_groups.insert(g, (i, lim));
                }
            }
        }
        Ok(())
    }

    /// The kernel, initrd and disk files exist (checked before anything
    /// is built, so that a request naming a missing file changes nothing).
    pub fn check_files(&self) -> Result<(), VmmError> {
        if let Some(f) = &self.firmware {
            // Preloaded when it is outside a jail (`crate::jail`).
            if crate::firmware::file_available(f).is_err() {
                let hint = if f.as_os_str() == DEFAULT_FIRMWARE {
                    " (install Debian's seabios package, or give --firmware PATH)"
                } else {
                    ""
                };
                return Err(VmmError::Config(format!(
                    "firmware {} does not exist or is not a file{hint}",
                    f.display()
                )));
            }
            // A kernel handed to the firmware needs the option ROM that loads it.
            if !self.kernel.as_os_str().is_empty() {
                let rom = std::path::Path::new(crate::firmware::LINUXBOOT_ROM);
                if let Err(e) = crate::firmware::file_available(rom) {
                    return Err(crate::firmware::rom_error(&e));
                }
            }
        }
        let kernel = (!self.kernel.as_os_str().is_empty()).then_some(("kernel", &self.kernel));
        let files = kernel
            .into_iter()
            .chain(self.initrd.iter().map(|i| ("initrd", i)))
            .chain(self.disks.iter().map(|d| ("disk", &d.path)));
        for (what, path) in files {
            if !path.is_file() {
                return Err(VmmError::Config(format!(
                    "{what} {} does not exist or is not a file",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!("512M".parse::<MemSize>().unwrap().0, 512 << 20);
        assert_eq!("2G".parse::<MemSize>().unwrap().0, 2 << 30);
        assert_eq!("2GiB".parse::<MemSize>().unwrap().0, 2 << 30);
        assert_eq!("4096".parse::<MemSize>().unwrap().0, 4096);
        assert_eq!("64k".parse::<MemSize>().unwrap().0, 64 << 10);
        assert!("lots".parse::<MemSize>().is_err());
        assert!("M".parse::<MemSize>().is_err());
        assert!("99999999999T".parse::<MemSize>().is_err());
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!("stdio".parse::<SerialMode>().unwrap(), SerialMode::Stdio);
        assert_eq!(
            "file:/tmp/x".parse::<SerialMode>().unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialMode>().is_err());
        assert!("tcp:1".parse::<SerialMode>().is_err());
    }

    #[test]
    fn toml_and_json_configs_agree() {
        let t: VmConfig = toml::from_str(
            "kernel = \"/k\"\nmemory = \"1G\"\ncpus = 2\naccel = \"kvm\"\nserial = \"none\"\n",
        )
        .unwrap();
        let j: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","memory":1073741824,"cpus":2,"accel":"kvm","serial":"none"}"#,
        )
        .unwrap();
        assert_eq!(t, j);
        assert_eq!(t.cmdline, DEFAULT_CMDLINE);
        assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\nbogus = 1\n").is_err());
        assert_eq!(t.cpu_model, hypervisor::CpuModel::Host);
        let p: VmConfig = toml::from_str("kernel = \"/k\"\ncpu_model = \"portable\"\n").unwrap();
        assert_eq!(p.cpu_model, hypervisor::CpuModel::Portable);
        assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\ncpu_model = \"max\"\n").is_err());
        assert_eq!("portable".parse(), Ok(hypervisor::CpuModel::Portable));
    }

    #[test]
    fn rate_limit_options_parse_and_groups_must_agree() {
        let d: DiskConfig = "path=/d,bw=20M,iops=1000,group=g".parse().unwrap();
        let l = d.rate_limiter.unwrap();
        let bw = l.bandwidth.unwrap();
        assert_eq!((bw.size, bw.refill_time), (2 << 20, 100));
        assert_eq!(bw.rate_per_sec(), (20 << 20) as f64);
        assert_eq!(l.ops.unwrap().rate_per_sec(), 1000.0);
        assert_eq!(d.rate_group.as_deref(), Some("g"));
        // A rate that does not divide by ten refills once a second.
        let b = bucket_for_rate(7);
        assert_eq!((b.size, b.refill_time), (7, 1000));
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert!(err("path=/d,bw=0").contains("at least 1"));
        assert!(err("path=/d,bw=fast").contains("bw=fast"));
        let n: NetConfig = "tap=t0,rx_bw=1M,tx_pps=100".parse().unwrap();
        assert!(n.rx_rate_limiter.unwrap().ops.is_none());
        assert_eq!(
            n.tx_rate_limiter.unwrap().ops.unwrap().rate_per_sec(),
            100.0
        );
        assert_eq!(parse_limit("none").unwrap(), RateLimiterConfig::default());
        assert_eq!(parse_limit("bw=1M,pps=10").unwrap().ops.unwrap().size, 1);
        assert!(parse_limit("fast").is_err());

        let mut c = VmConfig::new("/k".into());
        c.disks.push("path=/a,bw=1M,group=g".parse().unwrap());
        c.disks.push("path=/b,group=g".parse().unwrap());
        c.validate().unwrap();
        c.disks.push("path=/c,bw=2M,group=g".parse().unwrap());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("disk2 and disk0") && e.contains("'g'"), "{e}");
        c.disks.pop();
        c.nets.push("tap=t0,group=g".parse().unwrap());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("both disks and NICs"), "{e}");
        let mut c = VmConfig::new("/k".into());
        let mut d: DiskConfig = "path=/a".parse().unwrap();
        d.rate_limiter = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time: 0,
            }),
        });
        c.disks.push(d);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("disk0") && e.contains("refill_time"), "{e}");
    }

    #[test]
    fn cpu_affinity_parses_and_checks() {
        let a: CpuAffinity = "0=0, 1=0-0".parse().unwrap();
        assert_eq!(a.of(0), Some(&[0usize][..]));
        assert_eq!(a.of(1), Some(&[0usize][..]));
        assert_eq!(a.to_string(), "0=0,1=0");
        assert!(a.check(2).is_ok());
        let e = a.check(1).unwrap_err();
        assert!(e.contains("names vCPU 1, but the VM has 1"), "{e}");
        let far: CpuAffinity = "0=1023".parse().unwrap();
        let e = far.check(1).unwrap_err();
        assert!(e.contains("host CPU 1023 (for vCPU 0) is not one"), "{e}");
        for bad in ["0", "x=1", "0=y", "0=3-1", "0=1,0=2", "0=99999"] {
            assert!(bad.parse::<CpuAffinity>().is_err(), "{bad}");
        }
        let t: VmConfig =
            toml::from_str("kernel = \"/k\"\ncpus = 2\ncpu_affinity = \"0=0,1=0\"\n").unwrap();
        assert_eq!(t.cpu_affinity, a);
    }

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "path=/d.qcow2,format=qcow2,readonly=on,serial=abc"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/d.qcow2"));
        assert_eq!(d.format, Some(ImageFormat::Qcow2));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert!(err("format=raw").contains("no path"));
        assert!(err("path=,format=raw").contains("no path"));
        // vmdk and vhdx are (read-only) formats; an unknown one is refused.
        assert!(err("path=/d,format=vpc").contains("vpc"));
        let v: DiskConfig = "path=/d.vmdk,format=vmdk,readonly=on".parse().unwrap();
        assert_eq!(v.format, Some(ImageFormat::Vmdk));
        assert!(err("path=/d,readonly=maybe").contains("readonly=maybe"));
        assert!(err("path=/d,cache=none").contains("cache"));
        assert!(err("path=/d,path=/e").contains("twice"));
        assert!("path=/d,ro=on".parse::<DiskConfig>().unwrap().readonly);
        let t: VmConfig =
            toml::from_str("kernel = \"/k\"\n[[disks]]\npath = \"/a.img\"\nreadonly = true\n")
                .unwrap();
        assert_eq!(t.disks.len(), 1);
        assert!(t.disks[0].readonly);
        let j: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","disks":[{"path":"/a","format":"qcow2"}]}"#)
                .unwrap();
        assert_eq!(j.disks[0].format, Some(ImageFormat::Qcow2));
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"kernel":"/k","disks":[{"path":"/a","format":"vpc"}]}"#
        )
        .is_err());
    }

    #[test]
    fn boot_order_options_parse_and_check() {
        let d: DiskConfig = "path=/a,bootindex=2".parse().unwrap();
        assert_eq!(d.bootindex, Some(2));
        assert_eq!("path=/a".parse::<DiskConfig>().unwrap().bootindex, None);
        let e = "path=/a,bootindex=first".parse::<DiskConfig>().unwrap_err();
        assert!(e.to_string().contains("bootindex=first"), "{e}");
        let e = "user,bootindex=1".parse::<NetConfig>().unwrap_err();
        assert!(e.to_string().contains("a NIC cannot boot"), "{e}");
        // The config file and the API say the same.
        let t: VmConfig = toml::from_str(
            "firmware = \"/bios.bin\"\n[[disks]]\npath = \"/a\"\n[[disks]]\npath = \"/b\"\nbootindex = 1\n",
        )
        .unwrap();
        assert_eq!(
            (t.disks[0].bootindex, t.disks[1].bootindex),
            (None, Some(1))
        );
        t.validate().unwrap();
        let j: VmConfig = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(j, t);
        // One index per device.
        let mut c = t.clone();
        c.disks[0].bootindex = Some(1);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("disks /a and /b both have bootindex=1"), "{e}");
        // No boot order without firmware.
        let mut c = VmConfig::new("/k".into());
        c.disks.push("path=/a,bootindex=0".parse().unwrap());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("boots its kernel directly"), "{e}");
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!("".parse::<NetConfig>().unwrap().tap, "vireo%d");
        assert!("mac=01:00:5e:00:00:01".parse::<NetConfig>().is_err());
        assert!("bridge=br0"
            .parse::<NetConfig>()
            .unwrap_err()
            .to_string()
            .contains("bridge"));
        assert_eq!(n.mrg_rxbuf, None, "the backend's default");
        let on: NetConfig = "tap=t0,mrg_rxbuf=on".parse().unwrap();
        assert_eq!(on.mrg_rxbuf, Some(true));
        let off: NetConfig = "user,mrg_rxbuf=off".parse().unwrap();
        assert_eq!(off.mrg_rxbuf, Some(false));
        assert!("tap=t0,mrg_rxbuf=maybe"
            .parse::<NetConfig>()
            .unwrap_err()
            .to_string()
            .contains("on or off"));
    }

    #[test]
    fn user_net_mtu_defaults_to_passt_s_with_merged_buffers() {
        let n: NetConfig = "user".parse().unwrap();
        assert_eq!((n.mtu, n.user_mtu()), (None, 65520));
        let off: NetConfig = "user,mrg_rxbuf=off".parse().unwrap();
        assert_eq!(off.user_mtu(), 1500, "a driver without merged buffers");
        let m: NetConfig = "user,mtu=1500".parse().unwrap();
        assert_eq!((m.mtu, m.user_mtu()), (Some(1500), 1500));
        let m: NetConfig = "user,mtu=9000,mrg_rxbuf=on".parse().unwrap();
        assert_eq!(m.user_mtu(), 9000);
        assert_eq!(
            "user,mtu=576,mrg_rxbuf=off"
                .parse::<NetConfig>()
                .unwrap()
                .user_mtu(),
            576
        );
        for (bad, why) in [
            ("user,mtu=67", "68 to 65520"),
            ("user,mtu=65521", "68 to 65520"),
            ("user,mtu=70000", "mtu"),
            ("user,mtu=big", "mtu"),
            ("user,mtu=9000,mrg_rxbuf=off", "need merged receive buffers"),
            ("tap=t0,mtu=9000", "a tap's MTU"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("mtu"), "{bad} names the key: {e}");
        }
        // A config file (JSON) is checked the same way.
        let j: NetConfig = serde_json::from_str(r#"{"backend":"user","mtu":50}"#).unwrap();
        assert!(j.validate().unwrap_err().contains("68 to 65520"));
    }

    #[test]
    fn user_net_options_parse() {
        let n: NetConfig = "user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53"
            .parse()
            .unwrap();
        assert_eq!(n.backend, NetBackendKind::User);
        assert_eq!(n.hostfwd.len(), 2);
        assert_eq!(n.hostfwd[0].to_string(), "tcp:127.0.0.1:2222-:22");
        assert_eq!(
            "user".parse::<NetConfig>().unwrap().backend,
            NetBackendKind::User
        );
        assert_eq!(
            "tap,tap=t0".parse::<NetConfig>().unwrap(),
            NetConfig::tap("t0")
        );
        let e = "tap=t0,hostfwd=tcp::1-:2".parse::<NetConfig>().unwrap_err();
        assert!(e.to_string().contains("needs user networking"), "{e}");
        let e = "user,tap=t0".parse::<NetConfig>().unwrap_err();
        assert!(e.to_string().contains("has none"), "{e}");
        let e = "user,hostfwd=tcp::2222-10.0.0.2:22"
            .parse::<NetConfig>()
            .unwrap_err();
        assert!(e.to_string().contains("guest address empty"), "{e}");
        // A config file says the same in TOML, and old files (no backend) mean a tap.
        let t: VmConfig = toml::from_str(
            "kernel = \"/k\"\n[[nets]]\nbackend = \"user\"\nhostfwd = [\"tcp::8080-:80\"]\n[[nets]]\ntap = \"t1\"\n",
        )
        .unwrap();
        assert_eq!(t.nets[0].backend, NetBackendKind::User);
        assert_eq!(t.nets[0].hostfwd[0].host_port, 8080);
        assert_eq!(t.nets[1], NetConfig::tap("t1"));
        let round: VmConfig = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(round, t);
        let mut bad = t.clone();
        bad.nets[1].hostfwd = t.nets[0].hostfwd.clone();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn exit_device_options_parse() {
        let d: ExitDeviceConfig = "".parse().unwrap();
        assert_eq!((d.port, d.size), (0xf4, 4));
        let d: ExitDeviceConfig = "port=0x501,size=2".parse().unwrap();
        assert_eq!((d.port, d.size), (0x501, 2));
        let d: ExitDeviceConfig = "port=244".parse().unwrap();
        assert_eq!(d.port, 0xf4);
        assert!("size=3".parse::<ExitDeviceConfig>().is_err());
        assert!("port=0x10000".parse::<ExitDeviceConfig>().is_err());
        assert!("iobase=1".parse::<ExitDeviceConfig>().is_err());
    }

    #[test]
    fn balloon_options_parse() {
        assert_eq!(
            "".parse::<BalloonConfig>().unwrap(),
            BalloonConfig::default()
        );
        let b: BalloonConfig = "deflate_on_oom=off,stats=on".parse().unwrap();
        assert!(!b.deflate_on_oom && b.stats);
        assert!("stats=maybe".parse::<BalloonConfig>().is_err());
        assert!("size=64"
            .parse::<BalloonConfig>()
            .unwrap_err()
            .to_string()
            .contains("size"));
        let t: VmConfig = toml::from_str("kernel = \"/k\"\n[balloon]\nstats = false\n").unwrap();
        assert_eq!(
            t.balloon,
            Some(BalloonConfig {
                deflate_on_oom: true,
                stats: false
            })
        );
        assert!(VmConfig::new("/k".into()).balloon.is_none());
    }

    #[test]
    fn virtio_console_switches_only_the_default_cmdline() {
        let mut c = VmConfig::new("/k".into());
        assert_eq!(c.effective_cmdline(), DEFAULT_CMDLINE);
        c.console = "virtio".parse().unwrap();
        assert_eq!(c.effective_cmdline(), DEFAULT_CMDLINE_VIRTIO_CONSOLE);
        c.cmdline = "console=ttyS0 console=hvc0".into();
        assert_eq!(c.effective_cmdline(), "console=ttyS0 console=hvc0");
        assert!("hvc".parse::<ConsoleKind>().is_err());
        let j: VmConfig = serde_json::from_str(r#"{"kernel":"/k","console":"virtio"}"#).unwrap();
        assert_eq!(j.console, ConsoleKind::Virtio);
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut c = VmConfig::new("/k".into());
        c.validate().unwrap();
        c.cpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--cpus"));
        c.cpus = 1;
        c.memory = MemSize(1 << 20);
        assert!(c.validate().unwrap_err().to_string().contains("too small"));
    }
}
