//! Interoperability with QEMU's own tools: images qemu-img/qemu-io make are
//! read correctly, images Vireo writes pass `qemu-img check` and compare
//! equal to a raw mirror that received the same writes.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use block::{open, BlockError, DiskImage, ImageFormat};
use common::*;

const MIB: u64 = 1 << 20;

fn read_all(img: &mut dyn DiskImage) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).expect("read whole disk");
    v
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(img));
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("error"), "qemu-io: {out}");
}

fn write_pattern(buf: &mut [u8], start: u64, len: u64, byte: u8) {
    buf[start as usize..(start + len) as usize].fill(byte);
}

#[test]
fn reads_qemu_written_images_all_cluster_sizes() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("read");
    for (i, cs) in ["512", "4096", "65536", "2M"].iter().enumerate() {
        for compat in ["1.1", "0.10"] {
            let img = dir.join(&format!("a{i}-{compat}.qcow2"));
            run_ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cs},compat={compat}"),
                    p(&img),
                    "6M",
                ],
            );
            qemu_io(
                &img,
                "qcow2",
                &[
                    "write -P 0xab 0 1M",
                    "write -P 0xcd 1536k 100k",
                    "write -P 0xef 4097k 3k",
                    "write -z 2M 64k",
                ],
            );
            let mut expect = vec![0u8; 6 * MIB as usize];
            write_pattern(&mut expect, 0, MIB, 0xab);
            write_pattern(&mut expect, 1536 * 1024, 100 * 1024, 0xcd);
            write_pattern(&mut expect, 4097 * 1024, 3 * 1024, 0xef);
            let mut d = open(&img, None, true).expect("open");
            assert_eq!(d.format(), ImageFormat::Qcow2);
            assert_eq!(d.size(), 6 * MIB);
            let got = read_all(d.as_mut());
            assert!(
                got == expect,
                "contents differ for cluster size {cs} compat {compat}"
            );
            // Unaligned small reads across cluster boundaries.
            let mut b = [0u8; 700];
            d.read_at(&mut b, MIB - 300).expect("read");
            assert!(b[..300].iter().all(|&x| x == 0xab) && b[300..].iter().all(|&x| x == 0));
            drop(d);
            if compat == "0.10" {
                let err = open(&img, None, false)
                    .err()
                    .expect("v2 must not open writable");
                assert!(err.to_string().contains("version 2"), "{err}");
            }
        }
    }
}

#[test]
fn reads_through_backing_chains() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("chain");
    let base_raw = dir.join("base.raw");
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&base_raw), "2M"],
    );
    qemu_io(&base_raw, "raw", &["write -P 0x11 0 2M"]);
    // qcow2 over raw, 2 MiB of 4 MiB backed.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&base),
            "4M",
        ],
    );
    qemu_io(&base, "qcow2", &["write -P 0x22 512k 64k"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&mid),
            "4M",
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x33 1M 5000", "write -z 1536k 8k"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "6M",
        ],
    );
    qemu_io(&top, "qcow2", &["write -P 0x44 3M 4k"]);

    let mut expect = vec![0u8; 6 * MIB as usize];
    write_pattern(&mut expect, 0, 2 * MIB, 0x11);
    write_pattern(&mut expect, 512 * 1024, 64 * 1024, 0x22);
    write_pattern(&mut expect, MIB, 5000, 0x33);
    write_pattern(&mut expect, 1536 * 1024, 8192, 0);
    write_pattern(&mut expect, 3 * MIB, 4096, 0x44);
    let mut d = open(&top, None, true).expect("open chain");
    assert!(read_all(d.as_mut()) == expect, "chain contents differ");

    // A backing loop ends in an error, not a stack overflow.
    let la = dir.join("loop-a.qcow2");
    let lb = dir.join("loop-b.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&la), "1M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "loop-a.qcow2",
            "-F",
            "qcow2",
            p(&lb),
            "1M",
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "rebase",
            "-q",
            "-u",
            "-b",
            "loop-b.qcow2",
            "-F",
            "qcow2",
            p(&la),
        ],
    );
    let err = open(&la, None, true).err().expect("loop");
    assert!(
        matches!(err, BlockError::BackingChainTooDeep { .. }),
        "{err}"
    );
    assert!(open(&la, None, false).is_err());

    // A missing backing file is reported with its name and directory.
    let lonely = dir.join("lonely.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "../nope/base.qcow2",
            "-F",
            "qcow2",
            p(&lonely),
            "1M",
        ],
    );
    let err = open(&lonely, None, true).err().expect("missing backing");
    assert!(matches!(err, BlockError::BackingNotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("backing file ../nope/base.qcow2 not found"),
        "{err}"
    );
}

