//! The VM's devices and their wiring: the legacy PC devices on the port
//! bus (COM1, i8042, CMOS RTC, ACPI PM, reset control), PCI bus 0 with its
//! configuration mechanisms, and the virtio functions on it with their MSI-X
//! route into the backend and their queue-notify eventfds.
//!
//! Invariants: every device sits on one bus range, and `DeviceInfo` lists
//! exactly what was inserted (what `vm.info` reports). Every device with
//! state is in one `DeviceList` (legacy devices first, then the PCI
//! configuration latch and the virtio functions in the order the VM's
//! configuration adds them: disks, NICs, rng, console, balloon); saving and
//! restoring walk that list through `devices::Persist`, so a snapshot stores
//! states in that order and a restore, building the devices from the same
//! configuration, matches them by position and kind.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::{Bus, BusDevice, EventSink, VmEvent};
use hypervisor::GuestRam;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::VmSpec;
use crate::snapshot::{DeviceList, DeviceStates};
use crate::vm::lock;
use crate::VmmError;

const COM1_BASE: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// The CMOS RTC's interrupt (periodic, alarm, update-ended).
const RTC_IRQ: u32 = 8;
const I8042_IRQ: u32 = 1;

/// One device range on a bus, as `vm.info` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub name: &'static str,
    /// "pio" or "mmio".
    pub bus: &'static str,
    pub base: u64,
    pub len: u64,
}

#[derive(Clone, Copy)]
enum BusKind {
    Pio,
    Mmio,
}

/// A virtio function on PCI, named for messages.
type VirtioFunction = (String, Arc<Mutex<virtio::VirtioPciDevice>>);

/// The fixed PC devices the VMM itself talks to (the console's input, the
/// power button); all of them are in the `DeviceList` too.
struct LegacyDevices {
    serial: Arc<Mutex<devices::serial::Serial>>,
    acpi_pm: Arc<Mutex<devices::acpi::AcpiPm>>,
}

/// What a snapshot and the VMM need of the PCI side.
struct PciDevices {
    bus: Arc<pci::PciBus>,
    /// Every virtio function, in the order they were added.
    virtio: Vec<VirtioFunction>,
    console_input: Option<virtio::console::ConsoleInput>,
    balloon: Option<virtio::balloon::BalloonHandle>,
    /// Every virtio function's counters, in the order they were added.
    monitored: Vec<crate::counters::MonitoredDevice>,
    /// The disks' and NICs' I/O limiters, by device id and group.
    rate_limits: crate::rate_limits::RateLimits,
    /// Devices whose state lives outside Vireo (vhost-user), which make
    /// the VM impossible to snapshot or migrate.
    unsaveable: Vec<String>,
}

/// Every device of one VM, the two buses they sit on, and what was put where.
pub struct DeviceManager {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    list: Vec<DeviceInfo>,
    legacy: LegacyDevices,
    pci: PciDevices,
    /// Every device with state, in the order snapshots hold them.
    saved: DeviceList,
}

/// Where the devices' output and machine-wide requests go.
pub(crate) struct DeviceOutputs {
    /// COM1's output (a sink when the console is virtio).
    pub serial: Box<dyn Write + Send>,
    /// The virtio console's output, when the console is virtio.
    pub virtio_console: Option<Box<dyn Write + Send>>,
    /// Power-off and reset requests from the guest.
    pub events: EventSink,
}

