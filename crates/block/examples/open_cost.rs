//! What a fuzz execution of the read-only image targets costs: each seed
//! opened and read from a file written for it in /dev/shm (what the
//! targets did) and from memory (`block::open_in_memory`, what they do),
//! in CPU time per open. Run from the repository root:
//!
//!   cargo run --release -p block --example open_cost [ROUNDS]   (default 2000)

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use block::{open_in_memory, open_with, DiskImage, ImageFormat, MemFile, OpenOptions};

/// A file as the pieces (offset, bytes) it is written from.
type Pieces = Vec<(u64, Vec<u8>)>;

fn cpu() -> Duration {
    // SAFETY: rusage is plain integers, for which zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given, which we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn exercise(d: &mut dyn DiskImage) {
    let mut buf = vec![0u8; d.size().min(1 << 20) as usize];
    d.read_at(&mut buf, 0).unwrap();
}

fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let shm = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm").to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let scratch = shm.join(format!("vireo-open-cost-{}", std::process::id()));
    let mut inputs: Vec<(ImageFormat, Pieces)> = Vec::new();
    for e in std::fs::read_dir(seeds.join("vmdk_open")).unwrap() {
        inputs.push((
            ImageFormat::Vmdk,
            vec![(0, std::fs::read(e.unwrap().path()).unwrap())],
        ));
    }
    for e in std::fs::read_dir(seeds.join("vhdx_open")).unwrap() {
        let input = std::fs::read(e.unwrap().path()).unwrap();
        inputs.push((ImageFormat::Vhdx, block::vhdx::layout_for_fuzzing(&input)));
    }
    for (format, pieces) in &inputs {
        let opts = OpenOptions {
            format: Some(*format),
            read_only: true,
            follow_backing: false,
            detach_backing: true,
        };
        let start = cpu();
        for _ in 0..rounds {
            let _ = std::fs::remove_file(&scratch);
            let f = std::fs::File::create(&scratch).unwrap();
            for (off, bytes) in pieces {
                f.write_all_at(bytes, *off).unwrap();
            }
            drop(f);
            exercise(open_with(&scratch, &opts).unwrap().as_mut());
        }
        let file = (cpu() - start) / rounds;
        let start = cpu();
        for _ in 0..rounds {
            let m = MemFile::sparse(pieces.clone());
            exercise(open_in_memory(m, *format, "seed").unwrap().as_mut());
        }
        let mem = (cpu() - start) / rounds;
        println!(
            "{format}: {:>8.1} us per open from a /dev/shm file, {:>8.1} us from memory",
            file.as_secs_f64() * 1e6,
            mem.as_secs_f64() * 1e6
        );
    }
    let _ = std::fs::remove_file(&scratch);
}
