//! Cascaded 8259A programmable interrupt controllers (master at 0x20/0x21,
//! slave at 0xa0/0xa1 on master IRQ2) and the edge/level control registers
//! at 0x4d0/0x4d1.
//!
//! Behaviour follows the 8259A data sheet as used by Linux's
//! arch/x86/kernel/i8259.c: ICW1-ICW4 initialisation, OCW1 (mask), OCW2
//! (non-specific/specific EOI, rotation, set priority), OCW3 (IRR/ISR read
//! select, poll, special mask mode), auto-EOI and special fully nested mode.
//! Linux detects the PIC by writing a mask and reading it back, which works
//! because the mask register is plain read/write here.

use serde::{Deserialize, Serialize};

/// I/O ports decoded by [`Pic`].
pub const PIC_MASTER_CMD: u16 = 0x20;
pub const PIC_MASTER_DATA: u16 = 0x21;
pub const PIC_SLAVE_CMD: u16 = 0xa0;
pub const PIC_SLAVE_DATA: u16 = 0xa1;
pub const PIC_ELCR_MASTER: u16 = 0x4d0;
pub const PIC_ELCR_SLAVE: u16 = 0x4d1;

/// The master input the slave is cascaded into.
const CASCADE_IRQ: u8 = 2;

/// One 8259A.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PicChip {
    /// Interrupt request register.
    irr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// In-service register.
    isr: u8,
    /// Input line levels, for edge detection.
    last_level: u8,
    /// Vector base from ICW2 (low 3 bits zero).
    irq_base: u8,
    /// Rotation: the input with the highest priority is `priority_add`.
    priority_add: u8,
    /// OCW3 RR/RIS: reads of the command port return ISR instead of IRR.
    read_isr: bool,
    /// OCW3 poll command issued: the next read is a poll.
    poll: bool,
    /// OCW3 special mask mode.
    special_mask: bool,
    /// Next data-port write is ICW2 (1), ICW3 (2) or ICW4 (3); 0 = operational.
    init_state: u8,
    /// ICW1 IC4: an ICW4 follows.
    expect_icw4: bool,
    /// ICW1 SNGL: no cascade, so no ICW3.
    single_mode: bool,
    /// ICW4 AEOI.
    auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    rotate_on_auto_eoi: bool,
    /// ICW4 SFNM.
    special_fully_nested: bool,
    /// ICW1 LTIM: all inputs level-triggered.
    ltim: bool,
    /// ELCR: per-input level-triggered mode.
    elcr: u8,
    /// ELCR bits that may be set on this chip.
    elcr_mask: u8,
    is_master: bool,
    /// An ICW sequence has completed at least once. Before that the chip
    /// signals nothing: its vector base would be 0, i.e. CPU exception
    /// vectors, and without firmware nobody else initialises it.
    initialized: bool,
}

impl PicChip {
    fn new(is_master: bool) -> Self {
        PicChip {
            irr: 0,
            imr: 0,
            isr: 0,
            last_level: 0,
            irq_base: 0,
            priority_add: 0,
            read_isr: false,
            poll: false,
            special_mask: false,
            init_state: 0,
            expect_icw4: false,
            single_mode: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            ltim: false,
            elcr: 0,
            // Timer, keyboard and cascade (master) and RTC/FPU (slave IRQ8
            // and IRQ13) are always edge-triggered on PIIX-class chipsets.
            elcr_mask: if is_master { 0xf8 } else { 0xde },
            is_master,
            initialized: false,
        }
    }

    fn export(&self) -> crate::PicChipRegs {
        crate::PicChipRegs {
            last_irr: self.last_level,
            irr: self.irr,
            imr: self.imr,
            isr: self.isr,
            priority_add: self.priority_add,
            irq_base: self.irq_base,
            read_reg_select: self.read_isr,
            poll: self.poll,
            special_mask: self.special_mask,
            init_state: self.init_state,
            auto_eoi: self.auto_eoi,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            special_fully_nested_mode: self.special_fully_nested,
            init4: self.expect_icw4,
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
        }
    }

    fn import(&mut self, r: &crate::PicChipRegs) {
        self.last_level = r.last_irr;
        self.irr = r.irr;
        self.imr = r.imr;
        self.isr = r.isr;
        self.priority_add = r.priority_add & 7;
        self.irq_base = r.irq_base & 0xf8;
        self.read_isr = r.read_reg_select;
        self.poll = r.poll;
        self.special_mask = r.special_mask;
        self.init_state = r.init_state.min(3);
        self.expect_icw4 = r.init4;
        self.single_mode = false;
        self.auto_eoi = r.auto_eoi;
        self.rotate_on_auto_eoi = r.rotate_on_auto_eoi;
        self.special_fully_nested = r.special_fully_nested_mode;
        self.ltim = false;
        self.elcr = r.elcr & self.elcr_mask;
        // A vector base was programmed: the OS went through ICW1-ICW4.
        self.initialized = self.irq_base != 0 && self.init_state == 0;
    }

