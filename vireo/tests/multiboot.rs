//! A multiboot (v1) kernel, assembled here from a few lines with GNU `as`
//! and linked as ELF32 with `ld`, boots under `vireo run` as under QEMU's
//! `-kernel` and leaves through the exit device with a value it computed
//! from what the loader handed it: EAX's magic, the information flags,
//! its command line and its module. Skipped, with a note, without binutils.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KERNEL: &str = r#"
    .intel_syntax noprefix
    .code32
    .section .text
    .globl _start
    .align 4
mbheader:
    .long 0x1badb002
    .long 0x00000003            # page-align modules, memory info
    .long -(0x1badb002 + 3)
_start:
    mov dx, 0xf4
    cmp eax, 0x2badb002
    jne fail
    mov ecx, [ebx]              # flags: mem, cmdline, mods, mmap
    and ecx, 0x4d
    cmp ecx, 0x4d
    jne fail
    cmp dword ptr [ebx + 8], 1024   # mem_upper: at least 1 MiB above 1 MiB
    jb fail
    cmp dword ptr [ebx + 20], 1     # one module
    jne fail
    mov esi, [ebx + 16]         # the command line's first byte
    movzx eax, byte ptr [esi]
    mov edi, [ebx + 24]         # + the module's first byte
    mov edi, [edi]
    test edi, 0xfff             # page-aligned
    jnz fail
    movzx ecx, byte ptr [edi]
    add eax, ecx
    out dx, eax
    hlt
fail:
    mov eax, 0x7f
    out dx, eax
    hlt
"#;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: {tool} (binutils) not installed; multiboot test skipped");
    }
    ok
}

fn build(dir: &Path) -> PathBuf {
    let src = dir.join("mb.s");
    let obj = dir.join("mb.o");
    let elf = dir.join("mb.elf");
    std::fs::write(&src, KERNEL).unwrap();
    let st = Command::new("as")
        .args(["--32", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "as failed");
    let st = Command::new("ld")
        // -n: no separate segment for the ELF headers below the text.
        .args([
            "-m",
            "elf_i386",
            "-n",
            "-Ttext=0x100000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .unwrap();
    assert!(st.success(), "ld failed");
    elf
}

#[test]
fn multiboot_kernel_boots_and_exits_through_the_exit_device() {
    if !have("as") || !have("ld") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-multiboot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = build(&dir);
    let module = dir.join("module.bin");
    std::fs::write(&module, [0x01u8, 2, 3]).unwrap();
    let mut accels = vec!["emu"];
    if kvm_usable() {
        accels.push("kvm");
    }
    for accel in accels {
        let out = vireo()
            .args([
                "run", "--accel", accel, "--memory", "64M", "--serial", "none",
            ])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&module)
            .args(["--cmdline", "A test", "--exit-device"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 'A' (0x41) + the module's 0x01 = 0x42; status (0x42 << 1) | 1.
        assert_eq!(out.status.code(), Some(0x85), "{accel}: {stderr}");
        assert!(
            stderr.contains("wrote 0x42 to the exit device"),
            "{accel}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
