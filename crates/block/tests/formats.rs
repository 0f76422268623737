//! VMDK and VHDX readers on images qemu-img makes, and on variants of them
//! edited here: a stream-optimized VMDK with its grain directory in a
//! footer (as VMware writes them; qemu-img puts it up front), and the same
//! cut short. Read-only opening as a disk is checked too. (Conversions and
//! corrupt images through `vireo img` are in vireo/tests/img.rs.)

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use block::{open, open_with, BlockError, ImageFormat, OpenOptions};
use common::*;

const MIB: u64 = 1 << 20;

fn source(path: &Path) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut data = vec![0u8; 8 * MIB as usize];
    rng.fill(&mut data[..100_000]);
    rng.fill(&mut data[3 * MIB as usize..3 * MIB as usize + 70_000]);
    rng.fill(&mut data[8 * MIB as usize - 512..]);
    std::fs::write(path, &data).unwrap();
    data
}

fn read_all(path: &Path) -> Result<Vec<u8>, BlockError> {
    let mut d = open(path, None, true)?;
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0)?;
    Ok(v)
}

#[test]
fn vmdk_stream_optimized_with_footer() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("vmdk-footer");
    let src = dir.join("src.raw");
    let data = source(&src);
    let img = dir.join("s.vmdk");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&src),
            p(&img),
        ],
    );
    assert_eq!(read_all(&img).unwrap(), data);

    // Move the header into a footer: header at 0 says GD_AT_END; the file
    // ends with a footer marker, the real header and an end-of-stream marker.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut header = [0u8; 512];
    f.read_exact_at(&mut header, 0).unwrap();
    let len = f.metadata().unwrap().len();
    // qemu ends the stream with an end-of-stream marker; the footer goes
    // before it, sector-aligned.
    let end = len.div_ceil(512) * 512 - 512;
    let mut marker = [0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes()); // footer marker
    f.write_all_at(&marker, end).unwrap();
    f.write_all_at(&header, end + 512).unwrap();
    f.write_all_at(&[0u8; 512], end + 1024).unwrap();
    f.write_all_at(&u64::MAX.to_le_bytes(), 56).unwrap();
    drop(f);
    assert_eq!(
        read_all(&img).unwrap(),
        data,
        "footer variant reads the same"
    );

    // Cut short: the footer is gone.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(end).unwrap();
    drop(f);
    let e = read_all(&img).unwrap_err();
    assert!(matches!(e, BlockError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("footer"), "{e}");
}

#[test]
fn vmdk_and_vhdx_open_read_only_as_disks() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("ro");
    let src = dir.join("src.raw");
    let data = source(&src);
    for (name, fmt, opts) in [
        ("a.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("b.vhdx", "vhdx", "subformat=dynamic"),
    ] {
        let img = dir.join(name);
        run_ok(
            "qemu-img",
            &["convert", "-O", fmt, "-o", opts, p(&src), p(&img)],
        );
        assert_eq!(read_all(&img).unwrap(), data, "{name}");
        let expect: ImageFormat = fmt.parse().unwrap();
        let d = open(&img, None, true).unwrap();
        assert_eq!(d.format(), expect);
        assert!(d.read_only());
        drop(d);
        // Writable opening names the format and what to do.
        let e = match open(&img, None, false) {
            Ok(_) => panic!("{name} opened writable"),
            Err(e) => e,
        };
        assert!(matches!(e, BlockError::ReadOnlyFormat { .. }), "{e}");
        assert!(e.to_string().contains("readonly=on"), "{e}");
        // Pieces that straddle grains/blocks read right.
        let mut d = open_with(
            &img,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; 100_000];
        let off = 3 * MIB - 1000;
        d.read_at(&mut buf, off).unwrap();
        assert_eq!(&buf[..], &data[off as usize..off as usize + 100_000]);
    }
}