/// Random writes, zeroes and discards applied to a qcow2 image (through
/// Vireo) and to a raw mirror (plain file writes); QEMU must find the qcow2
/// consistent, leak-free, and equal to the mirror.
fn random_io(dir: &TempDir, img: &Path, mirror: &Path, seed: u64, ops: usize) {
    random_io_unchecked(dir, img, mirror, seed, ops);
    assert_check_clean(img);
    assert_same(img, "qcow2", mirror, "raw");
}

fn random_io_unchecked(dir: &TempDir, img: &Path, mirror: &Path, seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let mut d = open(img, Some(ImageFormat::Qcow2), false).expect("open rw");
    let size = d.size();
    let m = OpenOptions::new()
        .write(true)
        .read(true)
        .open(mirror)
        .expect("mirror");
    let cs = {
        // -U: the image is open here, and Vireo's lock (like QEMU's)
        // admits only readers that say they accept a writer.
        let info = run_ok("qemu-img", &["info", "-U", "--output=json", p(img)]);
        let i = info.find("\"cluster-size\": ").expect("cluster-size") + 16;
        info[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let _ = dir;
    for n in 0..ops {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 => cs * (1 + rng.below(3)),
            2 => 1 + rng.below(3 * cs),
            _ => 512 * (1 + rng.below(16)),
        }
        .min(size);
        let off = if rng.below(3) == 0 {
            rng.below(size / cs) * cs
        } else {
            rng.below(size - len + 1)
        };
        let off = off.min(size - len);
        match kind {
            0 => {
                d.write_zeroes(off, len).expect("write_zeroes");
                m.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            1 => {
                d.discard(off, len).expect("discard");
                // Whole clusters inside the range read as zeros afterwards;
                // partial ones are untouched.
                let first = off.div_ceil(cs) * cs;
                let last = (off + len) / cs * cs;
                if first < last {
                    m.write_all_at(&vec![0u8; (last - first) as usize], first)
                        .unwrap();
                }
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                d.write_at(&buf, off).expect("write");
                m.write_all_at(&buf, off).unwrap();
            }
        }
        if n % 37 == 0 {
            d.flush().expect("flush");
        }
        if n % 11 == 0 {
            // Read back a random range through Vireo and check it.
            let len = 1 + rng.below(2 * cs);
            let off = rng.below(size - len.min(size) + 1);
            let len = len.min(size - off);
            let mut a = vec![0u8; len as usize];
            let mut b = vec![0u8; len as usize];
            d.read_at(&mut a, off).unwrap();
            m.read_exact_at(&mut b, off).unwrap();
            assert!(a == b, "readback mismatch at {off} len {len}");
        }
    }
    d.flush().expect("flush");
    drop(d);
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read file")
}

#[test]
fn vireo_writes_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    for (i, cs) in ["512", "4096", "65536", "2M"].iter().enumerate() {
        let dir = TempDir::new("rw");
        let img = dir.join("d.qcow2");
        let mirror = dir.join("d.raw");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                p(&img),
                "8M",
            ],
        );
        // Some pre-existing data written by QEMU.
        qemu_io(
            &img,
            "qcow2",
            &["write -P 0x5a 100k 300k", "write -z 2M 1M"],
        );
        run_ok(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&mirror)],
        );
        random_io(&dir, &img, &mirror, 0x1234_5678 + i as u64, 400);
    }
}

#[test]
fn vireo_writes_over_backing_file() {
    if !have_qemu() {
        return;
    }
    for (i, cs) in ["4096", "65536"].iter().enumerate() {
        let dir = TempDir::new("rwb");
        let base = dir.join("base.qcow2");
        let img = dir.join("top.qcow2");
        let mirror = dir.join("top.raw");
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "6M"]);
        qemu_io(
            &base,
            "qcow2",
            &["write -P 0x77 0 3M", "write -P 0x78 5M 1M"],
        );
        // The overlay is larger than its backing file: the tail reads as zeros.
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                p(&img),
                "8M",
            ],
        );
        run_ok(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&mirror)],
        );
        let before = file_bytes(&base);
        random_io(&dir, &img, &mirror, 0xfeed + i as u64, 300);
        assert!(file_bytes(&base) == before, "backing file was modified");
        assert_check_clean(&base);
    }
}

