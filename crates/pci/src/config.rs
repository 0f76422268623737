//! The type-0 configuration header and capability list, with per-byte write
//! masks so that each device only declares what it has and guest writes to
//! read-only bits are dropped without device code.

use devices::{Persist, PersistError};

use crate::{BarKind, BarRegion};

/// Size of the conventional configuration space (what 0xcf8/0xcfc reach).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the PCI Express extended configuration space (reachable via ECAM).
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a device model honours; the rest read as zero.
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | COMMAND_INTX_DISABLE;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Error bits in the status register are write-one-to-clear.
const STATUS_W1C: u16 = 0xf900;

/// Where the first capability goes: right after the type-0 header.
const FIRST_CAPABILITY: usize = 0x40;

/// Configuration-space errors a device builder can make (never guest-caused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("BAR {0} is out of range or already used")]
    BarSlot(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 (memory) or 4 (I/O) bytes")]
    BarSize(u64),
    #[error("no room for a {0}-byte capability in configuration space")]
    CapabilityFull(usize),
    #[error("capability body and write mask differ in length")]
    CapabilityMask,
}

/// A type-0 configuration space: the bytes the guest sees, which bits of each
/// byte it may write, and which bits are write-one-to-clear.
#[derive(Clone)]
pub struct PciConfig {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [Option<BarRegion>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("bars", &self.bars)
            .finish()
    }
}

