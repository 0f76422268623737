//! Raw images and the format-independent entry points.

mod common;

use block::{open, probe_format, BlockError, ImageFormat};
use common::*;

#[test]
fn raw_read_write_discard_zeroes() {
    let dir = TempDir::new("raw");
    let path = dir.join("disk.img");
    let mut init = vec![0u8; 1 << 20];
    Rng(5).fill(&mut init);
    std::fs::write(&path, &init).unwrap();
    assert_eq!(probe_format(&path).unwrap(), ImageFormat::Raw);

    let mut d = open(&path, None, false).unwrap();
    assert_eq!(d.format(), ImageFormat::Raw);
    assert_eq!(d.size(), 1 << 20);
    let mut buf = vec![0u8; 10000];
    d.read_at(&mut buf, 12345).unwrap();
    assert_eq!(&buf[..], &init[12345..22345]);

    d.write_at(&[7u8; 5000], 4000).unwrap();
    d.write_zeroes(65536, 65536 + 100).unwrap();
    d.discard(0, 4096).unwrap(); // advisory: contents unspecified
    d.flush().unwrap();
    let mut b = vec![0u8; 5000];
    d.read_at(&mut b, 4096).unwrap();
    assert!(b[..3904].iter().all(|&x| x == 7));
    let mut z = vec![1u8; 65636];
    d.read_at(&mut z, 65536).unwrap();
    assert!(z.iter().all(|&x| x == 0));

    // Out of range, in every way.
    for (off, len) in [(1u64 << 20, 1usize), ((1 << 20) - 1, 2), (u64::MAX, 1)] {
        let mut b = vec![0u8; len];
        let err = d.read_at(&mut b, off).expect_err("beyond end");
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        assert!(
            err.to_string()
                .starts_with("request beyond the end of the disk"),
            "{err}"
        );
        assert!(d.write_at(&b, off).is_err());
    }
    assert!(d.discard(u64::MAX - 1, 10).is_err());
    drop(d);

    // Read-only handles refuse every modification.
    let mut r = open(&path, Some(ImageFormat::Raw), true).unwrap();
    assert!(r.read_only());
    assert!(matches!(
        r.write_at(&[1], 0),
        Err(BlockError::ReadOnly { .. })
    ));
    assert!(r.write_zeroes(0, 1).is_err());
    assert!(r.discard(0, 4096).is_err());
    r.flush().unwrap();
}

#[test]
fn tiny_and_missing_files() {
    let dir = TempDir::new("tiny");
    let path = dir.join("t.img");
    std::fs::write(&path, b"QF").unwrap();
    // Too short for a magic: raw.
    assert_eq!(probe_format(&path).unwrap(), ImageFormat::Raw);
    let mut d = open(&path, None, true).unwrap();
    assert_eq!(d.size(), 2);
    let mut b = [0u8; 2];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"QF");
    let err = open(&dir.join("nope.img"), None, true)
        .err()
        .expect("missing");
    assert!(err.to_string().contains("nope.img"), "{err}");
    let err = open(&dir.0, None, true).err().expect("directory");
    assert!(
        err.to_string()
            .contains("not a regular file or block device"),
        "{err}"
    );
    // A bare qcow2 magic in a raw-sized file is refused as raw and as qcow2.
    std::fs::write(&path, b"QFI\xfb").unwrap();
    assert!(open(&path, Some(ImageFormat::Raw), true).is_err());
    let err = open(&path, None, true).err().expect("truncated qcow2");
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// `IoBuf`s over pieces of one Vec (standing in for guest memory).
fn iobufs(mem: &mut [u8], pieces: &[(usize, usize)]) -> Vec<block::IoBuf> {
    pieces
        .iter()
        .map(|&(at, len)| {
            assert!(at + len <= mem.len());
            // SAFETY: inside `mem`, which outlives the returned buffers' use.
            unsafe { block::IoBuf::new(mem.as_mut_ptr().add(at), len) }
        })
        .collect()
}

#[test]
fn vectored_reads_and_writes_raw_and_qcow2() {
    let dir = TempDir::new("vectored");
    let raw = dir.join("v.img");
    let mut init = vec![0u8; 1 << 20];
    Rng(9).fill(&mut init);
    std::fs::write(&raw, &init).unwrap();
    let q = dir.join("v.qcow2");
    block::create_qcow2_overlay(&q, &raw).unwrap();
    // Odd sizes and an empty piece, scattered out of order in "memory".
    let pieces = [(5000, 700), (0, 4096), (9000, 0), (4100, 812), (20000, 3)];
    let total: usize = pieces.iter().map(|p| p.1).sum();
    for (path, fmt) in [(&raw, ImageFormat::Raw), (&q, ImageFormat::Qcow2)] {
        let mut d = open(path, Some(fmt), false).unwrap();
        let mut mem = vec![0xeeu8; 32768];
        d.read_vectored(&iobufs(&mut mem, &pieces), 3000).unwrap();
        let mut at = 3000;
        for &(m, len) in &pieces {
            assert_eq!(&mem[m..m + len], &init[at..at + len], "{fmt} read");
            at += len;
        }
        // Write a pattern back through the same pieces, elsewhere.
        let mut src = vec![0u8; 32768];
        Rng(11).fill(&mut src);
        d.write_vectored(&iobufs(&mut src, &pieces), 500_000)
            .unwrap();
        let mut back = vec![0u8; total];
        d.read_at(&mut back, 500_000).unwrap();
        let mut at = 0;
        for &(m, len) in &pieces {
            assert_eq!(&back[at..at + len], &src[m..m + len], "{fmt} write");
            at += len;
        }
        // ... and back through vectored reads (qcow2: now allocated data
        // clusters, read straight into the buffers).
        let mut again = vec![0x33u8; 32768];
        d.read_vectored(&iobufs(&mut again, &pieces), 500_000)
            .unwrap();
        for &(m, len) in &pieces {
            assert_eq!(&again[m..m + len], &src[m..m + len], "{fmt} read back");
        }
        // Zeroed ranges read as zeros (qcow2: zero clusters). Away from
        // offset 3000, which the qcow2 pass reads from the raw backing.
        d.write_zeroes(9 << 16, 1 << 16).unwrap();
        let mut z = vec![0x44u8; 32768];
        d.read_vectored(&iobufs(&mut z, &pieces), 9 << 16).unwrap();
        for &(m, len) in &pieces {
            assert!(z[m..m + len].iter().all(|&b| b == 0), "{fmt} zeroes");
        }
        // Past the end: refused before anything moves.
        let mut mem2 = vec![0x11u8; 8192];
        let err = d
            .read_vectored(
                &iobufs(&mut mem2, &[(0, 4096), (4096, 4096)]),
                (1 << 20) - 4096,
            )
            .expect_err("beyond end");
        assert!(matches!(err, BlockError::OutOfRange { .. }), "{err}");
        assert!(
            mem2.iter().all(|&b| b == 0x11),
            "{fmt}: a refused read wrote"
        );
        assert!(d
            .write_vectored(&iobufs(&mut mem2, &[(0, 8192)]), u64::MAX - 100)
            .is_err());
    }
    // Read-only handles refuse vectored writes too.
    let mut r = open(&raw, Some(ImageFormat::Raw), true).unwrap();
    let mut m = vec![0u8; 512];
    assert!(matches!(
        r.write_vectored(&iobufs(&mut m, &[(0, 512)]), 0),
        Err(BlockError::ReadOnly { .. })
    ));
}
