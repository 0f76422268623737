//! `vireo img` against qemu-img, both ways: images one tool converts, the
//! other checks and compares (raw, qcow2, VMDK monolithic sparse and
//! stream-optimized, VHDX inputs); overlays (commit, rebase, resize); P2V
//! from a loop device holding an ext4 filesystem (root only); and bad
//! input: corrupt VMDK/VHDX and a convert onto an existing file give one
//! clear error and write nothing over.
//!
//! Needs qemu-utils (qemu-img, qemu-io); without it each test prints
//! SKIPPED and passes (scripts/install-deps.sh installs it for CI).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::vireo;

const MIB: u64 = 1 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!("vireo-img-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu_img() -> bool {
    let ok = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let have = ok("qemu-img") && ok("qemu-io");
    if !have {
        eprintln!("SKIPPED: qemu-img/qemu-io (package qemu-utils) not installed");
    }
    have
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_ok(bin: &str, args: &[&str]) -> String {
    let o = Command::new(bin).args(args).output().expect("spawn");
    assert!(o.status.success(), "{bin} {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn img(args: &[&str]) -> Output {
    vireo().arg("img").args(args).output().expect("vireo runs")
}

fn img_ok(args: &[&str]) -> String {
    let o = img(args);
    assert!(
        o.status.success(),
        "vireo img {args:?} failed: {}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `vireo img` fails with exit 1 and one line on stderr naming `needles`.
fn img_fails(args: &[&str], needles: &[&str]) {
    let o = img(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "vireo img {args:?}: {}", text(&o));
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected '{n}' in: {}", lines[0]);
    }
}

fn qemu_check_clean(image: &Path) {
    let out = run_ok("qemu-img", &["check", p(image)]);
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

fn qemu_same(a: &Path, b: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", p(a), p(b)])
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img compare {a:?} {b:?}: {}",
        text(&o)
    );
}

fn vireo_same(a: &Path, b: &Path) {
    let out = img_ok(&["compare", p(a), p(b)]);
    assert!(out.contains("Images are identical"), "{out}");
}

/// A 32 MiB raw disk: data at the start (grain/cluster 0), scattered
/// random runs, a long zero stretch and data at the very end.
fn make_source(path: &Path) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(32 * MIB).expect("size");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    f.write_all_at(&bytes(300_000), 0).unwrap();
    for (i, off) in [3 * MIB + 4097, 7 * MIB, 9 * MIB + 100, 12 * MIB - 10]
        .iter()
        .enumerate()
    {
        f.write_all_at(&bytes(20_000 + i * 30_000), *off).unwrap();
    }
    f.write_all_at(&[0x5a; 4096], 32 * MIB - 4096).unwrap();
}

fn info_json(image: &Path) -> serde_json::Value {
    let out = img_ok(&["info", "--output", "json", p(image)]);
    serde_json::from_str(&out).expect("info JSON")
}

#[test]
fn imports_qemu_made_images_of_every_format() {
    if !have_qemu_img() {
        return;
    }
    let d = TempDir::new("import");
    let src = d.join("src.raw");
    make_source(&src);
    let inputs: [(&str, &str, &[&str]); 5] = [
        ("in.raw", "raw", &[]),
        ("in.qcow2", "qcow2", &[]),
        ("sparse.vmdk", "vmdk", &["-o", "subformat=monolithicSparse"]),
        ("stream.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        ("in.vhdx", "vhdx", &[]),
    ];
    for (name, fmt, opts) in inputs {
        let input = d.join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend([p(&src), p(&input)]);
        run_ok("qemu-img", &args);

        // Vireo reads what qemu-img wrote: info, check, compare.
        let info = info_json(&input);
        assert_eq!(info["format"], fmt, "{name}: {info}");
        assert_eq!(info["virtual-size"], 32 * MIB, "{name}: {info}");
        let check = img(&["check", p(&input)]);
        assert!(check.status.success(), "{name}: {}", text(&check));
        vireo_same(&src, &input);

        // Vireo converts; qemu-img checks and compares.
        for out_fmt in ["qcow2", "raw"] {
            let out = d.join(&format!("{name}.out.{out_fmt}"));
            img_ok(&["convert", "-q", "-O", out_fmt, p(&input), p(&out)]);
            if out_fmt == "qcow2" {
                qemu_check_clean(&out);
                // Zero regions were skipped: well under the virtual size.
                let alloc = info_json(&out)["allocated-size"].as_u64().unwrap();
                assert!(alloc < 8 * MIB, "{name}: {alloc} bytes allocated");
            }
            qemu_same(&src, &out);
            qemu_same(&input, &out);
        }
    }
    // The text form names what matters.
    let t = img_ok(&["info", p(&d.join("stream.vmdk"))]);
    assert!(t.contains("file format: vmdk"), "{t}");
    assert!(t.contains("streamOptimized"), "{t}");
    assert!(t.contains("33554432 bytes"), "{t}");
}

#[test]
fn vireo_made_images_pass_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let d = TempDir::new("export");
    let src = d.join("src.raw");
    make_source(&src);
    // Vireo converts raw -> qcow2 (two cluster sizes) -> raw.
    let q = d.join("v.qcow2");
    img_ok(&["convert", "-q", "-O", "qcow2", p(&src), p(&q)]);
    let q4k = d.join("v4k.qcow2");
    img_ok(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&src),
        p(&q4k),
    ]);
    let r = d.join("v.raw");
    img_ok(&["convert", "-q", "-O", "raw", p(&q), p(&r)]);
    for i in [&q, &q4k] {
        qemu_check_clean(i);
        qemu_same(&src, i);
    }
    qemu_same(&src, &r);
    // qemu-img converts Vireo's images to every format; Vireo compares
    // and checks the results.
    for (fmt, opts) in [
        ("qcow2", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vhdx", ""),
    ] {
        let out = d.join(&format!("q.{fmt}"));
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&q4k), p(&out)]);
        run_ok("qemu-img", &args);
        vireo_same(&q, &out);
        let c = img(&["check", p(&out)]);
        assert_eq!(c.status.code(), Some(0), "{}", text(&c));
    }
    // Vireo's create: qemu-img sees the size and a clean image.
    let c = d.join("new.qcow2");
    img_ok(&["create", "-f", "qcow2", p(&c), "3G"]);
    qemu_check_clean(&c);
    let qi: serde_json::Value =
        serde_json::from_str(&run_ok("qemu-img", &["info", "--output", "json", p(&c)])).unwrap();
    assert_eq!(qi["virtual-size"], 3u64 << 30);
    let cr = d.join("new.raw");
    img_ok(&["create", p(&cr), "100M"]);
    assert_eq!(std::fs::metadata(&cr).unwrap().len(), 100 * MIB);
    // A difference is found, at the right offset.
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 7 5M 512", p(&c)],
    );
    let o = img(&["compare", p(&cr), p(&c)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("offset {}", 5 * MIB)),
        "{}",
        text(&o)
    );
}

