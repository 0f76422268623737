//! Bus 0: slots, the host bridge, configuration access (0xcf8/0xcfc and
//! ECAM) and BAR routing onto the VMM's MMIO and port buses.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use devices::{Bus, BusDevice, Persist, PersistError};

use crate::config::{PciConfig, PciIds};
use crate::{BarAllocator, PciDevice};

/// Slots on bus 0.
pub const NUM_SLOTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    #[error("no free slot on PCI bus 0")]
    NoFreeSlot,
    #[error("PCI slot {0} is taken or out of range")]
    SlotTaken(u8),
    #[error("no room for a {0:#x}-byte BAR in its window")]
    NoSpace(u64),
}

/// Called as `(slot, bar, address, mapped)` each time a BAR is inserted
/// on (`mapped`) or taken off a bus, e.g. to move KVM ioeventfds along.
pub type BarHook = Arc<dyn Fn(u8, usize, u64, bool) + Send + Sync>;

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(dev: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A poisoned device still has consistent register state; keep serving.
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// A BAR currently inserted on one of the VMM's buses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    slot: u8,
    bar: usize,
    addr: u64,
    io: bool,
}

/// PCI bus 0 with up to 32 single-function devices.
///
/// Shared (`Arc`) between the config-access devices and whoever adds
/// devices. Every config write that touches a BAR or the command register
/// re-inserts that device's decoded BARs on the MMIO/port [`Bus`] at their
/// new addresses, so the VMM's MMIO dispatch sees guest reprogramming.
pub struct PciBus {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
    mappings: Mutex<Vec<Mapping>>,
    bar_hook: RwLock<Option<BarHook>>,
    /// Weak: the buses own the configuration-access devices that own this
    /// bus. Strong references both ways would be a cycle that keeps every
    /// PCI device (and what their `Drop` does: flushing images, stopping
    /// workers and helper daemons) alive past the VM's end.
    mmio: Weak<Bus>,
    pio: Weak<Bus>,
}

