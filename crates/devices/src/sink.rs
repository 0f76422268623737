//! A device for ports Linux touches that have nothing behind them: the 0x80
//! POST code port, the DMA page registers 0x81-0x8f, the 0xed delay port,
//! absent COM ports. Claiming them keeps them out of the "unhandled access"
//! logs and costs the guest nothing: reads float high as on an empty ISA bus.

use crate::BusDevice;

#[derive(Debug, Default, Clone, Copy)]
pub struct Ignored;

impl Ignored {
    pub fn new() -> Self {
        Ignored
    }
}

impl BusDevice for Ignored {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reads_float_high_and_writes_vanish() {
        let bus = Bus::new();
        bus.insert(0x80, 0x10, Arc::new(Mutex::new(Ignored::new())))
            .unwrap();
        for width in [1, 2, 4, 8] {
            let mut data = vec![0u8; width];
            assert!(bus.read(0x8f, &mut data));
            assert!(data.iter().all(|&b| b == 0xff));
        }
        assert!(bus.write(0x80, &[0x12, 0x34]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x80, &mut data));
        assert_eq!(data, [0xff]);
    }
}
