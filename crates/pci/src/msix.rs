//! MSI-X: the vector table and pending-bit array a device exposes in one of
//! its BARs, the capability in configuration space, per-vector and
//! function-wide masking, and delivery through a backend-agnostic sink.

use std::sync::Arc;

use devices::{Persist, PersistError};

/// Where MSI messages go: (address, data). The VMM connects this to
/// `hypervisor::Vm::signal_msi`.
pub type MsiSink = Arc<dyn Fn(u64, u32) + Send + Sync>;

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Message control bits.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: usize = 16;
/// The most vectors a function may have.
pub const MSIX_MAX_VECTORS: usize = 2048;
const VECTOR_CTRL_MASKED: u32 = 1;

/// What a snapshot keeps of an MSI-X table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Entries as the guest wrote them (16 bytes each).
    pub table: Vec<u8>,
    /// Pending bits, one per vector.
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// One function's MSI-X state.
pub struct MsixTable {
    /// Entries as the guest sees them (address low/high, data, control).
    table: Vec<u8>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: MsiSink,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("vectors", &self.num_vectors())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl MsixTable {
    /// `vectors` entries (clamped to 1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: usize, sink: MsiSink) -> Self {
        let n = vectors.clamp(1, MSIX_MAX_VECTORS);
        let mut t = MsixTable {
            table: vec![0; n * MSIX_ENTRY_SIZE],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
        };
        t.reset();
        t
    }

    pub fn num_vectors(&self) -> usize {
        self.table.len() / MSIX_ENTRY_SIZE
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64
    }

