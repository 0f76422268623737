//! QEMU's firmware configuration interface (fw_cfg), as SeaBIOS reads it.
//!
//! The firmware learns the machine from here: the memory map, the ACPI
//! tables and the script that places them, the number of CPUs, boot
//! options. Items are byte strings chosen by a 16-bit selector; the
//! well-known ones have fixed selectors (signature 0x0000, feature bits
//! 0x0001, CPU count 0x0005, a kernel's parts 0x0007-0x0018, the file
//! directory 0x0019), named files get
//! selectors from 0x0020 upward and are listed in the directory (a
//! big-endian count, then per file: size (BE u32), selector (BE u16), two
//! reserved bytes, a 56-byte NUL-padded name).
//!
//! Ports (x86 layout, base 0x510, 12 bytes):
//!
//! - `+0` selector (16-bit write): choose an item and rewind to its start;
//! - `+1` data (8-bit read): the next byte of the item, 0 past its end;
//! - `+4..+12` DMA address, big-endian: the high half at `+4`, the low half
//!   at `+8`; writing the low half runs the request at that guest address.
//!   Reading `+4..+12` gives the DMA signature "QEMU CFG".
//!
//! A DMA request is 16 bytes in guest memory: control (BE u32: bit 0 error,
//! 1 read, 2 skip, 3 select with the selector in bits 16..31, 4 write),
//! length (BE u32), address (BE u64). The device carries it out at once and
//! writes the control word back: 0 when done, the error bit when the
//! request asked for something the device does not do (writes: every item
//! is read-only here) or named memory outside guest RAM. Guest-controlled
//! values never panic the VMM: a bad request only sets the error bit.
//!
//! Invariants: the items never change after the device is built (they are
//! configuration, not state); the guest-visible state is the selector, the
//! read offset and the latched high half of the DMA address, and only that
//! is saved.

use std::sync::Arc;

use hypervisor::GuestRam;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::{BusDevice, Persist, PersistError};

/// Where the device sits on the port bus and how many ports it takes.
pub const FW_CFG_PORT: u64 = 0x510;
pub const FW_CFG_PORT_LEN: u64 = 12;

/// Well-known selectors.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// A kernel handed to the firmware (QEMU's `-kernel` with a BIOS): where
/// each part goes (32-bit little-endian addresses and sizes) and its bytes.
/// An option ROM (QEMU's linuxboot_dma.bin) reads them and starts the
/// kernel's real-mode setup code.
pub const FW_CFG_KERNEL_ADDR: u16 = 0x07;
pub const FW_CFG_KERNEL_SIZE: u16 = 0x08;
pub const FW_CFG_INITRD_ADDR: u16 = 0x0a;
pub const FW_CFG_INITRD_SIZE: u16 = 0x0b;
pub const FW_CFG_KERNEL_DATA: u16 = 0x11;
pub const FW_CFG_INITRD_DATA: u16 = 0x12;
pub const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
pub const FW_CFG_SETUP_ADDR: u16 = 0x16;
pub const FW_CFG_SETUP_SIZE: u16 = 0x17;
pub const FW_CFG_SETUP_DATA: u16 = 0x18;
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// The first selector handed to a named file.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// x86: IRQ0 is routed to IOAPIC pin 2 (SeaBIOS's MP table follows it).
pub const FW_CFG_IRQ0_OVERRIDE: u16 = 0x8002;

/// Feature bits at [`FW_CFG_ID`]: the port interface and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;

const DMA_CTL_ERROR: u32 = 1;
const DMA_CTL_READ: u32 = 2;
const DMA_CTL_SKIP: u32 = 4;
const DMA_CTL_SELECT: u32 = 8;
const DMA_CTL_WRITE: u32 = 0x10;

/// Longest file name the directory carries, NUL included.
pub const FILE_NAME_LEN: usize = 56;

/// Why an item could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name '{0}' is longer than {max} bytes", max = FILE_NAME_LEN - 1)]
    NameTooLong(String),
    #[error("fw_cfg file '{0}' added twice")]
    Duplicate(String),
    #[error("fw_cfg item '{name}' is {len} bytes, more than 4 GiB")]
    TooLarge { name: String, len: usize },
}

/// The items a [`FwCfg`] serves, gathered before the device is built.
#[derive(Debug, Default, Clone)]
pub struct FwCfgItems {
    /// (selector, contents) of the fixed items.
    fixed: Vec<(u16, Vec<u8>)>,
    /// (name, contents) of the files, in selector order.
    files: Vec<(String, Vec<u8>)>,
}