#[test]
fn vireo_created_overlay_with_relative_backing() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("overlay");
    std::fs::create_dir_all(dir.join("base")).unwrap();
    std::fs::create_dir_all(dir.join("vms")).unwrap();
    let base = dir.join("base/disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "5M"]);
    qemu_io(&base, "qcow2", &["write -P 0x99 0 5M"]);
    let ovl = dir.join("vms/clone.qcow2");
    block::create_qcow2_overlay(&ovl, Path::new("../base/disk.qcow2")).expect("create overlay");
    let info = run_ok("qemu-img", &["info", p(&ovl)]);
    assert!(info.contains("backing file: ../base/disk.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    assert_check_clean(&ovl);
    // Refuses to overwrite.
    assert!(block::create_qcow2_overlay(&ovl, Path::new("../base/disk.qcow2")).is_err());
    let mirror = dir.join("clone.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&ovl), p(&mirror)],
    );
    let before = file_bytes(&base);
    random_io(&dir, &ovl, &mirror, 42, 200);
    assert!(file_bytes(&base) == before, "backing file was modified");

    // Discard over a backing file reads back as zeros (v3 zero clusters).
    let mut d = open(&ovl, None, false).unwrap();
    d.discard(0, 256 * 1024).unwrap();
    let mut b = vec![1u8; 256 * 1024];
    d.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(d);
    assert_check_clean(&ovl);

    let err =
        block::create_qcow2_overlay(&dir.join("vms/x.qcow2"), Path::new("../base/none.qcow2"))
            .expect_err("missing backing");
    assert!(
        err.to_string()
            .contains("backing file ../base/none.qcow2 not found"),
        "{err}"
    );
}

#[test]
fn refcount_table_grows_and_other_refcount_widths() {
    if !have_qemu() {
        return;
    }
    // Vireo-created 512-byte-cluster image: a one-cluster refcount table
    // covers 8 MiB of file, so 12 MiB of data forces the table to grow.
    let dir = TempDir::new("grow");
    let img = dir.join("g.qcow2");
    block::qcow2::create(
        &img,
        &block::qcow2::CreateOptions {
            size: 16 * MIB,
            cluster_bits: 9,
            backing: None,
        },
    )
    .unwrap();
    assert_check_clean(&img);
    {
        let mut d = open(&img, None, false).unwrap();
        let mut rng = Rng(7);
        let mut buf = vec![0u8; 12 * MIB as usize];
        rng.fill(&mut buf);
        for (i, chunk) in buf.chunks(1 << 16).enumerate() {
            d.write_at(chunk, (i as u64) << 16).unwrap();
        }
        d.flush().unwrap();
        let mut back = vec![0u8; buf.len()];
        d.read_at(&mut back, 0).unwrap();
        assert!(back == buf);
    }
    assert_check_clean(&img);
    // The refcount table really moved and grew.
    let f = std::fs::File::open(&img).unwrap();
    let len = f.metadata().unwrap().len();
    let h = block::qcow2::parse_header(&f, &img, len).unwrap();
    assert!(
        h.refcount_table_clusters > 1 && h.refcount_table_offset >= 8 * MIB,
        "{h:?}"
    );
    let info = run_ok("qemu-img", &["check", "--output=json", p(&img)]);
    assert!(info.contains("\"check-errors\": 0"), "{info}");

    for bits in ["1", "2", "4", "8", "32", "64"] {
        let dir = TempDir::new("rcw");
        let img = dir.join("r.qcow2");
        let mirror = dir.join("r.raw");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("refcount_bits={bits},cluster_size=4096"),
                p(&img),
                "4M",
            ],
        );
        run_ok("qemu-img", &["create", "-q", "-f", "raw", p(&mirror), "4M"]);
        random_io(&dir, &img, &mirror, 99, 150);
    }
}