impl DeviceManager {
    /// Make the devices `spec` asks for, put them on the buses and wire
    /// their interrupts and notifiers into the backend VM `vm`.
    pub(crate) fn new(
        vm: &Arc<dyn hypervisor::Vm>,
        memory: &GuestRam,
        spec: &VmSpec,
        out: DeviceOutputs,
    ) -> Result<Self, VmmError> {
        let mut buses = Buses {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            list: Vec::new(),
        };
        let mut saved = DeviceList::default();
        let legacy = setup_legacy(
            &mut buses,
            &mut saved,
            vm.as_ref(),
            spec.memory,
            out.serial,
            &out.events,
        )?;
        if let Some(x) = &spec.exit_device {
            // Stateless: not on the saved-device list.
            let dev = Arc::new(Mutex::new(devices::debug_exit::DebugExit::new(
                out.events.clone(),
            )));
            buses.add(
                BusKind::Pio,
                "exit-device",
                x.port as u64,
                x.size as u64,
                dev,
            )?;
        }
        if spec.firmware {
            // A restored VM has no kernel to hand over: its firmware ran.
            let (kernel, smbios) = match &spec.boot {
                crate::builder::Boot::Firmware { kernel, smbios, .. } => {
                    (kernel.as_ref(), Some(smbios))
                }
                _ => (None, None),
            };
            // The disks' boot order, when one is given, by the PCI slots
            // they will be put in below.
            let disk_slots: Vec<u8> = if spec.disks.iter().any(|d| d.bootindex.is_some()) {
                crate::firmware::boot_order(&spec.disks)
                    .into_iter()
                    .map(disk_pci_slot)
                    .collect()
            } else {
                Vec::new()
            };
            let items =
                crate::firmware::fw_cfg_items(spec.memory, spec.cpus, kernel, smbios, &disk_slots)?;
            let fw_cfg = Arc::new(Mutex::new(devices::fw_cfg::FwCfg::new(
                items,
                memory.clone(),
            )));
            buses.add(
                BusKind::Pio,
                "fw-cfg",
                devices::fw_cfg::FW_CFG_PORT,
                devices::fw_cfg::FW_CFG_PORT_LEN,
                fw_cfg.clone(),
            )?;
            saved.push("fw-cfg", fw_cfg);
        }
        let pci = setup_pci(
            &mut buses,
            &mut saved,
            vm.clone(),
            memory,
            spec,
            out.virtio_console,
            &out.events,
        )?;
        Ok(DeviceManager {
            pio: buses.pio,
            mmio: buses.mmio,
            list: buses.list,
            legacy,
            pci,
            saved,
        })
    }

    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// What sits where, in the order it was inserted.
    pub fn info(&self) -> &[DeviceInfo] {
        &self.list
    }

    pub fn serial(&self) -> Arc<Mutex<devices::serial::Serial>> {
        self.legacy.serial.clone()
    }

    /// The virtio console's input, when the console is virtio.
    pub fn virtio_console_input(&self) -> Option<virtio::console::ConsoleInput> {
        self.pci.console_input.clone()
    }

    /// The virtio-balloon's host side, if the VM has one.
    pub fn balloon(&self) -> Option<&virtio::balloon::BalloonHandle> {
        self.pci.balloon.as_ref()
    }

    pub fn press_power_button(&self) {
        lock(&self.legacy.acpi_pm).press_power_button();
    }

    /// The disks' and NICs' I/O limiters (the API changes them).
    pub(crate) fn rate_limits(&self) -> &crate::rate_limits::RateLimits {
        &self.pci.rate_limits
    }

    /// Take the devices' counters (once, for the VM's monitor).
    pub(crate) fn take_monitored(&mut self) -> Vec<crate::counters::MonitoredDevice> {
        std::mem::take(&mut self.pci.monitored)
    }

    /// Stop (`true`) or restart the virtio queue workers: stopped, they
    /// touch neither guest memory nor their own state.
    pub fn quiesce(&self, stop: bool) {
        for (_, d) in &self.pci.virtio {
            if stop {
                lock(d).quiesce();
            } else {
                lock(d).resume();
            }
        }
    }

    /// Refuse a snapshot or migration (`what`) up front when a device's
    /// state lives in another process (a vhost-user backend), before the
    /// VM is paused or any byte is written or sent.
    pub fn check_saveable(&self, what: &str) -> Result<(), VmmError> {
        match self.pci.unsaveable.first() {
            None => Ok(()),
            Some(dev) => Err(VmmError::Conflict(format!(
                "cannot {what}: the VM has {dev}, a vhost-user device whose state lives \
                 in its backend (virtiofsd), which Vireo cannot save or move"
            ))),
        }
    }