impl FwCfgItems {
    /// The items every machine has: the signature, the feature bits and
    /// the CPU count.
    pub fn new(cpus: u16) -> Self {
        let mut items = FwCfgItems::default();
        items.set(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.set(FW_CFG_ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        items.set(FW_CFG_NB_CPUS, cpus.to_le_bytes().to_vec());
        items.set(FW_CFG_MAX_CPUS, cpus.to_le_bytes().to_vec());
        items.set(FW_CFG_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        items
    }

    /// Set a fixed-selector item (replacing an earlier value).
    pub fn set(&mut self, selector: u16, data: Vec<u8>) {
        self.fixed.retain(|(s, _)| *s != selector);
        self.fixed.push((selector, data));
    }

    /// Add a named file.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong(name.into()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge {
                name: name.into(),
                len: data.len(),
            });
        }
        self.files.push((name.into(), data));
        Ok(())
    }

    /// A file holding a little-endian integer of `bytes` bytes (how
    /// SeaBIOS's `romfile_loadint` reads its options).
    pub fn add_int(&mut self, name: &str, value: u64, bytes: usize) -> Result<(), FwCfgError> {
        self.add_file(name, value.to_le_bytes()[..bytes.min(8)].to_vec())
    }

    /// The names of the files, in directory order.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(n, _)| n.as_str())
    }

    /// The file directory item.
    fn directory(&self) -> Vec<u8> {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.iter().enumerate() {
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(FW_CFG_FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        dir
    }
}

/// The guest-visible state a snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u32,
    /// The high half of the DMA address as last written.
    pub dma_high: u32,
}

pub struct FwCfg {
    /// Contents by selector (sparse: fixed items and files).
    items: Vec<(u16, Arc<[u8]>)>,
    mem: GuestRam,
    state: FwCfgState,
}

impl FwCfg {
    /// A device serving `items`; DMA requests read and write `mem`.
    pub fn new(items: FwCfgItems, mem: GuestRam) -> Self {
        let dir = items.directory();
        let mut all: Vec<(u16, Arc<[u8]>)> = items
            .fixed
            .into_iter()
            .map(|(s, d)| (s, Arc::from(d)))
            .collect();
        all.push((FW_CFG_FILE_DIR, Arc::from(dir)));
        for (i, (_, data)) in items.files.into_iter().enumerate() {
            all.push((FW_CFG_FILE_FIRST + i as u16, Arc::from(data)));
        }
        FwCfg {
            items: all,
            mem,
            state: FwCfgState::default(),
        }
    }

    /// The selected item (empty when nothing is at the selector).
    fn current(&self) -> &[u8] {
        self.items
            .iter()
            .find(|(s, _)| *s == self.state.selector)
            .map_or(&[][..], |(_, d)| d)
    }

    fn select(&mut self, selector: u16) {
        self.state.selector = selector;
        self.state.offset = 0;
    }

    /// Run the DMA request at `addr`, then write its control word back.
    fn dma(&mut self, addr: u64) {
        let mut req = [0u8; 16];
        if self.mem.read_slice(&mut req, GuestAddress(addr)).is_err() {
            // Nowhere to report the error: the request is not in RAM.
            tracing::debug!("fw_cfg: DMA request at {addr:#x} is outside guest RAM");
            return;
        }
        let control = u32::from_be_bytes(req[0..4].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(req[4..8].try_into().unwrap_or_default());
        let target = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_CTL_READ != 0 {
            self.dma_read(target, len)
        } else if control & DMA_CTL_WRITE != 0 {
            // Every item is read-only.
            false
        } else if control & DMA_CTL_SKIP != 0 {
            self.state.offset = self.state.offset.saturating_add(len);
            true
        } else {
            true
        };
        let done: u32 = if ok { 0 } else { DMA_CTL_ERROR };
        // The request was readable, so its first word is writable RAM too
        // (unless it straddles a region end, which then only loses the reply).
        let _ = self
            .mem
            .write_slice(&done.to_be_bytes(), GuestAddress(addr));
    }

    /// Copy `len` bytes of the item from the current offset to `target`,
    /// zeros past the item's end.
    fn dma_read(&mut self, target: u64, len: u32) -> bool {
        let offset = self.state.offset as usize;
        let item = self.current();
        let start = offset.min(item.len());
        let end = (offset + len as usize).min(item.len());
        let mut buf = item[start..end].to_vec();
        buf.resize(len as usize, 0);
        self.state.offset = self.state.offset.saturating_add(len);
        self.mem.write_slice(&buf, GuestAddress(target)).is_ok()
    }
}

const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => {
                // The data port: one byte per read (wider reads get the
                // next bytes in order, as QEMU's x86 port does not allow
                // but costs nothing to give).
                for b in data.iter_mut() {
                    let item = self.current();
                    *b = item.get(self.state.offset as usize).copied().unwrap_or(0);
                    self.state.offset = self.state.offset.saturating_add(1);
                }
            }
            4..=11 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE
                        .get(offset as usize - 4 + i)
                        .copied()
                        .unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        match (offset, data.len()) {
            (0, 2) | (0, 4) => self.select(u16::from_le_bytes([v[0], v[1]])),
            // The DMA address halves are big-endian: the guest's outl of
            // cpu_to_be32(x) puts x's bytes on the bus most significant first.
            (4, 4) => self.state.dma_high = u32::from_be_bytes(v),
            (8, 4) => {
                let addr = ((self.state.dma_high as u64) << 32) | u32::from_be_bytes(v) as u64;
                self.state.dma_high = 0;
                self.dma(addr);
            }
            _ => {}
        }
    }
}