#[test]
fn snapshots_compressed_and_features() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("feat");
    // Internal snapshot: readable, not writable.
    let snap = dir.join("snap.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&snap), "1M"]);
    qemu_io(&snap, "qcow2", &["write -P 0x01 0 64k"]);
    run_ok("qemu-img", &["snapshot", "-c", "s1", p(&snap)]);
    qemu_io(&snap, "qcow2", &["write -P 0x02 0 4k"]);
    let err = open(&snap, None, false)
        .err()
        .expect("snapshot image writable");
    assert_eq!(
        err.to_string(),
        format!(
            "qcow2: image has internal snapshots; Vireo refuses to write to it (image {})",
            snap.display()
        )
    );
    let mut d = open(&snap, None, true).unwrap();
    let mut b = vec![0u8; 8192];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 2) && b[4096..].iter().all(|&x| x == 1));
    drop(d);

    // Compressed clusters: refused on access with a clear message.
    let src = dir.join("src.qcow2");
    let comp = dir.join("comp.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "1M"]);
    qemu_io(&src, "qcow2", &["write -P 0x03 0 128k"]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            p(&src),
            p(&comp),
        ],
    );
    let mut d = open(&comp, None, true).unwrap();
    let err = d.read_at(&mut b, 0).expect_err("compressed read");
    assert!(
        err.to_string()
            .starts_with("qcow2: compressed clusters are not supported (image "),
        "{err}"
    );
    // Unallocated parts still read.
    d.read_at(&mut b, 512 * 1024).unwrap();
    drop(d);

    // Encryption, extended L2, external data file.
    // (crypt_method patched in: creating a LUKS image needs a PBKDF
    // benchmark that fails on a loaded machine.)
    let enc = dir.join("enc.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&enc), "1M"]);
    {
        let f = OpenOptions::new().write(true).open(&enc).unwrap();
        f.write_all_at(&2u32.to_be_bytes(), 32).unwrap();
    }
    let err = open(&enc, None, true).err().expect("encrypted");
    assert!(
        err.to_string().contains("encryption is not supported"),
        "{err}"
    );
    let ext = dir.join("ext.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            p(&ext),
            "1M",
        ],
    );
    let err = open(&ext, None, true).err().expect("extended l2");
    assert!(err.to_string().contains("extended L2"), "{err}");
    let df = dir.join("df.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&dir.join("df.data"))),
            p(&df),
            "1M",
        ],
    );
    let err = open(&df, None, true).err().expect("data file");
    assert!(err.to_string().contains("external data file"), "{err}");

    // Two writers (or a writer and a reader) of one image are refused.
    let a = open(&src, None, false).unwrap();
    let err = open(&src, None, true).err().expect("locked");
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    drop(a);
    let r1 = open(&src, None, true).unwrap();
    let _r2 = open(&src, None, true).expect("shared readers");
    assert!(open(&src, None, false).is_err());
    drop((r1, _r2));

    // Format mismatch both ways.
    let err = open(&src, Some(ImageFormat::Raw), true)
        .err()
        .expect("qcow2 as raw");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is a qcow2 image but format=raw was given",
            src.display()
        )
    );
    let raw = dir.join("r.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert!(open(&raw, Some(ImageFormat::Qcow2), true).is_err());
    assert_eq!(block::probe_format(&raw).unwrap(), ImageFormat::Raw);
    assert_eq!(block::probe_format(&src).unwrap(), ImageFormat::Qcow2);
}

/// A process that dies without flushing leaves at worst leaked clusters:
/// metadata written early (cache evictions) never points at clusters whose
/// refcounts or contents are not on disk yet.
#[test]
fn unflushed_state_is_consistent() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("crash");
    let img = dir.join("c.qcow2");
    // 4 KiB clusters: each L2 table maps 2 MiB and the L2 cache holds 1024
    // tables, so writes scattered over 4 GiB keep evicting dirty tables
    // (while the refcount blocks, 256 of 8 MiB each, all stay cached).
    const SIZE: u64 = 4 << 30;
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&img),
            "4G",
        ],
    );
    let mut d = open(&img, None, false).unwrap();
    // Give every L2 table an on-disk presence first, so that later
    // evictions rewrite tables the L1 already points at.
    for off in (0..SIZE).step_by(2 << 20) {
        d.write_at(&[1], off).unwrap();
    }
    d.flush().unwrap();
    let mut rng = Rng(3);
    let buf = vec![0xc3u8; 3000];
    for _ in 0..3000 {
        let off = rng.below(SIZE - 3000);
        d.write_at(&buf, off).unwrap();
    }
    // Simulate a crash: no flush, no destructor.
    std::mem::forget(d);
    // -U: the forgotten image still holds its locks, as a crashed process's
    // would not; the check only reads.
    let out = run("qemu-img", &["check", "-U", p(&img)]);
    let code = out.status.code();
    // 0 = clean, 3 = leaked clusters only; 2 would be corruption.
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check after simulated crash: {:?} {}{}",
        code,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clusters shared with something else (refcount 2, COPIED flag clear) are