/// Identity of a function: what goes into the read-only part of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface, as 0xCCSSPP.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfig {
    /// A 256-byte header for a single-function endpoint (header type 0).
    pub fn new(ids: PciIds) -> Self {
        Self::with_size(ids, CONFIG_SPACE_SIZE)
    }

    /// A header with `size` bytes of configuration space (256 or 4096).
    pub fn with_size(ids: PciIds, size: usize) -> Self {
        let size = if size >= EXT_CONFIG_SPACE_SIZE {
            EXT_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        let mut c = PciConfig {
            data: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            bars: Default::default(),
            next_cap: FIRST_CAPABILITY,
            last_cap: None,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.data[REVISION_ID] = ids.revision;
        c.data[CLASS_PROG_IF] = ids.class as u8;
        c.data[CLASS_PROG_IF + 1] = (ids.class >> 8) as u8;
        c.data[CLASS_PROG_IF + 2] = (ids.class >> 16) as u8;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        c.set_wmask_u16(COMMAND, COMMAND_WRITABLE);
        c.set_w1c_u16(STATUS, STATUS_W1C);
        c.wmask[CACHE_LINE_SIZE] = 0xff;
        c.wmask[LATENCY_TIMER] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Let the guest write every bit of `len` bytes at `off` (plain
    /// read-write registers such as a host bridge's PAM bytes).
    pub fn set_writable(&mut self, off: usize, len: usize) {
        let end = (off + len).min(self.wmask.len());
        if off < end {
            self.wmask[off..end].fill(0xff);
        }
    }

    /// Size of this configuration space (256 or 4096).
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// Declare INTx pin (1 = INTA .. 4 = INTD; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.data[INTERRUPT_PIN] = pin;
    }

    /// Declare BAR `index` (a 64-bit BAR also uses `index + 1`). The BAR
    /// reads as zero until the VMM or the guest gives it an address; its
    /// writable bits are exactly the address bits above the size, so that the
    /// guest's all-ones sizing write reads back `~(size - 1) | flags`.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let slots = if kind.is_64bit() { 2 } else { 1 };
        if index + slots > 6 || (index..index + slots).any(|i| self.bar_slot_used(i)) {
            return Err(ConfigError::BarSlot(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        if !size.is_power_of_two() || size < min || (!kind.is_64bit() && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        let off = BAR0 + index * 4;
        let mask = !(size - 1);
        let flags: u32 = match kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => (prefetchable as u32) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | (prefetchable as u32) << 3,
        };
        self.set_u32(off, flags);
        self.set_wmask_u32(off, mask as u32 & !flag_bits(kind));
        if let BarKind::Memory64 { .. } = kind {
            self.set_wmask_u32(off + 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some(BarRegion { index, size, kind });
        Ok(())
    }

    fn bar_slot_used(&self, i: usize) -> bool {
        self.bars[i].is_some()
            || (i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind.is_64bit()))
    }

    /// The BARs this function declared.
    pub fn bars(&self) -> impl Iterator<Item = BarRegion> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The BAR declared at `index`, if any.
    pub fn bar(&self, index: usize) -> Option<BarRegion> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently holds (whatever the guest wrote,
    /// decode enabled or not).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + index * 4;
        let lo = (self.read_u32(off) & !flag_bits(bar.kind)) as u64;
        Some(match bar.kind {
            BarKind::Memory64 { .. } => lo | (self.read_u32(off + 4) as u64) << 32,
            _ => lo,
        })
    }

    /// Program BAR `index` (what firmware does before the OS runs). Bits
    /// below the BAR's size are dropped.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bar(index) else { return };
        let off = BAR0 + index * 4;
        let addr = addr & !(bar.size - 1);
        let flags = self.read_u32(off) & flag_bits(bar.kind);
        self.set_u32(off, addr as u32 & !flag_bits(bar.kind) | flags);
        if let BarKind::Memory64 { .. } = bar.kind {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// Where BAR `index` decodes right now: its address if the matching
    /// command bit is on and the address is sane, else `None`.
    pub fn bar_mapping(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let cmd = self.command();
        let enabled = match bar.kind {
            BarKind::Io => cmd & COMMAND_IO != 0,
            _ => cmd & COMMAND_MEMORY != 0,
        };
        let addr = self.bar_address(index)?;
        let limit: u128 = if bar.kind == BarKind::Io {
            1 << 16
        } else {
            1 << 64
        };
        (enabled && addr != 0 && addr as u128 + bar.size as u128 <= limit).then_some(addr)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Append a capability. `body` is the whole capability including its
    /// first two bytes (ID and next pointer, the latter filled in here);
    /// `wmask` says which bits of each body byte the guest may write.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigError> {
        if body.len() != wmask.len() {
            return Err(ConfigError::CapabilityMask);
        }
        let off = self.next_cap;
        let len = body.len().max(2);
        if off + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilityFull(len));
        }
        self.data[off..off + body.len()].copy_from_slice(body);
        self.wmask[off..off + body.len()].copy_from_slice(wmask);
        // The ID and next pointer are never guest-writable.
        self.wmask[off] = 0;
        self.wmask[off + 1] = 0;
        self.data[off + 1] = 0;
        match self.last_cap {
            Some(prev) => self.data[prev + 1] = off as u8,
            None => {
                self.data[CAPABILITIES_POINTER] = off as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    /// Load a space [`Persist::save`] returned. Every bit the guest cannot
    /// write (identity, BAR kinds, capability layout) must match this
    /// function's own: a saved space only fits the same kind of device.
    fn check_saved(&self, saved: &[u8]) -> Result<(), PersistError> {
        if saved.len() != self.data.len() {
            return Err(PersistError::invalid(
                DEVICE,
                format!(
                    "configuration space of {} bytes, this device has {}",
                    saved.len(),
                    self.data.len()
                ),
            ));
        }
        let fixed = |o: usize| !(self.wmask[o] | self.w1c[o]);
        if let Some(o) = (0..saved.len()).find(|&o| (saved[o] ^ self.data[o]) & fixed(o) != 0) {
            return Err(PersistError::mismatch(
                DEVICE,
                format!(
                    "read-only configuration byte {o:#x} is {:#04x}, this device has {:#04x} (vendor {:#06x} device {:#06x}): not the same kind of device",
                    saved[o],
                    self.data[o],
                    self.read_u16(VENDOR_ID),
                    self.read_u16(DEVICE_ID)
                ),
            ));
        }
        Ok(())
    }

    /// A guest read at `offset`: bytes past the end of the space read as
    /// zero (an absent extended capability list).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write at `offset`, filtered by the write and W1C masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < self.data.len()) else {
                return;
            };
            let m = self.wmask[o];
            let cleared = v & self.w1c[o];
            self.data[o] = (self.data[o] & !m | v & m) & !cleared;
        }
    }

    pub fn read_u8(&self, off: usize) -> u8 {
        self.data.get(off).copied().unwrap_or(0)
    }

    pub fn read_u16(&self, off: usize) -> u16 {
        let mut b = [0; 2];
        self.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Set bytes directly, bypassing the write masks (device side).
    pub fn set_bytes(&mut self, off: usize, v: &[u8]) {
        if let Some(dst) = self.data.get_mut(off..off + v.len()) {
            dst.copy_from_slice(v);
        }
    }

    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.set_bytes(off, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.set_bytes(off, &v.to_le_bytes());
    }

    fn set_wmask_u16(&mut self, off: usize, v: u16) {
        self.wmask[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask_u32(&mut self, off: usize, v: u32) {
        self.wmask[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_w1c_u16(&mut self, off: usize, v: u16) {
        self.w1c[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Capability offsets, walking the list as a driver does (bounded, so a
    /// corrupted list cannot loop).
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut p = self.read_u8(CAPABILITIES_POINTER) as usize & !3;
        while p != 0 && out.len() < 48 {
            out.push((self.read_u8(p), p));
            p = self.read_u8(p + 1) as usize & !3;
        }
        out
    }

    /// Does a config write at `offset..offset+len` touch a BAR or the
    /// command register (so BAR routing may have changed)?
    pub fn write_affects_routing(offset: usize, len: usize) -> bool {
        let end = offset.saturating_add(len);
        let overlaps = |a: usize, b: usize| offset < b && end > a;
        overlaps(COMMAND, COMMAND + 2) || overlaps(BAR0, BAR0 + 24)
    }
}

const DEVICE: &str = "pci configuration space";

/// A function's whole configuration space as the guest sees it (256 bytes,
/// or 4 KiB for a function with an extended space).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ConfigSpaceState {
    pub bytes: Vec<u8>,
}

impl Persist for PciConfig {
    type State = ConfigSpaceState;

    fn save(&self) -> Result<ConfigSpaceState, PersistError> {
        Ok(ConfigSpaceState {
            bytes: self.data.clone(),
        })
    }

    fn restore(&mut self, saved: &ConfigSpaceState) -> Result<(), PersistError> {
        self.check_saved(&saved.bytes)?;
        self.data.copy_from_slice(&saved.bytes);
        Ok(())
    }
}

fn flag_bits(kind: BarKind) -> u32 {
    match kind {
        BarKind::Io => 0x3,
        _ => 0xf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1234,
            device: 0x5678,
            revision: 1,
            class: 0x020000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    #[test]
    fn saved_space_fits_only_the_same_kind_of_device() {
        let mut c = PciConfig::new(ids());
        c.write(INTERRUPT_LINE, &[0x0b]);
        let saved = c.save().unwrap();
        let mut d = PciConfig::new(ids());
        d.restore(&saved).unwrap();
        assert_eq!(d.read_u8(INTERRUPT_LINE), 0x0b);
        let mut other = saved.clone();
        other.bytes[2] ^= 1; // device ID
        let mut e = PciConfig::new(ids());
        let err = e.restore(&other).unwrap_err();
        assert!(matches!(err, PersistError::Mismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("not the same kind of device"));
        assert_eq!(
            e.read_u8(INTERRUPT_LINE),
            0,
            "a refused space changes nothing"
        );
        let short = ConfigSpaceState {
            bytes: saved.bytes[..64].to_vec(),
        };
        assert!(matches!(
            e.restore(&short),
            Err(PersistError::Invalid { .. })
        ));
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = PciConfig::new(ids());
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(8), 0x0200_0001);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(8), 0x0200_0001);
        // Command: only the decoded bits stick.
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.write(INTERRUPT_LINE, &[0x0b]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0x0b);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfig::new(ids());
        c.add_bar(
            0,
            0x4000,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(1, 0x10_0000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        c.add_bar(3, 0x20, BarKind::Io).unwrap();
        assert_eq!(
            c.add_bar(2, 0x1000, BarKind::Io),
            Err(ConfigError::BarSlot(2))
        );
        assert_eq!(
            c.add_bar(4, 0x1001, BarKind::Io),
            Err(ConfigError::BarSize(0x1001))
        );
        for i in 0..6 {
            c.write(BAR0 + 4 * i, &[0xff; 4]);
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_c000);
        assert_eq!(c.read_u32(BAR0 + 4), 0xfff0_000c);
        assert_eq!(c.read_u32(BAR0 + 8), 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_ffe1);
        assert_eq!(c.read_u32(BAR0 + 16), 0);
        // Program addresses the way the guest does.
        c.write(BAR0 + 4, &0xe000_0000u32.to_le_bytes());
        c.write(BAR0 + 8, &0x1u32.to_le_bytes());
        assert_eq!(c.bar_address(1), Some(0x1_e000_0000));
        assert_eq!(c.bar_mapping(1), None, "memory decode is off");
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_mapping(1), Some(0x1_e000_0000));
        assert_eq!(c.bar_mapping(3), None, "I/O decode is off");
        c.set_bar_address(0, 0xc000_1234);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn capability_list_links_and_masks() {
        let mut c = PciConfig::new(ids());
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        let a = c
            .add_capability(&[0x09, 0, 5, 0xaa, 0xbb], &[0, 0, 0, 0xff, 0])
            .unwrap();
        let b = c
            .add_capability(&[0x11, 0xee, 0, 0], &[0xff, 0xff, 0xf0, 0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.capabilities(), vec![(0x09, 0x40), (0x11, 0x48)]);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(a, &[0xff; 8]);
        assert_eq!(c.read_u8(a + 1), 0x48, "next pointer is read-only");
        assert_eq!(c.read_u8(a + 3), 0xff);
        assert_eq!(c.read_u8(a + 4), 0xbb);
        c.write(b + 2, &[0xff]);
        assert_eq!(c.read_u8(b + 2), 0xf0);
    }

    #[test]
    fn status_errors_are_write_one_to_clear_and_reads_past_end_are_zero() {
        let mut c = PciConfig::new(ids());
        c.set_u16(STATUS, 0x8010);
        c.write(STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0x0010);
        let mut b = [0xffu8; 4];
        c.read(0xfe, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        c.write(0xfe, &[1, 2, 3, 4]);
        c.read(usize::MAX - 1, &mut b);
        c.write(usize::MAX - 1, &[1, 2, 3, 4]);
    }
}