impl Persist for FwCfg {
    type State = FwCfgState;

    fn save(&self) -> Result<FwCfgState, PersistError> {
        Ok(self.state.clone())
    }

    fn restore(&mut self, state: &FwCfgState) -> Result<(), PersistError> {
        // Any selector and offset are valid: an unknown selector reads as
        // an empty item, an offset past the end reads zeros.
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn read_item(d: &mut FwCfg, sel: u16, len: usize) -> Vec<u8> {
        d.write(0, &sel.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_features_and_directory_through_the_ports() {
        let mut items = FwCfgItems::new(2);
        items.add_file("etc/a", vec![1, 2, 3]).unwrap();
        items.add_int("etc/sercon-port", 0x3f8, 2).unwrap();
        let mut d = FwCfg::new(items, ram());
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, FW_CFG_ID, 4), vec![3, 0, 0, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 2), vec![2, 0]);
        let dir = read_item(&mut d, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..8], &[0, 0, 0, 3]);
        assert_eq!(&dir[8..10], &[0, 0x20]);
        assert_eq!(&dir[12..17], b"etc/a");
        assert_eq!(dir[17], 0);
        assert_eq!(&dir[68 + 8..68 + 8 + 15], b"etc/sercon-port");
        assert_eq!(read_item(&mut d, 0x21, 3), vec![0xf8, 0x03, 0]);
        let mut sig = [0u8; 8];
        d.read(4, &mut sig[..4]);
        d.read(8, &mut sig[4..]);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn dma_select_read_skip_and_errors() {
        let mut items = FwCfgItems::new(1);
        items.add_file("etc/x", (0..10).collect()).unwrap();
        let mem = ram();
        let mut d = FwCfg::new(items, mem.clone());
        let req = |control: u32, len: u32, addr: u64| {
            let mut r = control.to_be_bytes().to_vec();
            r.extend_from_slice(&len.to_be_bytes());
            r.extend_from_slice(&addr.to_be_bytes());
            mem.write_slice(&r, GuestAddress(0x100)).unwrap();
        };
        let run = |d: &mut FwCfg| {
            d.write(4, &0u32.to_be_bytes());
            d.write(8, &0x100u32.to_be_bytes());
        };
        let control = || {
            let mut c = [0u8; 4];
            mem.read_slice(&mut c, GuestAddress(0x100)).unwrap();
            u32::from_be_bytes(c)
        };
        req((0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 2, 0);
        run(&mut d);
        assert_eq!(control(), 0);
        req(DMA_CTL_READ, 12, 0x200);
        run(&mut d);
        assert_eq!(control(), 0);
        let mut got = [0xffu8; 12];
        mem.read_slice(&mut got, GuestAddress(0x200)).unwrap();
        assert_eq!(got, [2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0]);
        // Writes are refused, and so is a read into memory that is not RAM.
        req(DMA_CTL_WRITE, 1, 0x200);
        run(&mut d);
        assert_eq!(control(), DMA_CTL_ERROR);
        req(DMA_CTL_READ, 4, 0x1_0000_0000);
        run(&mut d);
        assert_eq!(control(), DMA_CTL_ERROR);
        // A request outside RAM is ignored without a panic.
        d.write(4, &1u32.to_be_bytes());
        d.write(8, &0u32.to_be_bytes());
    }

    #[test]
    fn bad_names_are_refused_and_state_round_trips() {
        let mut items = FwCfgItems::new(1);
        assert!(matches!(
            items.add_file(&"n".repeat(56), vec![]),
            Err(FwCfgError::NameTooLong(_))
        ));
        items.add_file("a", vec![]).unwrap();
        assert!(matches!(
            items.add_file("a", vec![]),
            Err(FwCfgError::Duplicate(_))
        ));
        let mut d = FwCfg::new(items, ram());
        read_item(&mut d, FW_CFG_SIGNATURE, 2);
        let s = d.save().unwrap();
        assert_eq!(s.offset, 2);
        let mut e = FwCfg::new(FwCfgItems::new(1), ram());
        e.restore(&s).unwrap();
        let mut b = [0u8; 2];
        e.read(1, &mut b);
        assert_eq!(&b, b"MU");
    }
}