#[test]
fn overlays_commit_rebase_resize() {
    if !have_qemu_img() {
        return;
    }
    let d = TempDir::new("overlay");
    let base = d.join("base.qcow2");
    img_ok(&["create", "-f", "qcow2", p(&base), "16M"]);
    run_ok("qemu-io", &["-c", "write -P 0x11 0 4M", p(&base)]);
    let ov = d.join("ov.qcow2");
    // Stored relative, as given.
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&ov),
    ]);
    run_ok(
        "qemu-io",
        &["-c", "write -P 0x22 1M 1M", "-c", "write -z 3M 64k", p(&ov)],
    );
    let info = info_json(&ov);
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
    assert_eq!(info["backing-chain"][0]["format"], "qcow2", "{info}");
    assert_eq!(
        info["backing-chain"][0]["allocated-size"],
        4 * MIB,
        "{info}"
    );
    let qi = run_ok("qemu-img", &["info", p(&ov)]);
    assert!(qi.contains("backing file: base.qcow2"), "{qi}");
    let view = d.join("view.raw");
    run_ok("qemu-img", &["convert", "-O", "raw", p(&ov), p(&view)]);
    let ov2 = d.join("ov2.qcow2");
    std::fs::copy(&ov, &ov2).unwrap();

    // Commit: the base now shows the overlay's view; both stay clean.
    img_ok(&["commit", "-q", p(&ov)]);
    qemu_check_clean(&base);
    qemu_check_clean(&ov);
    qemu_same(&base, &view);
    qemu_same(&ov, &view);

    // Safe rebase onto an empty image: the guest sees the same disk.
    let nb = d.join("empty.qcow2");
    img_ok(&["create", "-f", "qcow2", p(&nb), "16M"]);
    img_ok(&["rebase", "-q", "-b", "empty.qcow2", p(&ov2)]);
    assert_eq!(info_json(&ov2)["backing-filename"], "empty.qcow2");
    qemu_check_clean(&ov2);
    qemu_same(&ov2, &view);
    // Unsafe rebase to a copy (header only), then to none (standalone).
    std::fs::copy(&nb, d.join("moved.qcow2")).unwrap();
    img_ok(&["rebase", "-u", "-b", "moved.qcow2", p(&ov2)]);
    assert_eq!(info_json(&ov2)["backing-filename"], "moved.qcow2");
    qemu_same(&ov2, &view);
    img_ok(&["rebase", "-q", "-b", "", p(&ov2)]);
    assert!(info_json(&ov2).get("backing-filename").is_none());
    qemu_check_clean(&ov2);
    qemu_same(&ov2, &view);

    // Resize: grow qcow2 in place, and with the L1 table moved (512-byte
    // clusters: one L1 cluster covers 2 MiB); qemu-img agrees.
    img_ok(&["resize", p(&ov2), "+1G"]);
    qemu_check_clean(&ov2);
    let small = d.join("small.qcow2");
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&small),
        "1M",
    ]);
    run_ok("qemu-io", &["-c", "write -P 0x33 0 1M", p(&small)]);
    img_ok(&["resize", p(&small), "64M"]);
    qemu_check_clean(&small);
    run_ok("qemu-io", &["-c", "write -P 0x44 63M 1M", p(&small)]);
    qemu_check_clean(&small);
    let out = run_ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x33 0 1M",
            "-c",
            "read -P 0x44 63M 1M",
            p(&small),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let qi: serde_json::Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["info", "--output", "json", p(&small)],
    ))
    .unwrap();
    assert_eq!(qi["virtual-size"], 64 * MIB);
    // Shrinking must be asked for, and only raw images can.
    img_fails(&["resize", p(&small), "1M"], &["--shrink"]);
    img_fails(&["resize", "--shrink", p(&small), "1M"], &["not supported"]);
    let raw = d.join("r.raw");
    img_ok(&["create", p(&raw), "8M"]);
    img_ok(&["resize", "--shrink", p(&raw), "-4M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB);
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

#[test]
fn corrupt_images_and_existing_destinations_are_refused() {
    if !have_qemu_img() {
        return;
    }
    let d = TempDir::new("bad");
    let src = d.join("src.raw");
    make_source(&src);
    let vmdk = d.join("s.vmdk");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            p(&src),
            p(&vmdk),
        ],
    );
    let stream = d.join("st.vmdk");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&src),
            p(&stream),
        ],
    );
    let vhdx = d.join("a.vhdx");
    run_ok("qemu-img", &["convert", "-O", "vhdx", p(&src), p(&vhdx)]);

    let refuse = |bad: &Path, fmt: Option<&str>, needles: &[&str]| {
        let out = d.join("out.qcow2");
        let mut args = vec!["convert", "-q", "-O", "qcow2"];
        if let Some(f) = fmt {
            args.extend(["-f", f]);
        }
        args.extend([p(bad), p(&out)]);
        let mut all = vec![p(bad)];
        all.extend_from_slice(needles);
        img_fails(&args, &all);
        assert!(!out.exists(), "a failed convert left {out:?} behind");
    };
    let copy = |from: &Path, name: &str| -> PathBuf {
        let to = d.join(name);
        std::fs::copy(from, &to).unwrap();
        to
    };
    let le32 = |path: &Path, at: u64| -> u32 {
        let mut b = [0u8; 4];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        u32::from_le_bytes(b)
    };
    let le64 = |path: &Path, at: u64| -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        u64::from_le_bytes(b)
    };
    let poke = |path: &Path, at: u64, bytes: &[u8]| {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    };
    let truncate = |path: &Path, len: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len).unwrap();
    };

    // VMDK: bad magic (given as vmdk), a stream cut short, a sparse image
    // cut short, a grain table entry pointing past the end of the file.
    let bad = copy(&vmdk, "magic.vmdk");
    poke(&bad, 0, b"XDMV");
    refuse(&bad, Some("vmdk"), &["format=vmdk"]);
    let bad = copy(&stream, "cut-stream.vmdk");
    let len = std::fs::metadata(&bad).unwrap().len();
    truncate(&bad, len / 2);
    refuse(&bad, None, &["vmdk: corrupt", "past the end"]);
    let bad = copy(&vmdk, "cut.vmdk");
    truncate(&bad, 200 * 1024);
    refuse(&bad, None, &["vmdk: corrupt", "past the end"]);
    let bad = copy(&vmdk, "gt.vmdk");
    let gd = le64(&bad, 56) * 512;
    let gt = le32(&bad, gd) as u64 * 512;
    poke(&bad, gt, &0x7fff_fff0u32.to_le_bytes());
    refuse(&bad, None, &["vmdk: corrupt", "grain 0", "past the end"]);
    let bad = copy(&vmdk, "gd.vmdk");
    poke(&bad, gd, &0x7fff_fff0u32.to_le_bytes());
    refuse(
        &bad,
        None,
        &["vmdk: corrupt", "grain table", "outside the file"],
    );
    // A VMDK is read-only: changing it is refused by name.
    img_fails(&["resize", p(&vmdk), "64M"], &["vmdk image", "read"]);

    // VHDX: bad file signature (given as vhdx), both headers' signatures
    // broken, cut short, a BAT entry pointing past the end.
    let bad = copy(&vhdx, "sig.vhdx");
    poke(&bad, 0, b"VHDXFILE");
    refuse(&bad, Some("vhdx"), &["format=vhdx"]);
    let bad = copy(&vhdx, "head.vhdx");
    poke(&bad, 64 << 10, b"HEAD");
    poke(&bad, 128 << 10, b"HEAD");
    refuse(&bad, None, &["vhdx: corrupt", "headers"]);
    let bad = copy(&vhdx, "cut.vhdx");
    truncate(&bad, 100 << 10);
    refuse(&bad, None, &["vhdx: corrupt", "truncated"]);
    let bad = copy(&vhdx, "cut2.vhdx");
    let len = std::fs::metadata(&bad).unwrap().len();
    truncate(&bad, len / 2);
    refuse(&bad, None, &["vhdx: corrupt", "BAT", "past the end"]);
    let bad = copy(&vhdx, "bat.vhdx");
    // The BAT region's offset, from the region table's entries.
    let rt = 192u64 << 10;
    let bat_guid = [0x66u8, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42];
    let mut bat = None;
    for i in 0..le32(&bad, rt + 8) as u64 {
        let e = rt + 16 + 32 * i;
        let mut g = [0u8; 8];
        std::fs::File::open(&bad)
            .unwrap()
            .read_exact_at(&mut g, e)
            .unwrap();
        if g == bat_guid {
            bat = Some(le64(&bad, e + 16));
        }
    }
    let bat = bat.expect("BAT region in the region table");
    poke(&bad, bat, &((0xf_ffffu64 << 20) | 6).to_le_bytes());
    refuse(
        &bad,
        None,
        &["vhdx: corrupt", "BAT", "block 0", "past the end"],
    );

    // Converting onto an existing file: refused, the file untouched.
    let precious = d.join("precious.qcow2");
    std::fs::write(&precious, b"do not overwrite me").unwrap();
    for input in [&src, &vmdk, &vhdx] {
        img_fails(
            &["convert", "-O", "qcow2", p(input), p(&precious)],
            &[p(&precious), "already exists"],
        );
        assert_eq!(sha(&precious), b"do not overwrite me");
    }
    img_fails(&["create", p(&precious), "1M"], &["already exists"]);
    assert_eq!(sha(&precious), b"do not overwrite me");
}

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn p2v_from_a_loop_device() {
    if !have_qemu_img() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: P2V from a loop device needs root (losetup)");
        return;
    }
    for tool in ["losetup", "mkfs.ext4", "debugfs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            eprintln!("SKIPPED: P2V needs {tool} (e2fsprogs, util-linux)");
            return;
        }
    }
    let d = TempDir::new("p2v");
    let backing = d.join("physical.raw");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show", p(&backing)])
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!(
            "SKIPPED: no loop device available: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return;
    }
    let dev = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
    run_ok("mkfs.ext4", &["-q", "-F", &dev.0]);
    // Files written into the filesystem on the device.
    let payload = d.join("payload.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 977) as u8).collect();
    std::fs::write(&payload, &data).unwrap();
    let note = d.join("note.txt");
    std::fs::write(&note, b"converted from a physical disk\n").unwrap();
    for (file, name) in [(&payload, "payload.bin"), (&note, "note.txt")] {
        run_ok(
            "debugfs",
            &["-w", "-R", &format!("write {} {name}", p(file)), &dev.0],
        );
    }
    run_ok("sync", &[]);

    // P2V: the block device to qcow2, then compare with the device.
    let disk = d.join("disk.qcow2");
    img_ok(&["convert", "-q", "-O", "qcow2", &dev.0, p(&disk)]);
    qemu_check_clean(&disk);
    qemu_same(Path::new(&dev.0), &disk);
    let alloc = info_json(&disk)["allocated-size"].as_u64().unwrap();
    assert!(alloc < 32 * MIB, "empty space was copied: {alloc} bytes");

    // The files read back, through a second loop device on a raw copy.
    let back = d.join("back.raw");
    img_ok(&["convert", "-q", "-O", "raw", p(&disk), p(&back)]);
    let o = Command::new("losetup")
        .args(["-f", "--show", "-r", p(&back)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let dev2 = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
    run_ok("e2fsck", &["-fn", &dev2.0]);
    for (file, name) in [(&payload, "payload.bin"), (&note, "note.txt")] {
        let out = d.join(&format!("{name}.back"));
        run_ok(
            "debugfs",
            &["-R", &format!("dump /{name} {}", p(&out)), &dev2.0],
        );
        assert_eq!(sha(&out), sha(file), "{name} differs after P2V");
    }
}