    fn level_triggered(&self, irq: u8) -> bool {
        self.ltim || self.elcr & (1 << irq) != 0
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.level_triggered(irq) {
            if level {
                self.irr |= mask;
                self.last_level |= mask;
            } else {
                self.irr &= !mask;
                self.last_level &= !mask;
            }
        } else if level {
            if self.last_level & mask == 0 {
                self.irr |= mask;
            }
            self.last_level |= mask;
        } else {
            self.last_level &= !mask;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, taking
    /// rotation into account; 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The input this chip would signal now, if any.
    fn highest_request(&self) -> Option<u8> {
        if !self.initialized {
            return None;
        }
        let req = self.irr & !self.imr;
        let prio = self.priority(req);
        if prio == 8 {
            return None;
        }
        let mut in_service = self.isr;
        // In special mask mode, masked in-service levels do not block lower
        // priorities (Linux doesn't use it but DOS-era code does).
        if self.special_mask {
            in_service &= !self.imr;
        }
        // Special fully nested: the slave's own in-service bit on the master
        // does not block further (higher-priority) slave interrupts.
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        let cur = self.priority(in_service);
        (prio < cur).then_some((prio + self.priority_add) & 7)
    }

    /// INTA for input `irq`: IRR -> ISR (unless auto-EOI).
    fn acknowledge(&mut self, irq: u8) {
        let mask = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        // An edge request is consumed by the acknowledge; a level request
        // stays as long as the line is high.
        if !self.level_triggered(irq) {
            self.irr &= !mask;
        }
    }

    fn reset_for_icw1(&mut self) {
        // ICW1 clears the edge-sense latch, the mask, ISR, special mask and
        // rotation and selects IRR for status reads (8259A data sheet).
        self.last_level = 0;
        self.irr = 0;
        self.imr = 0;
        self.isr = 0;
        self.priority_add = 0;
        self.read_isr = false;
        self.poll = false;
        self.special_mask = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
    }

    fn write_cmd(&mut self, val: u8) {
        if val & 0x10 != 0 {
            // ICW1
            self.reset_for_icw1();
            self.init_state = 1;
            self.expect_icw4 = val & 1 != 0;
            self.single_mode = val & 2 != 0;
            self.ltim = val & 8 != 0;
        } else if val & 0x08 != 0 {
            // OCW3
            if val & 0x04 != 0 {
                self.poll = true;
            }
            if val & 0x02 != 0 {
                self.read_isr = val & 0x01 != 0;
            }
            if val & 0x40 != 0 {
                self.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2
            match val >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                cmd @ (1 | 5) => {
                    // Non-specific EOI: retire the highest-priority ISR bit.
                    let prio = self.priority(self.isr);
                    if prio != 8 {
                        let irq = (prio + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                cmd @ (3 | 7) => {
                    let irq = val & 7;
                    self.isr &= !(1 << irq);
                    if cmd == 7 {
                        self.priority_add = (irq + 1) & 7;
                    }
                }
                6 => self.priority_add = ((val & 7) + 1) & 7,
                _ => {} // 2: no operation
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_state {
            1 => {
                self.irq_base = val & 0xf8;
                self.init_state = if !self.single_mode {
                    2
                } else if self.expect_icw4 {
                    3
                } else {
                    0
                };
                self.initialized |= self.init_state == 0;
            }
            2 => {
                // ICW3: the cascade wiring is fixed (slave on IRQ2).
                self.init_state = if self.expect_icw4 { 3 } else { 0 };
                self.initialized |= self.init_state == 0;
            }
            3 => {
                self.auto_eoi = val & 0x02 != 0;
                self.special_fully_nested = val & 0x10 != 0;
                self.init_state = 0;
                self.initialized = true;
            }
            _ => self.imr = val,
        }
    }
}

/// The master/slave 8259A pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pic {
    master: PicChip,
    slave: PicChip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Master and slave in the form another accelerator keeps them.
    pub fn export(&self) -> [crate::PicChipRegs; 2] {
        [self.master.export(), self.slave.export()]
    }

    /// Load [`Pic::export`]'s form.
    pub fn import(&mut self, r: &[crate::PicChipRegs; 2]) {
        self.master.import(&r[0]);
        self.slave.import(&r[1]);
    }

    /// Power-on state: uninitialised chips, nothing masked, vector bases 0
    /// until the guest's ICW2.
    pub fn new() -> Self {
        Pic {
            master: PicChip::new(true),
            slave: PicChip::new(false),
        }
    }

    /// Propagates the slave's INT output to master input 2.
    /// Master IR2 mirrors the slave's INT output. A latched edge there would
    /// outlive a withdrawn slave request and turn into a spurious IRQ15;
    /// mirroring avoids that, and since the update runs after every
    /// acknowledge and EOI, a second slave interrupt queued behind the first
    /// is requested again as soon as the slave can present it.
    fn update_cascade(&mut self) {
        let mask = 1u8 << CASCADE_IRQ;
        if self.slave.highest_request().is_some() {
            self.master.irr |= mask;
            self.master.last_level |= mask;
        } else {
            self.master.irr &= !mask;
            self.master.last_level &= !mask;
        }
    }

    /// Sets the level of ISA IRQ line `irq` (0-15). Edge-triggered inputs
    /// latch a request on a rising edge; level-triggered ones (ELCR) follow
    /// the line. The cascade input (2) is driven by the slave and ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.master.set_irq(irq, level),
            8..=15 => self.slave.set_irq(irq - 8, level),
            _ => return,
        }
        self.update_cascade();
    }

    /// Raises and lowers an edge-triggered line (e.g. one PIT tick).
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// The master's INT output is asserted.
    pub fn interrupt_output(&self) -> bool {
        self.master.highest_request().is_some()
    }

    /// The vector an INTA cycle would return now, without acknowledging.
    pub fn pending(&self) -> Option<u8> {
        let irq = self.master.highest_request()?;
        if irq == CASCADE_IRQ && !self.master.single_mode {
            // If the slave withdrew its request the INTA would yield the
            // slave's spurious vector (IRQ15).
            let sirq = self.slave.highest_request().unwrap_or(7);
            Some(self.slave.irq_base | sirq)
        } else {
            Some(self.master.irq_base | irq)
        }
    }

    /// The INTA cycle: returns the vector and moves the request into
    /// service. With no request pending the master answers with its
    /// spurious vector (IRQ7), as the hardware does.
    pub fn ack(&mut self) -> u8 {
        let vector = match self.master.highest_request() {
            Some(irq) => {
                self.master.acknowledge(irq);
                if irq == CASCADE_IRQ && !self.master.single_mode {
                    match self.slave.highest_request() {
                        Some(sirq) => {
                            self.slave.acknowledge(sirq);
                            self.slave.irq_base | sirq
                        }
                        None => self.slave.irq_base | 7,
                    }
                } else {
                    self.master.irq_base | irq
                }
            }
            None => self.master.irq_base | 7,
        };
        self.update_cascade();
        vector
    }

    /// Poll command read on one chip: acknowledges the highest request and
    /// returns 0x80 | level, or 0 when nothing is pending.
    fn poll_read(&mut self, slave: bool) -> u8 {
        let result = if slave {
            let r = self.slave.highest_request();
            if let Some(irq) = r {
                self.slave.acknowledge(irq);
                // The master's latched cascade request belonged to this
                // interrupt; update_cascade re-latches it if more remain.
                self.master.irr &= !(1 << CASCADE_IRQ);
            }
            r
        } else {
            let r = self.master.highest_request();
            if let Some(irq) = r {
                self.master.acknowledge(irq);
            }
            r
        };
        self.update_cascade();
        match result {
            Some(irq) => 0x80 | irq,
            None => 0,
        }
    }

    /// Whether `port` belongs to the PIC pair or the ELCR.
    pub fn handles_port(port: u16) -> bool {
        matches!(
            port,
            PIC_MASTER_CMD
                | PIC_MASTER_DATA
                | PIC_SLAVE_CMD
                | PIC_SLAVE_DATA
                | PIC_ELCR_MASTER
                | PIC_ELCR_SLAVE
        )
    }

    /// Port read (byte-wide registers).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            PIC_MASTER_CMD | PIC_MASTER_DATA | PIC_SLAVE_CMD | PIC_SLAVE_DATA => {
                let slave = port & 0x80 != 0;
                let chip = if slave {
                    &mut self.slave
                } else {
                    &mut self.master
                };
                if chip.poll {
                    chip.poll = false;
                    return self.poll_read(slave);
                }
                if port & 1 != 0 {
                    chip.imr
                } else if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            PIC_ELCR_MASTER => self.master.elcr,
            PIC_ELCR_SLAVE => self.slave.elcr,
            _ => 0xff,
        }
    }

    /// Port write.
    pub fn write_port(&mut self, port: u16, val: u8) {
        match port {
            PIC_MASTER_CMD => self.master.write_cmd(val),
            PIC_MASTER_DATA => self.master.write_data(val),
            PIC_SLAVE_CMD => self.slave.write_cmd(val),
            PIC_SLAVE_DATA => self.slave.write_data(val),
            PIC_ELCR_MASTER => self.master.elcr = val & self.master.elcr_mask,
            PIC_ELCR_SLAVE => self.slave.elcr = val & self.slave.elcr_mask,
            _ => return,
        }
        self.update_cascade();
    }

    /// Master and slave IMR (for tests and debugging).
    pub fn masks(&self) -> (u8, u8) {
        (self.master.imr, self.slave.imr)
    }
}
