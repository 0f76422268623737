//! Vireo's ACPI tables through ACPICA, the same table code Linux uses:
//! `iasl -d` must disassemble every table without errors or warnings
//! (it checks lengths, checksums and field consistency), and `acpiexec`
//! must load the DSDT and evaluate `\_S5`. Skipped, with a note, when
//! acpica-tools is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use hypervisor::GuestRam;
use vm_memory::{Bytes, GuestAddress};

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("-v").output().is_ok();
    if !found {
        eprintln!("note: {tool} (acpica-tools) not installed, skipping");
    }
    found
}

fn read(m: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn sdt(m: &GuestRam, addr: u64) -> Vec<u8> {
    let len = u32::from_le_bytes(read(m, addr + 4, 4).try_into().unwrap()) as usize;
    read(m, addr, len)
}

/// The FACS address from a FADT: X_FIRMWARE_CTRL, or the 32-bit
/// FIRMWARE_CTRL when that is zero.
fn facs_addr(fadt: &[u8]) -> u64 {
    match u64::from_le_bytes(fadt[132..140].try_into().unwrap()) {
        0 => u32::from_le_bytes(fadt[36..40].try_into().unwrap()) as u64,
        x => x,
    }
}

/// Writes RSDP, XSDT, FACP, APIC, DSDT and FACS from guest memory as
/// `<sig>.dat` files in `dir`.
fn dump_tables(num_cpus: u32, dir: &Path) -> Vec<PathBuf> {
    let m = GuestRam::from_ranges(&arch::ram_regions(64 << 20)).unwrap();
    let rsdp_addr = arch::acpi::create_acpi_tables(&m, num_cpus, &[]).unwrap().0;
    let rsdp = read(&m, rsdp_addr, 36);
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let xsdt = sdt(&m, xsdt_addr);
    let mut tables = vec![
        ("rsdp".to_string(), rsdp),
        ("xsdt".to_string(), xsdt.clone()),
    ];
    for e in xsdt[36..].chunks_exact(8) {
        let t = sdt(&m, u64::from_le_bytes(e.try_into().unwrap()));
        let sig = String::from_utf8_lossy(&t[0..4]).to_lowercase();
        if sig == "facp" {
            let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
            let facs = facs_addr(&t);
            tables.push(("dsdt".into(), sdt(&m, dsdt)));
            tables.push(("facs".into(), read(&m, facs, 64)));
        }
        tables.push((sig, t));
    }
    std::fs::create_dir_all(dir).unwrap();
    tables
        .into_iter()
        .map(|(name, bytes)| {
            let p = dir.join(format!("{name}.dat"));
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-arch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn iasl_disassembles_every_table_cleanly() {
    if !have("iasl") {
        return;
    }
    for n in [1u32, 4, 255] {
        let dir = scratch(&format!("iasl{n}"));
        // iasl 20200925 does not take a bare RSDP file; the unit tests check it.
        for table in dump_tables(n, &dir)
            .into_iter()
            .filter(|p| !p.ends_with("rsdp.dat"))
        {
            let out = Command::new("iasl")
                .current_dir(&dir)
                .arg("-d")
                .arg(&table)
                .output()
                .unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{}: {log}", table.display());
            let dsl = std::fs::read_to_string(table.with_extension("dsl")).unwrap();
            for bad in ["Error", "Warning", "**** ", "Invalid"] {
                assert!(
                    !dsl.contains(bad) && !log.contains(bad),
                    "{}: {bad}\n{log}\n{dsl}",
                    table.display()
                );
            }
            let name = table.file_stem().unwrap().to_str().unwrap().to_string();
            match name.as_str() {
                "facp" => {
                    for want in [
                        "SCI Interrupt : 0009",
                        "SMI Command Port : 00000000",
                        "PM1A Event Block Address : 00000600",
                        "PM1A Control Block Address : 00000604",
                        "PM Timer Block Address : 00000608",
                        "Reset Register Supported (V2) : 1",
                        "Hardware Reduced (V5) : 0",
                        "Value to cause reset : 06",
                        "32-bit PM Timer (V1) : 0",
                    ] {
                        let squeezed: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
                        assert!(squeezed.contains(want), "FADT lacks '{want}':\n{dsl}");
                    }
                }
                "apic" => {
                    assert_eq!(
                        dsl.matches("Subtable Type : 00 [Processor Local APIC]")
                            .count(),
                        n as usize,
                        "{dsl}"
                    );
                    assert!(dsl.contains("PC-AT Compatibility : 1"), "{dsl}");
                    assert_eq!(dsl.matches("[Interrupt Source Override]").count(), 2);
                }
                "mcfg" => {
                    assert!(dsl.contains("Base Address : 00000000E0000000"), "{dsl}");
                    assert!(dsl.contains("End Bus Number : FF"), "{dsl}");
                }
                "dsdt" => {
                    assert!(dsl.contains("Name (_S5, Package (0x04)"), "{dsl}");
                    assert!(dsl.contains("Device (PCI0)"), "{dsl}");
                    assert!(dsl.contains("EisaId (\"PNP0A03\")"), "{dsl}");
                    assert!(dsl.contains("Name (_PRT, Package (0x7C)"), "{dsl}");
                    assert!(
                        dsl.contains("0xC0000000,         // Range Minimum"),
                        "{dsl}"
                    );
                    assert!(
                        dsl.contains("0xDFFFFFFF,         // Range Maximum"),
                        "{dsl}"
                    );
                }
                _ => {}
            }
        }
        if std::env::var_os("VIREO_KEEP_ACPI").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn acpiexec_evaluates_s5() {
    if !have("acpiexec") {
        return;
    }
    let dir = scratch("acpiexec");
    let tables = dump_tables(2, &dir);
    let dsdt = tables.iter().find(|p| p.ends_with("dsdt.dat")).unwrap();
    let out = Command::new("acpiexec")
        .args(["-b", "evaluate \\_S5"])
        .arg(dsdt)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The package's first element is SLP_TYPa = 5.
    assert!(log.contains("[Package] Contains 4 Elements"), "{log}");
    assert!(log.contains("[Integer] = 0000000000000005"), "{log}");
    assert!(!log.contains("AE_"), "{log}");

    // The PCI routing table: 31 slots x 4 pins; slot 1 INTA -> GSI 17.
    let out = Command::new("acpiexec")
        .args(["-b", "evaluate \\_SB.PCI0._PRT"])
        .arg(dsdt)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("[Package] Contains 124 Elements"), "{log}");
    assert!(!log.contains("AE_"), "{log}");
    assert_eq!(arch::acpi::pci_intx_gsi(1, 0), 17);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fadt_firmware_ctrl_points_at_the_facs() {
    // Guests that read only the ACPI 1.0 fields (test kernels' S3 code)
    // find the FACS through the 32-bit FIRMWARE_CTRL.
    let m = GuestRam::from_ranges(&arch::ram_regions(64 << 20)).unwrap();
    let rsdp_addr = arch::acpi::create_acpi_tables(&m, 1, &[]).unwrap().0;
    let rsdp = read(&m, rsdp_addr, 36);
    let xsdt = sdt(&m, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
    let fadt = xsdt[36..]
        .chunks_exact(8)
        .map(|e| sdt(&m, u64::from_le_bytes(e.try_into().unwrap())))
        .find(|t| &t[0..4] == b"FACP")
        .expect("FADT");
    let facs = u32::from_le_bytes(fadt[36..40].try_into().unwrap()) as u64;
    assert_ne!(facs, 0, "FIRMWARE_CTRL");
    assert_eq!(facs % 64, 0, "FACS 64-byte aligned");
    assert_eq!(&read(&m, facs, 4), b"FACS");
    assert_eq!(
        u64::from_le_bytes(fadt[132..140].try_into().unwrap()),
        0,
        "X_FIRMWARE_CTRL is zero when FIRMWARE_CTRL is set"
    );
}