#[test]
fn vmdk_descriptor_only_and_delta_links_are_named() {
    let dir = TempDir::new("desc");
    let img = dir.join("flat.vmdk");
    std::fs::write(
        &img,
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"flat-flat.vmdk\" 0\n",
    )
    .unwrap();
    let e = read_all(&img).unwrap_err();
    assert!(matches!(e, BlockError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("monolithicFlat"), "{e}");
}

/// The fuzzers' seeds (crates/block/fuzz/seeds) are valid images, so
/// fuzzing starts from inputs that reach the readers' depths.
#[test]
fn fuzz_seeds_open() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let dir = TempDir::new("seeds");
    let mut opened = 0;
    for entry in std::fs::read_dir(seeds.join("vmdk_open")).unwrap() {
        let path = entry.unwrap().path();
        let mut d = open(&path, Some(ImageFormat::Vmdk), true).unwrap();
        let mut buf = vec![0u8; d.size() as usize];
        d.read_at(&mut buf, 0).unwrap();
        opened += 1;
    }
    for entry in std::fs::read_dir(seeds.join("vhdx_open")).unwrap() {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        let img = dir.join("seed.vhdx");
        let f = std::fs::File::create(&img).unwrap();
        for (off, bytes) in block::vhdx::layout_for_fuzzing(&input) {
            f.write_all_at(&bytes, off).unwrap();
        }
        drop(f);
        let mut d = open(&img, Some(ImageFormat::Vhdx), true).unwrap();
        assert_eq!(d.size(), 4 * MIB);
        let mut buf = vec![0u8; d.size() as usize];
        d.read_at(&mut buf, 0).unwrap();
        std::fs::remove_file(&img).unwrap();
        opened += 1;
    }
    assert_eq!(opened, 3);
}

/// The fuzz targets parse VMDK and VHDX images from memory: the same
/// seeds read the same bytes, block status and details there as from a
/// file, and writes are refused alike.
#[test]
fn images_read_from_memory_as_from_files() {
    use block::{open_in_memory, MemFile};
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let dir = TempDir::new("memory");
    let mut pairs = Vec::new();
    for entry in std::fs::read_dir(seeds.join("vmdk_open")).unwrap() {
        let path = entry.unwrap().path();
        let mem = MemFile::new(std::fs::read(&path).unwrap());
        pairs.push((
            open(&path, Some(ImageFormat::Vmdk), true).unwrap(),
            open_in_memory(mem, ImageFormat::Vmdk, "seed.vmdk").unwrap(),
        ));
    }
    for (i, entry) in std::fs::read_dir(seeds.join("vhdx_open"))
        .unwrap()
        .enumerate()
    {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        let img = dir.join(&format!("seed{i}.vhdx"));
        let f = std::fs::File::create(&img).unwrap();
        for (off, bytes) in block::vhdx::layout_for_fuzzing(&input) {
            f.write_all_at(&bytes, off).unwrap();
        }
        drop(f);
        let mem = MemFile::sparse(block::vhdx::layout_for_fuzzing(&input));
        pairs.push((
            open(&img, Some(ImageFormat::Vhdx), true).unwrap(),
            open_in_memory(mem, ImageFormat::Vhdx, "seed.vhdx").unwrap(),
        ));
    }
    assert_eq!(pairs.len(), 3);
    for (mut f, mut m) in pairs {
        assert_eq!(f.size(), m.size());
        assert_eq!(f.format(), m.format());
        assert_eq!(format!("{:?}", f.details()), format!("{:?}", m.details()));
        let (mut a, mut b) = (vec![1u8; f.size() as usize], vec![2u8; m.size() as usize]);
        f.read_at(&mut a, 0).unwrap();
        m.read_at(&mut b, 0).unwrap();
        assert!(a == b, "{} reads differently from memory", m.format());
        let mut off = 0;
        while off < f.size() {
            let s = f.block_status(off, f.size() - off).unwrap();
            assert_eq!(s, m.block_status(off, m.size() - off).unwrap());
            off += s.1;
        }
        assert!(m.read_only());
        assert!(matches!(
            m.write_at(&[0], 0),
            Err(block::BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            m.discard(0, 512),
            Err(block::BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            m.write_zeroes(0, 512),
            Err(block::BlockError::ReadOnly { .. })
        ));
        m.flush().unwrap();
    }
}
