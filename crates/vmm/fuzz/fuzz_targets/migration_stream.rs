//! Arbitrary bytes as a migration stream from a source: header, hello,
//! pages and the VM state, parsed as the destination parses them after
//! its handshake. Errors only: never a panic, and no memory beyond what
//! the hello may claim (within vm.create's limits, mapped lazily).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::migration::read_stream(&mut &data[..], &mut std::io::sink());
});
