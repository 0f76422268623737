//! What TLS costs a migration stream: the same pages (4 KiB each, not
//! compressible, written through a 1 MiB buffer as `migration::send`
//! does) sent over loopback TCP plain and inside a mutual-TLS session
//! (certificates made here), with the handshake time and the CPU both
//! processes' threads spent. Run:
//!
//!   cargo run --release -p vmm --example tls_cost [MIB]   (default 512)

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vmm::tls::{Channel, MigrationTls};

fn cpu() -> Duration {
    // SAFETY: rusage is plain integers, for which zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given, which we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn files(dir: &std::path::Path) -> (MigrationTls, MigrationTls) {
    use std::os::unix::fs::PermissionsExt;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let host = |name: &str| {
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &ca, &ca_key).unwrap();
        let (cp, kp) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cp, c.pem()).unwrap();
        std::fs::write(&kp, k.serialize_pem()).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        MigrationTls::load(Some(&cp), Some(&kp), Some(&ca_path))
            .unwrap()
            .unwrap()
    };
    (host("dst"), host("src"))
}

/// Send `mib` MiB of pages; (handshake, transfer) wall times and CPU.
fn run(mib: usize, tls: Option<(&MigrationTls, &MigrationTls)>) -> (Duration, Duration, Duration) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = l.local_addr().unwrap().to_string();
    let server = tls.map(|(d, _)| d.server().unwrap().clone());
    let rx = std::thread::spawn(move || {
        let (s, peer) = l.accept().unwrap();
        let c = match server {
            Some(cfg) => {
                Channel::accept(s, &cfg, &peer.to_string(), Duration::from_secs(30)).unwrap()
            }
            None => Channel::plain(s).unwrap(),
        };
        let mut r = BufReader::with_capacity(1 << 20, c);
        let mut page = vec![0u8; 4096];
        let mut sum = 0u64;
        for _ in 0..mib * 256 {
            r.read_exact(&mut page).unwrap();
            sum = sum.wrapping_add(page[17] as u64);
        }
        sum
    });
    let cpu0 = cpu();
    let start = Instant::now();
    let s = TcpStream::connect(&to).unwrap();
    let c = match tls {
        Some((_, src)) => {
            Channel::connect(s, src.client().unwrap(), &to, Duration::from_secs(30)).unwrap()
        }
        None => Channel::plain(s).unwrap(),
    };
    let handshake = start.elapsed();
    let mut w = BufWriter::with_capacity(1 << 20, c);
    let mut page = vec![0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    for _ in 0..mib * 256 {
        for chunk in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&page).unwrap();
    }
    w.flush().unwrap();
    rx.join().unwrap();
    (handshake, t.elapsed(), cpu() - cpu0)
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    let dir = std::env::temp_dir().join(format!("vireo-tls-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dst, src) = files(&dir);
    println!("{mib} MiB of pages over loopback TCP, best of 3");
    for (name, tls) in [("plain", None), ("mutual TLS", Some((&dst, &src)))] {
        let best = (0..3).map(|_| run(mib, tls)).min_by_key(|r| r.1).unwrap();
        println!(
            "{name:<11} handshake {:>7.2} ms  transfer {:>7.0} ms  {:>7.0} MiB/s  CPU {:>6.0} ms",
            best.0.as_secs_f64() * 1e3,
            best.1.as_secs_f64() * 1e3,
            mib as f64 / best.1.as_secs_f64(),
            best.2.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
