//! Corrupt and hostile qcow2 images must produce errors, never panics,
//! hangs or huge allocations.

mod common;

use std::path::Path;

use block::{open_with, BlockError, ImageFormat, OpenOptions};
use common::*;

const CS: u64 = 65536;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid image built by qemu-img with 1 MiB of data, 64 KiB clusters.
fn good_image(dir: &TempDir, cluster_size: &str) -> Vec<u8> {
    let img = dir.join("good.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster_size}"),
            p(&img),
            "4M",
        ],
    );
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 0 1M", p(&img)],
    );
    let bytes = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    bytes
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only,
        follow_backing: false,
        detach_backing: false,
    }
}

/// Open read-only and read everything; the first error, if any.
fn try_read(path: &Path) -> Result<(), BlockError> {
    let mut d = open_with(path, &opts(true))?;
    let size = d.size().min(8 << 20);
    let mut buf = vec![0u8; size as usize];
    d.read_at(&mut buf, 0)?;
    Ok(())
}

/// Open read-write, write into new and existing clusters, flush.
fn try_write(path: &Path) -> Result<(), BlockError> {
    let mut d = open_with(path, &opts(false))?;
    let size = d.size();
    let buf = vec![0x5au8; 5000];
    for off in [0, size / 2, size.saturating_sub(5000)] {
        if off + 5000 <= size {
            d.write_at(&buf, off)?;
        }
    }
    d.discard(0, size.min(4 * CS))?;
    d.flush()
}

fn expect_err(dir: &TempDir, name: &str, bytes: &[u8], write: bool, needle: &str) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let r = if write {
        try_write(&path)
    } else {
        try_read(&path)
    };
    let err = r.expect_err(name);
    let msg = err.to_string();
    assert!(
        msg.contains(needle),
        "{name}: expected '{needle}' in: {msg}"
    );
    assert!(
        !msg.contains('\n'),
        "{name}: message must be one line: {msg}"
    );
    assert!(
        msg.contains(name),
        "{name}: message must name the file: {msg}"
    );
}

