//! The engine's memory path: guest-physical memory ([`mem`]: host-mapped
//! RAM, MMIO holes, per-page code tracking for self-modifying code), paging
//! ([`mmu`]: walks, A/D bits, permission checks, the software TLB) and one
//! vCPU's accessors on top of them ([`access`]: linear, segmented, MMIO and
//! port I/O).

pub mod access;
pub mod mem;
pub mod mmu;