/// copied on write, L2 tables and data alike. Built by taking an internal
/// snapshot and then hiding the snapshot table from the header, so the
/// refcounts stay at 2 while only the active L1 refers to the clusters.
#[test]
fn copy_on_write_of_shared_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("cow");
    let img = dir.join("s.qcow2");
    let mirror = dir.join("s.raw");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&img),
            "2M",
        ],
    );
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 1536k 64k"],
    );
    run_ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&mirror)],
    );
    run_ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    {
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&0u32.to_be_bytes(), 60).unwrap(); // nb_snapshots
        f.write_all_at(&0u64.to_be_bytes(), 64).unwrap(); // snapshots_offset
    }
    // The active L1 entry really is marked shared (no COPIED flag).
    let bytes = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l1e0 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap());
    assert!(l1e0 != 0 && l1e0 >> 63 == 0, "{l1e0:#x}");
    random_io_unchecked(&dir, &img, &mirror, 0xc0, 300);
    // Clusters not rewritten keep refcount 2 with one reference: leaks,
    // never errors.
    let out = run("qemu-img", &["check", p(&img)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("ERROR"), "{text}");
    assert!(matches!(out.status.code(), Some(0) | Some(3)), "{text}");
    run("qemu-img", &["check", "-q", "-r", "leaks", p(&img)]);
    assert_check_clean(&img);
    assert_same(&img, "qcow2", &mirror, "raw");
}

/// qemu-io's answer to one write on `img` (format `fmt`), and whether it
/// was refused for a lock.
fn qemu_io_write_refused(img: &Path, fmt: &str) -> (bool, String) {
    let out = run("qemu-io", &["-f", fmt, "-c", "write 0 512", p(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("lock"), text)
}

/// Vireo and QEMU see each other's locks: an image Vireo has open (for
/// writing, or read-only as a backing file is) cannot be written by
/// qemu-io, and an image qemu-io holds open cannot be opened by Vireo. The
/// same open-file-description byte locks QEMU takes (bytes 100+ for the
/// permissions held, 200+ for those not shared).
#[test]
fn vireo_and_qemu_refuse_each_others_images() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("qemulock");
    for fmt in ["raw", "qcow2"] {
        let img = dir.join(&format!("disk.{fmt}"));
        run_ok("qemu-img", &["create", "-q", "-f", fmt, p(&img), "4M"]);
        // Free: qemu-io writes.
        let (refused, text) = qemu_io_write_refused(&img, fmt);
        assert!(!refused, "{fmt}: qemu-io refused a free image: {text}");

        let held = open(&img, None, false).unwrap();
        let (refused, text) = qemu_io_write_refused(&img, fmt);
        assert!(
            refused,
            "{fmt}: qemu-io wrote an image Vireo writes: {text}"
        );
        drop(held);
        let held = open(&img, None, true).unwrap();
        let (refused, text) = qemu_io_write_refused(&img, fmt);
        assert!(refused, "{fmt}: qemu-io wrote an image Vireo reads: {text}");
        drop(held);
        let (refused, text) = qemu_io_write_refused(&img, fmt);
        assert!(!refused, "{fmt}: the lock outlived the image: {text}");

        // qemu-io holds the image open (waiting at its prompt).
        let mut qemu = std::process::Command::new("qemu-io")
            .args(["-f", fmt, p(&img)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let mut refused = false;
        while start.elapsed() < std::time::Duration::from_secs(10) {
            match open(&img, None, false) {
                Err(BlockError::Locked { .. }) => {
                    refused = true;
                    break;
                }
                Ok(d) => drop(d),
                Err(e) => panic!("{fmt}: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(refused, "{fmt}: Vireo opened an image qemu-io holds");
        assert!(
            matches!(open(&img, None, true), Err(BlockError::Locked { .. })),
            "{fmt}: Vireo read an image qemu-io writes"
        );
        drop(qemu.stdin.take());
        let _ = qemu.wait();
        drop(open(&img, None, false).expect("free again once qemu-io quit"));
    }
}