    /// Let another process on this host open the disks (`false`), or take
    /// them back (`true`).
    pub fn set_disk_locks(&self, held: bool) -> Result<(), VmmError> {
        for (name, d) in &self.pci.virtio {
            lock(d)
                .set_host_locks(held)
                .map_err(|reason| VmmError::DeviceHost {
                    device: name.clone(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// Every device's state (the virtio workers quiesced), walked in the
    /// list's order.
    pub fn save(&self) -> Result<DeviceStates, VmmError> {
        self.saved.save()
    }

    /// Load saved device states into these (new) devices, then let the
    /// bus map what the restored configuration spaces decode and start the
    /// virtio workers.
    pub fn restore(&self, saved: &DeviceStates) -> Result<(), VmmError> {
        self.saved.restore(saved)?;
        self.pci.bus.refresh_routing();
        self.quiesce(false);
        Ok(())
    }
}

/// The buses being filled and what was put on them.
struct Buses {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    list: Vec<DeviceInfo>,
}

impl Buses {
    fn add(
        &mut self,
        kind: BusKind,
        name: &'static str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), VmmError> {
        let (bus, label) = match kind {
            BusKind::Pio => (&self.pio, "pio"),
            BusKind::Mmio => (&self.mmio, "mmio"),
        };
        bus.insert(base, len, dev).map_err(|source| VmmError::Bus {
            device: name,
            bus: label,
            base,
            source,
        })?;
        self.list.push(DeviceInfo {
            name,
            bus: label,
            base,
            len,
        });
        Ok(())
    }
}

/// The PC devices on the port bus, with their ISA interrupt lines; those
/// with state go on `saved`.
fn setup_legacy(
    buses: &mut Buses,
    saved: &mut DeviceList,
    vm: &dyn hypervisor::Vm,
    memory_bytes: u64,
    serial_out: Box<dyn Write + Send>,
    events: &EventSink,
) -> Result<LegacyDevices, VmmError> {
    let mut add = |name: &'static str, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>| {
        buses.add(BusKind::Pio, name, base, len, dev)
    };
    let serial = Arc::new(Mutex::new(devices::serial::Serial::new(
        vm.irq_line(COM1_IRQ)?,
        serial_out,
    )));
    add("serial (COM1)", COM1_BASE, 8, serial.clone())?;
    let i8042 = Arc::new(Mutex::new(devices::i8042::I8042::new(
        events.clone(),
        Some(vm.irq_line(I8042_IRQ)?),
    )));
    add("i8042", 0x60, 5, i8042.clone())?;
    let below_4g = memory_bytes.min(arch::layout::MMIO_HOLE_START);
    let cmos = devices::rtc::CmosMemory {
        below_4g,
        above_4g: memory_bytes - below_4g,
    };
    let rtc = Arc::new(Mutex::new(devices::rtc::CmosRtc::new(Some(cmos))));
    devices::rtc::CmosRtc::connect_irq(&rtc, vm.irq_line(RTC_IRQ)?).map_err(|e| {
        VmmError::Config(format!(
            "cannot start the RTC's interrupt timer thread: {e}"
        ))
    })?;
    add("cmos-rtc", 0x70, 2, rtc.clone())?;
    let sci = vm.irq_line(arch::layout::ACPI_SCI_IRQ as u32)?;
    let acpi_pm = Arc::new(Mutex::new(devices::acpi::AcpiPm::new(
        events.clone(),
        Some(sci),
    )));
    add(
        "acpi-pm",
        arch::layout::ACPI_PM_BASE as u64,
        12,
        acpi_pm.clone(),
    )?;
    let reset = Arc::new(Mutex::new(devices::acpi::ResetControl::new(events.clone())));
    add(
        "reset-control",
        arch::layout::RESET_PORT as u64,
        1,
        reset.clone(),
    )?;
    // Ports Linux pokes with nothing behind them: the POST/delay ports,
    // DMA page registers and the other COM ports.
    let sink: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(devices::sink::Ignored::new()));
    for (base, len) in [(0x80, 0x10), (0xed, 1), (0x2f8, 8), (0x3e8, 8), (0x2e8, 8)] {
        add("ignored", base, len, sink.clone())?;
    }
    // The order is the snapshot format's: devices are restored in it.
    saved.push("serial (COM1)", serial.clone());
    saved.push("i8042", i8042);
    saved.push("cmos-rtc", rtc);
    saved.push("acpi-pm", acpi_pm.clone());
    saved.push("reset-control", reset);
    Ok(LegacyDevices { serial, acpi_pm })
}

/// The PCI slot of the VM's disk `index` (of `VmSpec::disks`): the disks
/// are the first functions on bus 0, after the host bridge in slot 0, so
/// that the firmware's boot order can name them before they are added.
fn disk_pci_slot(index: usize) -> u8 {
    u8::try_from(index + 1).unwrap_or(u8::MAX)
}

/// PCI bus 0 (host bridge, configuration through 0xcf8/0xcfc and ECAM) and
/// the virtio devices the VM asked for, with MSI-X through the backend.
/// `console_out` is the console output when the console is virtio. The
/// configuration latch and the functions go on `saved`, in that order.
fn setup_pci(
    buses: &mut Buses,
    saved: &mut DeviceList,
    vm: Arc<dyn hypervisor::Vm>,
    memory: &GuestRam,
    spec: &VmSpec,
    console_out: Option<Box<dyn Write + Send>>,
    events: &EventSink,
) -> Result<PciDevices, VmmError> {
    use arch::layout::{PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_MMIO32_END, PCI_MMIO32_START};
    // Firmware looks for QEMU's i440FX (its PAM registers, its identity).
    let root = if spec.firmware {
        pci::PciRoot::i440fx()
    } else {
        pci::PciRoot::new()
    };
    let bus = Arc::new(pci::PciBus::with_root(
        buses.mmio.clone(),
        buses.pio.clone(),
        root,
    ));
    let cfg = pci::PciConfigIo::new(bus.clone());
    // 0xcf9 is the reset register: the address port is 0xcf8 alone.
    let address = Arc::new(Mutex::new(cfg.address_port()));
    buses.add(
        BusKind::Pio,
        "pci-config-address",
        pci::CONFIG_ADDRESS_PORT,
        1,
        address,
    )?;
    let data = Arc::new(Mutex::new(cfg.data_port()));
    let (port, len) = (pci::CONFIG_DATA_PORT, pci::CONFIG_DATA_LEN);
    buses.add(BusKind::Pio, "pci-config-data", port, len, data)?;
    let ecam = Arc::new(Mutex::new(pci::PciConfigMmio::new(bus.clone())));
    buses.add(
        BusKind::Mmio,
        "pci-ecam",
        PCI_ECAM_BASE,
        PCI_ECAM_SIZE,
        ecam,
    )?;

    let mut bars = pci::BarAllocator::new(
        pci::AddressWindow::new(PCI_MMIO32_START, PCI_MMIO32_END),
        None,
        pci::AddressWindow::new(pci::IO_WINDOW_START, pci::IO_WINDOW_END),
    );
    let notifiers = queue_notifiers(&bus, vm.clone());
    let msi: pci::MsiSink = Arc::new(move |addr, data| {
        if let Err(e) = vm.signal_msi(addr, data) {
            tracing::warn!("MSI {addr:#x}/{data:#x} not delivered: {e}");
        }
    });
    use crate::counters::{DeviceKind, MonitoredDevice};
    let mut functions: Vec<VirtioFunction> = Vec::new();
    let mut monitored: Vec<MonitoredDevice> = Vec::new();
    let mut rate_limits = crate::rate_limits::RateLimits::default();
    let mut add_virtio =
        |name: String, id: String, kind: DeviceKind, dev: Box<dyn virtio::VirtioDevice>| {
            let dev = virtio::VirtioPciDevice::new(dev, memory.clone(), msi.clone()).map_err(
                |source| VmmError::Virtio {
                    device: name.clone(),
                    source,
                },
            )?;
            let events = dev
                .notify_eventfds()
                .into_iter()
                .map(|(off, e)| e.try_clone().map(|e| (off, e)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| VmmError::DeviceIo {
                    device: name.clone(),
                    source,
                })?;
            monitored.push(MonitoredDevice {
                id,
                transport: dev.counters(),
                kind,
            });
            let dev = Arc::new(Mutex::new(dev));
            let slot = bus
                .add_device(dev.clone(), &mut bars)
                .map_err(|source| VmmError::Pci {
                    device: name.clone(),
                    source,
                })?;
            lock(&notifiers).insert(slot, events);
            tracing::info!("{name} at PCI 00:{slot:02x}.0");
            functions.push((name, dev));
            Ok::<u8, VmmError>(slot)
        };
    for (i, d) in spec.disks.iter().enumerate() {
        let image =
            block::open(&d.path, d.format, d.readonly).map_err(|source| VmmError::Disk {
                path: d.path.clone(),
                source,
            })?;
        let serial = d.serial.clone().unwrap_or_else(|| format!("vireo-disk{i}"));
        let mut blk = virtio::block::Block::new(image, &serial);
        let id = format!("disk{i}");
        let limiter = rate_limits.disk(&id, d)?;
        blk.set_rate_limiter(limiter)
            .map_err(|e| VmmError::Config(format!("{id}: {e}")))?;
        let kind = DeviceKind::Block {
            path: d.path.clone(),
            counters: blk.counters(),
        };
        let name = format!("virtio-blk {}", d.path.display());
        let slot = add_virtio(name.clone(), id, kind, Box::new(blk))?;
        if slot != disk_pci_slot(i) {
            // The firmware's boot order named the slot this disk was to get.
            return Err(VmmError::Pci {
                device: name,
                source: pci::PciError::SlotTaken(disk_pci_slot(i)),
            });
        }
    }
    for (i, n) in spec.nets.iter().enumerate() {
        let mac = n.mac.unwrap_or_else(net::MacAddr::random);
        let (name, host, backend): (String, String, Arc<dyn virtio::net::NetBackend>) =
            match n.backend {
                crate::config::NetBackendKind::Tap => {
                    let tap = net::Tap::open(&n.tap)?;
                    tap.set_up()?;
                    let tap_name = tap.name().to_string();
                    (
                        format!("virtio-net {tap_name} ({mac})"),
                        tap_name,
                        Arc::new(tap),
                    )
                }
                crate::config::NetBackendKind::User => {
                    // A new passt for every VM built, restored ones
                    // included: the old one's connections are gone with
                    // its process.
                    let passt = net::Passt::start(&net::PasstOptions {
                        hostfwd: n.hostfwd.clone(),
                        mtu: n.user_mtu(),
                        ..Default::default()
                    })?;
                    (
                        format!("virtio-net user/passt pid {} ({mac})", passt.pid()),
                        "user".to_string(),
                        Arc::new(passt),
                    )
                }
            };
        let mut dev = virtio::net::Net::new(backend, mac);
        if let Some(on) = n.mrg_rxbuf {
            dev.set_merged_rx(on);
        }
        let id = format!("net{i}");
        let (rx, tx) = rate_limits.net(&id, n)?;
        dev.set_rate_limiters(rx, tx)
            .map_err(|e| VmmError::Config(format!("{id}: {e}")))?;
        let kind = DeviceKind::Net {
            tap: host,
            mac: mac.to_string(),
            counters: dev.counters(),
        };
        add_virtio(name, id, kind, Box::new(dev))?;
    }
    if spec.rng {
        let (id, kind) = ("rng0".into(), DeviceKind::Plain("rng"));
        add_virtio(
            "virtio-rng".into(),
            id,
            kind,
            Box::new(virtio::rng::Rng::new()),
        )?;
    }
    let (mut console_input, mut balloon) = (None, None);
    if let Some(out) = console_out {
        let out = Mutex::new(out);
        let output: virtio::console::ConsoleOutput = Arc::new(move |b: &[u8]| {
            let mut o = lock(&out);
            let _ = o.write_all(b).and_then(|()| o.flush());
        });
        let dev = virtio::console::Console::new(output).map_err(|source| VmmError::DeviceIo {
            device: "virtio-console".into(),
            source,
        })?;
        console_input = Some(dev.input());
        let (id, kind) = ("console0".into(), DeviceKind::Plain("console"));
        add_virtio("virtio-console".into(), id, kind, Box::new(dev))?;
    }
    if let Some(b) = &spec.balloon {
        let dev = virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions {
            deflate_on_oom: b.deflate_on_oom,
            stats: b.stats,
        })
        .map_err(|source| VmmError::DeviceIo {
            device: "virtio-balloon".into(),
            source,
        })?;
        balloon = Some(dev.handle());
        let (id, kind) = ("balloon0".into(), DeviceKind::Plain("balloon"));
        add_virtio("virtio-balloon".into(), id, kind, Box::new(dev))?;
    }
    if let Some(v) = &spec.vsock {
        let name = format!("virtio-vsock cid {}", v.cid);
        let dev =
            virtio::vsock::Vsock::new(v.cid, &v.socket).map_err(|source| VmmError::DeviceIo {
                device: name.clone(),
                source,
            })?;
        let (id, kind) = ("vsock0".into(), DeviceKind::Plain("vsock"));
        add_virtio(
            format!("{name} ({})", v.socket.display()),
            id,
            kind,
            Box::new(dev),
        )?;
    }
    let mut unsaveable = Vec::new();
    for (i, f) in spec.fs.iter().enumerate() {
        let fs_err = |source| VmmError::Fs {
            tag: f.tag.clone(),
            source,
        };
        // A virtiofsd of Vireo's own for a directory, on a private socket;
        // the device keeps it and it goes with the device.
        let daemon = match &f.dir {
            Some(dir) => {
                let bin = virtio::fs::find_virtiofsd(spec.virtiofsd.as_deref()).map_err(fs_err)?;
                Some(virtio::fs::Virtiofsd::start(&bin, dir).map_err(fs_err)?)
            }
            None => None,
        };
        let (socket, what) = match (&daemon, &f.socket) {
            (Some(d), _) => (
                d.socket().to_path_buf(),
                format!("{} through virtiofsd pid {}", d.dir().display(), d.pid()),
            ),
            (None, Some(s)) => (s.clone(), s.display().to_string()),
            (None, None) => {
                return Err(VmmError::Config(format!(
                    "fs tag={}: give socket= or dir=",
                    f.tag
                )))
            }
        };
        let mut dev =
            virtio::fs::VhostUserFs::connect(&f.tag, &socket, memory.clone()).map_err(fs_err)?;
        if let Some(d) = daemon {
            dev = dev.with_daemon(d);
        }
        let name = format!("virtio-fs '{}' ({what})", f.tag);
        unsaveable.push(format!("virtio-fs '{}'", f.tag));
        let (id, kind) = (format!("fs{i}"), DeviceKind::Plain("fs"));
        add_virtio(name, id, kind, Box::new(dev))?;
    }
    let mut pvpanic = None;
    if spec.pvpanic {
        let events = events.clone();
        let sink: pci::pvpanic::PanicSink = Arc::new(move |e| {
            (events)(VmEvent::GuestPanic {
                crash_loaded: e & pci::pvpanic::CRASH_LOADED != 0,
            })
        });
        let dev = Arc::new(Mutex::new(pci::pvpanic::PvPanic::new(sink)));
        let slot = bus
            .add_device(dev.clone(), &mut bars)
            .map_err(|source| VmmError::Pci {
                device: "pvpanic".into(),
                source,
            })?;
        tracing::info!("pvpanic at PCI 00:{slot:02x}.0");
        pvpanic = Some(dev);
    }
    saved.push("pci config-io", Arc::new(Mutex::new(cfg)));
    for (name, d) in &functions {
        saved.push(name.clone(), d.clone());
    }
    if let Some(d) = pvpanic {
        saved.push("pvpanic", d);
    }
    Ok(PciDevices {
        bus,
        virtio: functions,
        console_input,
        balloon,
        monitored,
        rate_limits,
        unsaveable,
    })
}

/// Queue notification eventfds per PCI slot (offsets inside BAR 0), moved
/// along with the BAR: where the backend can (KVM's ioeventfd), a guest's
/// notify write signals the device's worker without a vCPU exit.
type SlotNotifiers = Arc<Mutex<HashMap<u8, Vec<(u64, EventFd)>>>>;

fn queue_notifiers(bus: &pci::PciBus, vm: Arc<dyn hypervisor::Vm>) -> SlotNotifiers {
    let notifiers: SlotNotifiers = Arc::default();
    let n = notifiers.clone();
    bus.set_bar_hook(Arc::new(move |slot, bar, addr, mapped| {
        if bar != virtio::BAR_INDEX {
            return;
        }
        let n = lock(&n);
        let Some(events) = n.get(&slot) else {
            return;
        };
        for (off, e) in events {
            let r = if mapped {
                vm.register_mmio_notify(addr + off, e).map(|_| ())
            } else {
                vm.unregister_mmio_notify(addr + off, e)
            };
            if let Err(e) = r {
                // The write still reaches the device as MMIO: slower, not wrong.
                tracing::warn!("PCI 00:{slot:02x}.0 notify at {:#x}: {e}", addr + off);
            }
        }
    }));
    notifiers
}