impl PciBus {
    /// A bus with the host bridge ([`PciRoot`]) at 00:00.0. `mmio` and `pio`
    /// are the VMM's buses where BARs get inserted.
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>) -> Self {
        Self::with_root(mmio, pio, PciRoot::new())
    }

    /// A bus with `root` as its host bridge at 00:00.0.
    pub fn with_root(mmio: Arc<Bus>, pio: Arc<Bus>, root: PciRoot) -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; NUM_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(root)));
        PciBus {
            slots: RwLock::new(slots),
            mappings: Mutex::new(Vec::new()),
            bar_hook: RwLock::new(None),
            mmio: Arc::downgrade(&mmio),
            pio: Arc::downgrade(&pio),
        }
    }

    /// A bus with its configuration access already on the VMM's buses:
    /// [`PciConfigAddress`] at 0xcf8 (length 1, since 0xcf9 is the reset
    /// register), [`PciConfigData`] at 0xcfc (length 4) and
    /// [`PciConfigMmio`] over ECAM.
    pub fn install(mmio: Arc<Bus>, pio: Arc<Bus>) -> Result<Arc<PciBus>, devices::BusError> {
        let pci = Arc::new(PciBus::new(mmio.clone(), pio.clone()));
        let cio = PciConfigIo::new(pci.clone());
        pio.insert(
            crate::CONFIG_ADDRESS_PORT,
            1,
            Arc::new(Mutex::new(cio.address_port())),
        )?;
        pio.insert(
            crate::CONFIG_DATA_PORT,
            crate::CONFIG_DATA_LEN,
            Arc::new(Mutex::new(cio.data_port())),
        )?;
        mmio.insert(
            crate::ECAM_BASE,
            crate::ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
        )?;
        Ok(pci)
    }

    /// The port bus (`io`) or the MMIO bus, while the VM has them.
    fn bus(&self, io: bool) -> Option<Arc<Bus>> {
        if io {
            self.pio.upgrade()
        } else {
            self.mmio.upgrade()
        }
    }

    /// Be told about every BAR (un)mapping from now on.
    pub fn set_bar_hook(&self, hook: BarHook) {
        *self.bar_hook.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn bar_event(&self, m: &Mapping, mapped: bool) {
        let hook = self
            .bar_hook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = hook {
            h(m.slot, m.bar, m.addr, mapped);
        }
    }

    /// Put `dev` in the first free slot, place its BARs with `alloc` (as
    /// firmware would; decoding stays off until the guest enables it) and
    /// return the slot number.
    pub fn add_device(
        &self,
        dev: SharedPciDevice,
        alloc: &mut BarAllocator,
    ) -> Result<u8, PciError> {
        let slot = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .iter()
                .position(|s| s.is_none())
                .ok_or(PciError::NoFreeSlot)? as u8
        };
        self.add_device_at(slot, dev, alloc)?;
        Ok(slot)
    }

    /// Put `dev` in `slot` (1..=31) and place its BARs.
    pub fn add_device_at(
        &self,
        slot: u8,
        dev: SharedPciDevice,
        alloc: &mut BarAllocator,
    ) -> Result<(), PciError> {
        {
            let mut d = lock(&dev);
            let bars: Vec<_> = d.config().bars().collect();
            for bar in bars {
                let addr = alloc.allocate(bar)?;
                d.config_mut().set_bar_address(bar.index, addr);
            }
        }
        {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            match slots.get_mut(slot as usize) {
                Some(s @ None) => *s = Some(dev),
                _ => return Err(PciError::SlotTaken(slot)),
            }
        }
        self.update_routing(slot);
        Ok(())
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(slot as usize).cloned().flatten()
    }

    fn target(&self, bus: u8, slot: u8, func: u8) -> Option<SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.device(slot)
    }

    /// A configuration read; absent functions read all-ones.
    pub fn config_read(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.target(bus, slot, func) {
            Some(dev) => lock(&dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; writes to absent functions are dropped.
    pub fn config_write(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.target(bus, slot, func) else {
            return;
        };
        lock(&dev).write_config(offset, data);
        if PciConfig::write_affects_routing(offset, data.len()) {
            self.update_routing(slot);
        }
    }

    /// Make the buses match what `slot`'s BARs decode now.
    fn update_routing(&self, slot: u8) {
        let Some(dev) = self.device(slot) else { return };
        let wanted: Vec<Mapping> = {
            let d = lock(&dev);
            let cfg = d.config();
            cfg.bars()
                .filter_map(|b| {
                    cfg.bar_mapping(b.index).map(|addr| Mapping {
                        slot,
                        bar: b.index,
                        addr,
                        io: b.kind.is_io(),
                    })
                })
                .collect()
        };
        let mut maps = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        // Take down what moved or stopped decoding.
        let mut gone = Vec::new();
        maps.retain(|m| {
            if m.slot != slot || wanted.contains(m) {
                return true;
            }
            if let Some(bus) = self.bus(m.io) {
                bus.remove(m.addr);
            }
            gone.push(*m);
            false
        });
        let mut events: Vec<(Mapping, bool)> = gone.into_iter().map(|m| (m, false)).collect();
        for w in wanted {
            if maps.contains(&w) {
                continue;
            }
            let size = lock(&dev).config().bar(w.bar).map_or(0, |b| b.size);
            // The VM is being torn down: nothing to map into.
            let Some(bus) = self.bus(w.io) else {
                break;
            };
            let handler = Arc::new(Mutex::new(BarHandler {
                dev: dev.clone(),
                bar: w.bar,
            }));
            match bus.insert(w.addr, size, handler) {
                Ok(()) => {
                    maps.push(w);
                    events.push((w, true));
                }
                // The guest put a BAR over something else (or over another
                // BAR): it stays unreachable until moved, as on hardware
                // where such decoding is undefined.
                Err(e) => tracing::warn!(slot, bar = w.bar, "PCI BAR not mapped: {e}"),
            }
        }
        // Outside the lock, so a hook may look at the bus again.
        drop(maps);
        for (m, mapped) in events {
            self.bar_event(&m, mapped);
        }
    }

    /// Make the buses match every device's BARs (after restoring their
    /// configuration spaces from a snapshot).
    pub fn refresh_routing(&self) {
        for slot in 0..NUM_SLOTS as u8 {
            self.update_routing(slot);
        }
    }

    /// Where `slot`'s BAR `bar` is inserted on a bus right now (for tests
    /// and for re-registering ioeventfds after the guest moves a BAR).
    pub fn bar_mapping(&self, slot: u8, bar: usize) -> Option<u64> {
        let maps = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        maps.iter()
            .find(|m| m.slot == slot && m.bar == bar)
            .map(|m| m.addr)
    }
}

/// A BAR's range on the MMIO or port bus, forwarding to its device.
struct BarHandler {
    dev: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarHandler {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_bar(self.bar, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_bar(self.bar, offset, data)
    }
}

/// The host bridge at 00:00.0: identity only, no BARs.
pub struct PciRoot {
    config: PciConfig,
}

impl PciRoot {
    pub fn new() -> Self {
        PciRoot {
            config: PciConfig::new(PciIds {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: 0x06_00_00,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

/// The i440FX's PAM registers (0x59..0x5f): shadow-RAM control for
/// 0xc0000-0xfffff.
pub const I440FX_PAM0: usize = 0x59;
pub const I440FX_PAM_LEN: usize = 7;

impl PciRoot {
    /// The host bridge firmware expects: QEMU's i440FX (8086:1237 with
    /// QEMU's subsystem 1af4:1100, which SeaBIOS checks to know it runs on
    /// QEMU's platform). Its PAM registers read back what was written;
    /// Vireo keeps 0xc0000-0xfffff as plain RAM whatever they say (see
    /// docs/firmware.md), so a firmware that unlocks shadow RAM finds it
    /// writable and one that locks it is not stopped from writing.
    pub fn i440fx() -> Self {
        let mut config = PciConfig::new(PciIds {
            vendor: 0x8086,
            device: 0x1237,
            revision: 2,
            class: 0x06_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        config.set_writable(I440FX_PAM0, I440FX_PAM_LEN);
        PciRoot { config }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciRoot {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// Configuration mechanism #1 (ports 0xcf8 and 0xcfc-0xcff). Split into two
/// bus devices because 0xcf9 (inside the 0xcf8 dword) is the reset register.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: Arc<AtomicU32>,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: Arc::new(AtomicU32::new(0)),
        }
    }

    /// CONFIG_ADDRESS as the guest last wrote it (a snapshot may fall
    /// between its write and the data access).
    pub fn address_latch(&self) -> u32 {
        self.address.load(Ordering::SeqCst)
    }

    /// Insert at [`crate::CONFIG_ADDRESS_PORT`], length 1.
    pub fn address_port(&self) -> PciConfigAddress {
        PciConfigAddress {
            address: self.address.clone(),
        }
    }

    /// Insert at [`crate::CONFIG_DATA_PORT`], length 4.
    pub fn data_port(&self) -> PciConfigData {
        PciConfigData {
            bus: self.bus.clone(),
            address: self.address.clone(),
        }
    }
}

/// CONFIG_ADDRESS bits a guest can set: enable, bus, device, function,
/// dword register (bits 1:0 and the reserved 30:24 read as zero).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Configuration mechanism #1's state: CONFIG_ADDRESS as the guest last
/// wrote it (a snapshot may fall between that write and the data access).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ConfigIoState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = ConfigIoState;

    fn save(&self) -> Result<ConfigIoState, PersistError> {
        Ok(ConfigIoState {
            address: self.address_latch(),
        })
    }

    fn restore(&mut self, s: &ConfigIoState) -> Result<(), PersistError> {
        if s.address & !CONFIG_ADDRESS_MASK != 0 {
            return Err(PersistError::invalid(
                "pci config address",
                format!(
                    "CONFIG_ADDRESS {:#010x} has bits set no guest can write",
                    s.address
                ),
            ));
        }
        self.address.store(s.address, Ordering::SeqCst);
        Ok(())
    }
}

/// Port 0xcf8: the 32-bit CONFIG_ADDRESS register.
pub struct PciConfigAddress {
    address: Arc<AtomicU32>,
}

impl BusDevice for PciConfigAddress {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only dword accesses at 0xcf8 reach the register; anything else
        // would go to the ISA bus on a PC and finds nothing there.
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            // Enable, bus, device, function, dword register; bits 1:0 and
            // the reserved 30:24 read as zero.
            self.address
                .store(v & CONFIG_ADDRESS_MASK, Ordering::SeqCst);
        }
    }
}

/// Ports 0xcfc-0xcff: CONFIG_DATA, the dword CONFIG_ADDRESS selects.
pub struct PciConfigData {
    bus: Arc<PciBus>,
    address: Arc<AtomicU32>,
}

impl PciConfigData {
    /// Bus, device, function and byte offset, or None when disabled or the
    /// access runs past the dword.
    fn decode(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, usize)> {
        let a = self.address.load(Ordering::SeqCst);
        if a & 0x8000_0000 == 0 || offset as usize + len > 4 {
            return None;
        }
        let reg = (a & 0xfc) as usize + offset as usize;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigData {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.decode(offset, data.len()) {
            Some((b, d, f, reg)) => self.bus.config_read(b, d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((b, d, f, reg)) = self.decode(offset, data.len()) {
            self.bus.config_write(b, d, f, reg, data)
        }
    }
}

/// ECAM: configuration space of bus/device/function at
/// `base + (bus << 20 | dev << 15 | fn << 12 | reg)`. Insert at
/// [`crate::ECAM_BASE`] with length [`crate::ECAM_SIZE`].
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigMmio { bus }
    }

    fn decode(offset: u64, len: usize) -> Option<(u8, u8, u8, usize)> {
        let reg = (offset & 0xfff) as usize;
        // Accesses must stay inside one function's space (and a sane width).
        if offset >= crate::ECAM_SIZE || len > 8 || reg + len > 0x1000 {
            return None;
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((b, d, f, reg)) => self.bus.config_read(b, d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((b, d, f, reg)) = Self::decode(offset, data.len()) {
            self.bus.config_write(b, d, f, reg, data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BAR0, COMMAND, COMMAND_MEMORY};
    use crate::BarKind;

    #[test]
    fn config_address_latch_round_trips_and_refuses_reserved_bits() {
        let bus = Arc::new(PciBus::new(Arc::new(Bus::new()), Arc::new(Bus::new())));
        let io = PciConfigIo::new(bus.clone());
        io.address_port().write(0, &0x8000_0810u32.to_le_bytes());
        let saved = io.save().unwrap();
        assert_eq!(saved.address, 0x8000_0810);
        let mut other = PciConfigIo::new(bus);
        other.restore(&saved).unwrap();
        assert_eq!(other.address_latch(), 0x8000_0810);
        let err = other
            .restore(&ConfigIoState {
                address: 0x0100_0003,
            })
            .unwrap_err();
        assert!(matches!(err, PersistError::Invalid { .. }), "{err:?}");
        assert_eq!(other.address_latch(), 0x8000_0810);
    }

    /// A device with a 4 KiB memory BAR that remembers writes.
    struct Scratch {
        config: PciConfig,
        mem: Vec<u8>,
    }

    impl Scratch {
        fn new() -> Arc<Mutex<Self>> {
            let mut config = PciConfig::new(PciIds {
                vendor: 0x1af4,
                device: 0x1044,
                revision: 1,
                class: 0xff0000,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            });
            config
                .add_bar(
                    0,
                    0x1000,
                    BarKind::Memory64 {
                        prefetchable: false,
                    },
                )
                .unwrap();
            Arc::new(Mutex::new(Scratch {
                config,
                mem: vec![0; 0x1000],
            }))
        }
    }

    impl PciDevice for Scratch {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.mem.get(o + i).copied().unwrap_or(0xff);
            }
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            for (i, b) in data.iter().enumerate() {
                if let Some(m) = self.mem.get_mut(o + i) {
                    *m = *b;
                }
            }
        }
    }

    struct Rig {
        pci: Arc<PciBus>,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
    }

    fn rig() -> Rig {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let pci = PciBus::install(mmio.clone(), pio.clone()).unwrap();
        // 0xcf9 stays free for the reset register.
        pio.insert(
            0xcf9,
            1,
            Arc::new(Mutex::new(devices::sink::Ignored::new())),
        )
        .unwrap();
        Rig { pci, mmio, pio }
    }

    impl Rig {
        fn cf8_read32(&self, slot: u8, reg: u8) -> u32 {
            let a = 0x8000_0000u32 | (slot as u32) << 11 | reg as u32;
            assert!(self.pio.write(0xcf8, &a.to_le_bytes()));
            let mut d = [0u8; 4];
            assert!(self.pio.read(0xcfc, &mut d));
            u32::from_le_bytes(d)
        }
        fn cf8_write32(&self, slot: u8, reg: u8, v: u32) {
            let a = 0x8000_0000u32 | (slot as u32) << 11 | reg as u32;
            assert!(self.pio.write(0xcf8, &a.to_le_bytes()));
            assert!(self.pio.write(0xcfc, &v.to_le_bytes()));
        }
        fn ecam_read16(&self, slot: u8, reg: u64) -> u16 {
            let mut d = [0u8; 2];
            assert!(self
                .mmio
                .read(crate::ECAM_BASE + ((slot as u64) << 15) + reg, &mut d));
            u16::from_le_bytes(d)
        }
    }

    #[test]
    fn host_bridge_and_empty_slots_via_cf8_and_ecam() {
        let r = rig();
        assert_eq!(r.cf8_read32(0, 0), 0x0d57_8086);
        assert_eq!(r.cf8_read32(0, 8) >> 8, 0x060000);
        assert_eq!(r.cf8_read32(1, 0), 0xffff_ffff);
        assert_eq!(r.ecam_read16(0, 0), 0x8086);
        assert_eq!(r.ecam_read16(3, 0), 0xffff);
        // Function 1 and bus 1 are absent.
        let mut d = [0u8; 4];
        r.mmio.read(crate::ECAM_BASE + (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4]);
        r.mmio.read(crate::ECAM_BASE + (1 << 20), &mut d);
        assert_eq!(d, [0xff; 4]);
        // The address register reads back without its low bits; disabled
        // accesses read all-ones.
        assert!(r.pio.write(0xcf8, &0x8000_0003u32.to_le_bytes()));
        let mut a = [0u8; 4];
        r.pio.read(0xcf8, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
        assert!(r.pio.write(0xcf8, &0u32.to_le_bytes()));
        r.pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte reads of the data port pick the right byte.
        assert!(r.pio.write(0xcf8, &0x8000_0000u32.to_le_bytes()));
        let mut b = [0u8; 1];
        r.pio.read(0xcfd, &mut b);
        assert_eq!(b[0], 0x80);
    }

    #[test]
    fn bars_are_allocated_routed_and_follow_guest_reprogramming() {
        let r = rig();
        let dev = Scratch::new();
        let mut alloc = BarAllocator::default();
        let slot = r.pci.add_device(dev.clone(), &mut alloc).unwrap();
        assert_eq!(slot, 1);
        let bar0 = r.cf8_read32(slot, BAR0 as u8);
        assert_eq!(bar0, crate::MMIO32_WINDOW_START as u32 | 0x4);
        // Not decoding yet.
        assert_eq!(r.pci.bar_mapping(slot, 0), None);
        assert!(!r.mmio.write(crate::MMIO32_WINDOW_START, &[1]));
        // The guest sizes the BAR with decode off, then restores it.
        r.cf8_write32(slot, BAR0 as u8, 0xffff_ffff);
        r.cf8_write32(slot, BAR0 as u8 + 4, 0xffff_ffff);
        assert_eq!(r.cf8_read32(slot, BAR0 as u8), 0xffff_f004);
        assert_eq!(r.cf8_read32(slot, BAR0 as u8 + 4), 0xffff_ffff);
        r.cf8_write32(slot, BAR0 as u8, bar0);
        r.cf8_write32(slot, BAR0 as u8 + 4, 0);
        r.cf8_write32(slot, COMMAND as u8, COMMAND_MEMORY as u32);
        assert_eq!(r.pci.bar_mapping(slot, 0), Some(crate::MMIO32_WINDOW_START));
        assert!(r.mmio.write(crate::MMIO32_WINDOW_START + 0x10, &[0xab]));
        assert_eq!(dev.lock().unwrap().mem[0x10], 0xab);
        // Move it; the old address stops answering, the new one does, and
        // the hook hears about both.
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        r.pci.set_bar_hook(Arc::new(move |s, b, a, m| {
            ev.lock().unwrap().push((s, b, a, m))
        }));
        r.cf8_write32(slot, BAR0 as u8, 0xd000_0000);
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                (slot, 0, crate::MMIO32_WINDOW_START, false),
                (slot, 0, 0xd000_0000, true)
            ]
        );
        assert_eq!(r.pci.bar_mapping(slot, 0), Some(0xd000_0000));
        assert!(!r.mmio.write(crate::MMIO32_WINDOW_START + 0x10, &[1]));
        let mut b = [0u8; 1];
        assert!(r.mmio.read(0xd000_0010, &mut b));
        assert_eq!(b[0], 0xab);
        // A BAR moved over ECAM cannot be mapped and does not disturb it.
        r.cf8_write32(slot, BAR0 as u8, crate::ECAM_BASE as u32);
        assert_eq!(r.pci.bar_mapping(slot, 0), None);
        assert_eq!(r.ecam_read16(0, 0), 0x8086);
        // Decode off unmaps.
        r.cf8_write32(slot, BAR0 as u8, 0xd000_0000);
        assert_eq!(r.pci.bar_mapping(slot, 0), Some(0xd000_0000));
        r.cf8_write32(slot, COMMAND as u8, 0);
        assert_eq!(r.pci.bar_mapping(slot, 0), None);
        assert!(!r.mmio.read(0xd000_0010, &mut b));
    }

    #[test]
    fn slots_fill_up() {
        let r = rig();
        let mut alloc = BarAllocator::default();
        for s in 1..32 {
            assert_eq!(r.pci.add_device(Scratch::new(), &mut alloc), Ok(s));
        }
        assert_eq!(
            r.pci.add_device(Scratch::new(), &mut alloc),
            Err(PciError::NoFreeSlot)
        );
        let r = rig();
        assert_eq!(
            r.pci.add_device_at(0, Scratch::new(), &mut alloc),
            Err(PciError::SlotTaken(0))
        );
        assert_eq!(
            r.pci.add_device_at(40, Scratch::new(), &mut alloc),
            Err(PciError::SlotTaken(40))
        );
    }
}
