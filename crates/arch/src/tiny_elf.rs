//! A minimal ELF64 with a PVH entry note around raw 32-bit code: the
//! smallest kernel Vireo (and QEMU) can boot. Used by the startup benchmark
//! and by tests that need a guest without building one.

/// `code` loaded at `load_addr` and entered there in 32-bit protected mode
/// (paging off) through the PVH note (XEN_ELFNOTE_PHYS32_ENTRY).
pub fn pvh_elf(load_addr: u32, code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const CODE_OFF: usize = 0x1000;
    let load = load_addr as u64;
    // The note: namesz 4 ("Xen\0"), descsz 4, type 18, then the entry.
    let mut note = Vec::with_capacity(20);
    for w in [4u32, 4, 18] {
        note.extend_from_slice(&w.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&load_addr.to_le_bytes());
    let note_off = EHDR + 2 * PHDR;

    let mut f = vec![0u8; CODE_OFF + code.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&load.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let segs = [
        // PT_LOAD, r-x
        (
            1u32,
            5u32,
            CODE_OFF as u64,
            load,
            code.len() as u64,
            0x1000u64,
        ),
        // PT_NOTE, r--
        (4, 4, note_off as u64, 0, note.len() as u64, 4),
    ];
    for (i, (ty, flags, off, addr, size, align)) in segs.into_iter().enumerate() {
        let b = EHDR + i * PHDR;
        f[b..b + 4].copy_from_slice(&ty.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&flags.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        f[b + 32..b + 40].copy_from_slice(&size.to_le_bytes()); // p_filesz
        f[b + 40..b + 48].copy_from_slice(&size.to_le_bytes()); // p_memsz
        f[b + 48..b + 56].copy_from_slice(&align.to_le_bytes());
    }
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f[CODE_OFF..].copy_from_slice(code);
    f
}

/// A PVH kernel that counts a..z on COM1 forever: the letter lives in guest
/// memory at 0x5000, a delay loop of `delay` iterations runs in ECX between
/// letters. Snapshot, migration and pause tests check that the count goes on
/// unbroken; benchmarks time how soon a restored guest speaks.
pub fn letters_guest(delay: u32) -> Vec<u8> {
    let mut code = vec![0xc6, 0x05, 0x00, 0x50, 0x00, 0x00, b'a']; // mov byte [0x5000], 'a'
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xa0, 0x00, 0x50, 0x00, 0x00]); // top: mov al, [0x5000]
    code.push(0xee); // out dx, al
    code.extend_from_slice(&[0xfe, 0xc0]); // inc al
    code.extend_from_slice(&[0x3c, b'z' + 1]); // cmp al, 'z' + 1
    code.extend_from_slice(&[0x75, 0x02]); // jne skip
    code.extend_from_slice(&[0xb0, b'a']); // mov al, 'a'
    code.extend_from_slice(&[0xa2, 0x00, 0x50, 0x00, 0x00]); // skip: mov [0x5000], al
    code.push(0xb9); // mov ecx, delay
    code.extend_from_slice(&delay.max(1).to_le_bytes());
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // 1: dec ecx; jnz 1b
    code.extend_from_slice(&[0xeb, 0xe3]); // jmp top
    pvh_elf(0x10_0000, &code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::GuestRam;
    use vm_memory::GuestAddress;

    #[test]
    fn the_loader_finds_the_code_and_the_pvh_entry() {
        let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp $-1
        let elf = pvh_elf(0x20_0000, &code);
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let img = crate::load_kernel(&mem, &mut std::io::Cursor::new(elf)).unwrap();
        assert_eq!(img.pvh_entry, Some(GuestAddress(0x20_0000)));
        let mut got = [0u8; 3];
        vm_memory::Bytes::read_slice(&mem, &mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, code);
    }
}