    /// Bytes the PBA occupies in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Back to power-on state: disabled, every vector masked, nothing
    /// pending, addresses and data zero.
    pub fn reset(&mut self) {
        self.table.fill(0);
        for v in 0..self.num_vectors() {
            self.set_entry_u32(v, 12, VECTOR_CTRL_MASKED);
        }
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    /// The capability body (12 bytes) and its write mask, for
    /// `PciConfig::add_capability`: table at `table_offset` of BAR
    /// `table_bar`, PBA at `pba_offset` of `pba_bar` (offsets 8-aligned).
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = MSIX_CAP_ID;
        let ctrl = (self.num_vectors() - 1) as u16;
        body[2..4].copy_from_slice(&ctrl.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset & !7 | (table_bar as u32 & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset & !7 | (pba_bar as u32 & 7)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[3] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The guest wrote Message Control (the device passes the value the
    /// config space now holds). Unmasking delivers what was pending.
    pub fn set_control(&mut self, ctrl: u16) {
        self.enabled = ctrl & MSIX_ENABLE != 0;
        self.function_masked = ctrl & MSIX_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    fn entry_u32(&self, v: usize, off: usize) -> u32 {
        let i = v * MSIX_ENTRY_SIZE + off;
        u32::from_le_bytes([
            self.table[i],
            self.table[i + 1],
            self.table[i + 2],
            self.table[i + 3],
        ])
    }

    fn set_entry_u32(&mut self, v: usize, off: usize, val: u32) {
        let i = v * MSIX_ENTRY_SIZE + off;
        self.table[i..i + 4].copy_from_slice(&val.to_le_bytes());
    }

    /// Is vector `v` masked by its own mask bit?
    pub fn vector_masked(&self, v: usize) -> bool {
        v >= self.num_vectors() || self.entry_u32(v, 12) & VECTOR_CTRL_MASKED != 0
    }

    pub fn is_pending(&self, v: usize) -> bool {
        v < self.num_vectors() && self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    /// The address and data vector `v` holds.
    pub fn message(&self, v: usize) -> Option<(u64, u32)> {
        (v < self.num_vectors()).then(|| {
            let addr = self.entry_u32(v, 0) as u64 | (self.entry_u32(v, 4) as u64) << 32;
            (addr, self.entry_u32(v, 8))
        })
    }

    /// Raise vector `v`. Returns false when MSI-X is disabled or `v` does
    /// not exist (the caller may fall back to INTx); a masked vector is
    /// remembered in the PBA and delivered when unmasked.
    pub fn notify(&mut self, v: u16) -> bool {
        let v = v as usize;
        if !self.enabled || v >= self.num_vectors() {
            return false;
        }
        if self.function_masked || self.vector_masked(v) {
            self.set_pending(v, true);
        } else if let Some((addr, data)) = self.message(v) {
            (self.sink)(addr, data);
        }
        true
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.num_vectors() {
            if self.is_pending(v) && !self.vector_masked(v) {
                self.set_pending(v, false);
                if let Some((addr, data)) = self.message(v) {
                    (self.sink)(addr, data);
                }
            }
        }
    }

    /// A guest read of the table at `offset` (relative to the table start).
    /// Out-of-range bytes read as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as usize)
                .checked_add(i)
                .and_then(|o| self.table.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write to the table. Only the mask bit of Vector Control is
    /// writable there; clearing it delivers a pending message.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = (offset as usize)
                .checked_add(i)
                .filter(|&o| o < self.table.len())
            else {
                break;
            };
            let field = o % MSIX_ENTRY_SIZE;
            self.table[o] = match field {
                12 => b & VECTOR_CTRL_MASKED as u8,
                13..=15 => 0,
                _ => b,
            };
            if field == 12 {
                touched.push(o / MSIX_ENTRY_SIZE);
            }
        }
        if touched.is_empty() {
            return;
        }
        self.deliver_pending();
    }

    /// A guest read of the PBA (writes to it are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = (offset as usize).saturating_add(i);
            *b = self
                .pending
                .get(o / 8)
                .map_or(0, |q| (q >> ((o % 8) * 8)) as u8);
        }
    }
}

impl Persist for MsixTable {
    type State = MsixState;

    fn save(&self) -> Result<MsixState, PersistError> {
        Ok(MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        })
    }

    /// Load a saved table without delivering anything (what was pending
    /// stays pending until unmasked).
    fn restore(&mut self, s: &MsixState) -> Result<(), PersistError> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(PersistError::mismatch(
                "msi-x table",
                format!(
                    "an MSI-X table of {} bytes and {} pending words, this device has {} vectors",
                    s.table.len(),
                    s.pending.len(),
                    self.num_vectors()
                ),
            ));
        }
        // Pending bits past the last vector name vectors that do not exist.
        let n = self.num_vectors();
        if let Some(&last) = s.pending.last() {
            let used = n - (s.pending.len() - 1) * 64;
            if used < 64 && last >> used != 0 {
                return Err(PersistError::invalid(
                    "msi-x table",
                    format!("pending bits {last:#x} beyond vector {}", n - 1),
                ));
            }
        }
        self.table.copy_from_slice(&s.table);
        self.pending.copy_from_slice(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Seen = Arc<Mutex<Vec<(u64, u32)>>>;

    fn table(n: usize) -> (MsixTable, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: MsiSink = Arc::new(move |a, d| s.lock().unwrap().push((a, d)));
        (MsixTable::new(n, sink), seen)
    }

    fn program(t: &mut MsixTable, v: u64, addr: u64, data: u32) {
        t.write_table(v * 16, &addr.to_le_bytes());
        t.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn saved_table_round_trips_and_bad_ones_change_nothing() {
        let (mut t, seen) = table(3);
        program(&mut t, 1, 0xfee0_0000, 0x41);
        t.set_control(MSIX_ENABLE);
        let saved = t.save().unwrap();
        let (mut u, _) = table(3);
        u.restore(&saved).unwrap();
        assert_eq!(u.save().unwrap(), saved);
        assert!(
            seen.lock().unwrap().is_empty(),
            "restoring delivers nothing"
        );
        // Another size of table, or pending bits of vectors 3..63.
        let (mut big, _) = table(4);
        assert!(matches!(
            big.restore(&saved),
            Err(PersistError::Mismatch { .. })
        ));
        let mut bad = saved.clone();
        bad.pending[0] = 1 << 3;
        let (mut v, _) = table(3);
        let before = v.save().unwrap();
        assert!(matches!(v.restore(&bad), Err(PersistError::Invalid { .. })));
        assert_eq!(v.save().unwrap(), before);
        // All 64 vectors of a word in use: every pending bit is valid.
        let (mut w, _) = table(64);
        let mut full = w.save().unwrap();
        full.pending[0] = u64::MAX;
        w.restore(&full).unwrap();
    }

    #[test]
    fn capability_encodes_size_and_locations() {
        let (t, _) = table(3);
        let (body, mask) = t.capability(0, 0x4000, 0, 0x5000);
        assert_eq!(body[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(mask[3], 0xc0);
        assert_eq!(t.table_len(), 48);
        assert_eq!(t.pba_len(), 8);
    }

    #[test]
    fn masking_pending_and_delivery() {
        let (mut t, seen) = table(2);
        // Disabled: nothing is delivered or pended.
        assert!(!t.notify(0));
        t.set_control(MSIX_ENABLE);
        // Masked at reset: pending.
        program(&mut t, 0, 0xfee0_0000, 0x41);
        assert!(t.notify(0));
        assert!(t.is_pending(0));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert!(seen.lock().unwrap().is_empty());
        // Unmask: the pending message goes out, once.
        t.write_table(12, &0u32.to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
        assert!(!t.is_pending(0));
        assert!(t.notify(0));
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Function mask holds everything back until cleared.
        t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(t.notify(0));
        assert_eq!(seen.lock().unwrap().len(), 2);
        t.set_control(MSIX_ENABLE);
        assert_eq!(seen.lock().unwrap().len(), 3);
        // Out-of-range vectors.
        assert!(!t.notify(7));
        // Reserved control bits are read-only zero; reads past the end are zero.
        t.write_table(16 + 12, &0xffff_ffffu32.to_le_bytes());
        let mut c = [0u8; 4];
        t.read_table(16 + 12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1);
        t.read_table(1000, &mut c);
        assert_eq!(c, [0; 4]);
        t.write_table(u64::MAX, &[1, 2, 3]);
        t.reset();
        assert!(!t.enabled());
        assert!(t.vector_masked(0));
    }
}
