//! CRC-32C (Castagnoli), the checksum of VHDX headers and region tables,
//! from the `crc32c` crate (the host's CRC32 instruction where it has one).

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_values() {
        // The standard check value, and RFC 3720's 32 zero bytes.
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(super::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }
}
