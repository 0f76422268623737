//! PCI for Vireo: a bus 0 with a host bridge, configuration access through
//! ports 0xcf8/0xcfc and through ECAM, BAR placement and routing onto the
//! VMM's MMIO and port buses, and a reusable MSI-X table.
//!
//! A device implements [`PciDevice`]: it owns a [`PciConfig`] (the header
//! with write masks, BARs and capabilities) and answers accesses to its
//! BARs. [`PciBus`] holds up to 32 devices (function 0 only) and keeps each
//! device's decoded BARs inserted on the [`devices::Bus`]es at whatever
//! address the guest last programmed, so MMIO exits reach the device without
//! going through a shared window lock.
//!
//! Snapshots: [`PciConfig`], [`MsixTable`] and [`PciConfigIo`] (the
//! CONFIG_ADDRESS latch) implement [`devices::Persist`]. After restoring
//! functions' configuration spaces, call [`PciBus::refresh_routing`] so the
//! BARs they decode are mapped again.
//!
//! Wiring into a VMM (the buses must be `Arc`s shared with the vCPU exit
//! handlers; port 0xcf9 stays with the reset register):
//!
//! ```text
//! let pci = pci::PciBus::install(mmio.clone(), pio.clone())?; // 0xcf8+1, 0xcfc+4, ECAM
//! let vm2 = vm.clone();                                       // Arc<dyn hypervisor::Vm>
//! let msi: pci::MsiSink = Arc::new(move |addr, data| {
//!     if let Err(e) = vm2.signal_msi(addr, data) { tracing::warn!("MSI: {e}") }
//! });
//! let mut alloc = pci::BarAllocator::default();
//! let dev = Arc::new(Mutex::new(virtio::VirtioPciDevice::new(
//!     Box::new(virtio::rng::Rng::new()), memory.clone(), msi.clone())?));
//! let slot = pci.add_device(dev.clone(), &mut alloc)?;
//! ```

pub mod alloc;
pub mod bus;
pub mod config;
pub mod msix;
pub mod pvpanic;

pub use alloc::{AddressWindow, BarAllocator};
pub use bus::{
    ConfigIoState, PciBus, PciConfigAddress, PciConfigData, PciConfigIo, PciConfigMmio, PciError,
    PciRoot,
};
pub use config::{ConfigSpaceState, PciConfig, PciIds};
pub use devices::{Persist, PersistError};
pub use msix::{MsiSink, MsixState, MsixTable};

/// Ports of configuration mechanism #1. The address register is 0xcf8
/// (32-bit accesses only); 0xcf9 belongs to the ACPI reset register, so the
/// VMM inserts [`PciConfigAddress`] at 0xcf8 with length 1 (a 4-byte access
/// starting there still goes to it whole) and [`PciConfigData`] at 0xcfc
/// with length 4.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const CONFIG_DATA_PORT: u64 = 0xcfc;
pub const CONFIG_DATA_LEN: u64 = 4;

/// The ECAM (MMCONFIG) window the MCFG table announces: 256 buses x 32
/// devices x 8 functions x 4 KiB. Insert [`PciConfigMmio`] here.
pub const ECAM_BASE: u64 = arch::layout::PCI_ECAM_BASE;
pub const ECAM_SIZE: u64 = arch::layout::PCI_ECAM_SIZE;

/// Where 32-bit memory BARs go: the DSDT's `_CRS` memory window, the MMIO
/// hole below ECAM.
pub const MMIO32_WINDOW_START: u64 = arch::layout::PCI_MMIO32_START;
pub const MMIO32_WINDOW_END: u64 = arch::layout::PCI_MMIO32_END;
/// I/O-space BARs: inside the DSDT's 0xd00-0xffff I/O window.
pub const IO_WINDOW_START: u64 = 0xc000;
pub const IO_WINDOW_END: u64 = 0x1_0000;

/// What kind of space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32 {
        prefetchable: bool,
    },
    /// Uses two BAR slots (this one and the next).
    Memory64 {
        prefetchable: bool,
    },
}

impl BarKind {
    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Memory64 { .. })
    }
    pub fn is_io(self) -> bool {
        self == BarKind::Io
    }
}

/// A BAR a device declares: which slot, how big, what kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegion {
    pub index: usize,
    pub size: u64,
    pub kind: BarKind,
}

/// A PCI function on bus 0.
///
/// Config accesses get offsets into the 4 KiB space (0xcf8 only reaches the
/// first 256 bytes); BAR accesses get the BAR index and the offset inside
/// it. Access widths are whatever the guest used; devices clamp.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// Devices with capabilities whose writes have side effects (MSI-X
    /// enable/mask) override this, call the default, then react.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
