//! Baseline throughput of the image layer, for comparison with virtio-blk.
//!
//! cargo run --release -p block --example image_bench [-- SIZE_MIB [DIR]]
//!
//! Measures sequential 1 MiB read/write (MiB/s) and 4 KiB random read/write
//! (IOPS) on a raw and a qcow2 (64 KiB clusters) image in a temporary file.
//! Figures include the host page cache; every write phase ends with a flush
//! (fdatasync), which is counted in its time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use block::{open, DiskImage, ImageFormat};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn mib_s(bytes: u64, t: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t
}

fn seq(d: &mut dyn DiskImage, write: bool) -> f64 {
    let size = d.size();
    let mut buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        if write {
            d.write_at(&buf[..n], off).expect("write");
        } else {
            d.read_at(&mut buf[..n], off).expect("read");
        }
        off += n as u64;
    }
    if write {
        d.flush().expect("flush");
    }
    mib_s(size, t.elapsed().as_secs_f64())
}

fn random(d: &mut dyn DiskImage, write: bool, ops: u64) -> f64 {
    let blocks = d.size() / 4096;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0xa5u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        let off = (rng.next() % blocks) * 4096;
        if write {
            d.write_at(&buf, off).expect("write");
        } else {
            d.read_at(&mut buf, off).expect("read");
        }
    }
    if write {
        d.flush().expect("flush");
    }
    ops as f64 / t.elapsed().as_secs_f64()
}

fn run(name: &str, path: &Path, fmt: ImageFormat, ops: u64) {
    let mut d = open(path, Some(fmt), false).expect("open");
    let alloc_iops = random(d.as_mut(), true, ops / 4);
    let sw = seq(d.as_mut(), true);
    let sr = seq(d.as_mut(), false);
    let rr = random(d.as_mut(), false, ops);
    let rw = random(d.as_mut(), true, ops);
    println!(
        "{name:6} seq write {sw:8.1} MiB/s  seq read {sr:8.1} MiB/s  4k rand read {rr:9.0} IOPS  4k rand write {rw:9.0} IOPS  (first-touch 4k rand write {alloc_iops:9.0} IOPS)"
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let dir: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let size = size_mib << 20;
    let raw = dir.join(format!("vireo-bench-{}.raw", std::process::id()));
    let qcow = dir.join(format!("vireo-bench-{}.qcow2", std::process::id()));
    let ops = 20_000;
    println!(
        "image size {size_mib} MiB in {}, {ops} random ops",
        dir.display()
    );

    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .expect("create raw");
    run("raw", &raw, ImageFormat::Raw, ops);
    let _ = std::fs::remove_file(&raw);

    block::qcow2::create(
        &qcow,
        &block::qcow2::CreateOptions {
            size,
            cluster_bits: 16,
            backing: None,
        },
    )
    .expect("create qcow2");
    run("qcow2", &qcow, ImageFormat::Qcow2, ops);
    let _ = std::fs::remove_file(&qcow);
}