#[test]
fn corruption_matrix() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("corrupt");
    let good = good_image(&dir, "65536");
    let l1_off = be64(&good, 40);
    let rt_off = be64(&good, 48);
    let l2_off = be64(&good, l1_off as usize) & 0x00ff_ffff_ffff_fe00;
    let rb_off = be64(&good, rt_off as usize);
    let len = good.len() as u64;
    assert!(l2_off != 0 && rb_off != 0);
    // Sanity: the unmodified image reads and writes.
    std::fs::write(dir.join("ok.qcow2"), &good).unwrap();
    try_read(&dir.join("ok.qcow2")).unwrap();
    try_write(&dir.join("ok.qcow2")).unwrap();
    assert_check_clean(&dir.join("ok.qcow2"));

    let m = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };

    // Truncations.
    for (i, cut) in [0u64, 3, 10, 71, 100, 4096, l1_off + 4, l2_off + 100]
        .iter()
        .enumerate()
    {
        let name = format!("trunc{i}.qcow2");
        let path = dir.join(&name);
        std::fs::write(&path, &good[..*cut as usize]).unwrap();
        let err = try_read(&path).expect_err(&name);
        assert!(err.to_string().contains(&name), "{err}");
    }
    // Data truncated in the middle of a data cluster: reads as zeros past
    // EOF, and a data cluster wholly past EOF is corruption.
    let last_data = be64(&good, l2_off as usize + 8 * 15) & 0x00ff_ffff_ffff_fe00;
    std::fs::write(
        dir.join("tail.qcow2"),
        &good[..(last_data + CS / 2) as usize],
    )
    .unwrap();
    try_read(&dir.join("tail.qcow2")).unwrap();
    expect_err(
        &dir,
        "taildata.qcow2",
        &good[..last_data as usize],
        false,
        "outside the file",
    );

    expect_err(
        &dir,
        "l1past.qcow2",
        &m(&|b| put64(b, 40, len + CS)),
        false,
        "L1 table",
    );
    expect_err(
        &dir,
        "l1huge.qcow2",
        &m(&|b| put32(b, 36, u32::MAX)),
        false,
        "too large",
    );
    expect_err(
        &dir,
        "l1small.qcow2",
        &m(&|b| put32(b, 36, 0)),
        false,
        "l1_size 0 too small",
    );
    expect_err(
        &dir,
        "l1hdr.qcow2",
        &m(&|b| put64(b, 40, 0)),
        false,
        "overlaps the header",
    );
    expect_err(
        &dir,
        "l1unal.qcow2",
        &m(&|b| put64(b, 40, l1_off + 8)),
        false,
        "not cluster-aligned",
    );
    expect_err(
        &dir,
        "l2out.qcow2",
        &m(&|b| put64(b, l2_off + 8, (1u64 << 40) | (1 << 63))),
        false,
        &format!("corrupt L2 table at offset {l2_off:#x}: entry 1 points to 0x10000000000, outside the file"),
    );
    expect_err(
        &dir,
        "l2unal.qcow2",
        &m(&|b| put64(b, l2_off, (CS + 512) | (1 << 63))),
        false,
        "unaligned",
    );
    expect_err(
        &dir,
        "l2resv.qcow2",
        &m(&|b| put64(b, l2_off, CS | 2)),
        false,
        "reserved bits",
    );
    expect_err(
        &dir,
        "l1out.qcow2",
        &m(&|b| put64(b, l1_off, (len + 8 * CS) | (1 << 63))),
        false,
        "outside the file",
    );
    expect_err(
        &dir,
        "l1resv.qcow2",
        &m(&|b| put64(b, l1_off, l2_off | 4)),
        false,
        "reserved bits",
    );
    expect_err(
        &dir,
        "rthdr.qcow2",
        &m(&|b| put64(b, 48, 0)),
        false,
        "refcount table at offset 0x0: overlaps the header",
    );
    expect_err(
        &dir,
        "rtpast.qcow2",
        &m(&|b| put64(b, 48, len)),
        false,
        "refcount table",
    );
    expect_err(
        &dir,
        "rtzero.qcow2",
        &m(&|b| put32(b, 56, 0)),
        false,
        "no clusters",
    );
    expect_err(
        &dir,
        "rthuge.qcow2",
        &m(&|b| put32(b, 56, u32::MAX)),
        false,
        "too large",
    );
    expect_err(
        &dir,
        "rtl1.qcow2",
        &m(&|b| put64(b, 48, l1_off)),
        false,
        "overlap",
    );
    for bits in [0u32, 8, 22, 255] {
        expect_err(
            &dir,
            &format!("cb{bits}.qcow2"),
            &m(&|b| put32(b, 20, bits)),
            false,
            "cluster_bits",
        );
    }
    expect_err(
        &dir,
        "ver4.qcow2",
        &m(&|b| put32(b, 4, 4)),
        false,
        "version 4",
    );
    expect_err(
        &dir,
        "crypt.qcow2",
        &m(&|b| put32(b, 32, 1)),
        false,
        "qcow2: encryption is not supported",
    );
    expect_err(
        &dir,
        "incompat.qcow2",
        &m(&|b| put64(b, 72, 1 << 10)),
        false,
        "unknown incompatible feature",
    );
    expect_err(
        &dir,
        "rcorder.qcow2",
        &m(&|b| put32(b, 96, 7)),
        false,
        "refcount_order",
    );
    expect_err(
        &dir,
        "hdrlen.qcow2",
        &m(&|b| put32(b, 100, 50)),
        false,
        "header_length",
    );
    expect_err(
        &dir,
        "bigsize.qcow2",
        &m(&|b| put64(b, 24, 1 << 62)),
        false,
        "too large",
    );
    expect_err(
        &dir,
        "bfname.qcow2",
        &m(&|b| {
            put64(b, 8, CS - 10);
            put32(b, 16, 100);
        }),
        false,
        "backing file name",
    );
    expect_err(
        &dir,
        "ext.qcow2",
        &m(&|b| {
            let hl = be32(b, 100) as u64;
            put32(b, hl, 0x1234_5678);
            put32(b, hl + 4, u32::MAX);
        }),
        false,
        "header extension",
    );

    // Feature bits that only forbid writing.
    let dirty = m(&|b| put64(b, 72, 1));
    std::fs::write(dir.join("dirty.qcow2"), &dirty).unwrap();
    try_read(&dir.join("dirty.qcow2")).unwrap();
    expect_err(&dir, "dirty.qcow2", &dirty, true, "dirty bit");
    let corrupt = m(&|b| put64(b, 72, 2));
    std::fs::write(dir.join("corruptbit.qcow2"), &corrupt).unwrap();
    try_read(&dir.join("corruptbit.qcow2")).unwrap();
    expect_err(&dir, "corruptbit.qcow2", &corrupt, true, "marked corrupt");

    // Refcount structures are only used when writing.
    expect_err(
        &dir,
        "rbout.qcow2",
        &m(&|b| put64(b, rt_off, len + 4 * CS)),
        true,
        "refcount block offset",
    );
    // Refcount of an in-use cluster already 0: freeing it must fail, not wrap.
    let zero_rc = m(&|b| {
        let first_data = be64(b, l2_off as usize) & 0x00ff_ffff_ffff_fe00;
        put32(b, rb_off + 2 * (first_data / CS), 0); // also clears its neighbour
    });
    expect_err(
        &dir,
        "rczero.qcow2",
        &zero_rc,
        true,
        "would leave its range",
    );
}

#[test]
fn random_mutations_never_panic() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("mutate");
    for (k, cs) in ["4096", "512"].iter().enumerate() {
        let good = good_image(&dir, cs);
        // Metadata lives in the first few clusters; mutate there mostly.
        let meta_span = good.len().min(8 * cs.parse::<usize>().unwrap()).max(512);
        let mut rng = Rng(0xdead_beef + k as u64);
        let path = dir.join("m.qcow2");
        let mut errors = 0;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                let at = if rng.below(2) == 0 {
                    rng.below(112)
                } else {
                    rng.below(meta_span as u64)
                } as usize;
                match rng.below(3) {
                    0 => b[at] ^= 1 << rng.below(8),
                    1 => b[at] = rng.next() as u8,
                    _ => b[at] = 0xff,
                }
            }
            if rng.below(10) == 0 {
                b.truncate(rng.below(b.len() as u64) as usize);
            }
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, &b).unwrap();
            if try_read(&path).is_err() {
                errors += 1;
            }
            let _ = try_write(&path);
        }
        // The mutations must actually hit something.
        assert!(errors > 150, "only {errors} mutated images failed to read");
    }
}

/// Inputs the fuzzer (crates/block/fuzz) once crashed on, replayed through
/// the same operations as the fuzz target.
#[test]
fn fuzz_regressions() {
    let dir = TempDir::new("fuzzreg");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let path = dir.join("f.qcow2");
        let _ = std::fs::remove_file(&path);
        std::fs::copy(entry.path(), &path).unwrap();
        let _ = try_read(&path);
        let _ = try_write(&path);
        n += 1;
    }
    assert!(n > 0);
}
