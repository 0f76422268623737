//! What the read-only image readers (VMDK, VHDX) read from, and the half
//! of [`DiskImage`] they share.
//!
//! [`ImageSource`] is positional reads and a length: a host file (locked
//! by [`crate::open_with`], unlocked when the image is dropped) or a
//! [`MemFile`], bytes in memory, which lets the fuzz targets and tests
//! parse images with no filesystem at all ([`open_in_memory`]).
//!
//! [`ReadOnlyImage`] is what a read-only format implements (size, reads,
//! allocation status, details); [`ReadOnly`] makes it a [`DiskImage`]
//! whose writes, discards and zeroing are all `BlockError::ReadOnly` and
//! whose flush has nothing to do. Invariant: a reader never learns where
//! its bytes come from; every offset it reads is checked against
//! [`ImageSource::len`] by the reader itself.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Allocation, BlockError, DiskImage, ImageDetails, ImageFormat};

/// Bytes an image reader reads from, at positions.
pub trait ImageSource: Send {
    /// The length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether there are no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Read at most `buf.len()` bytes at `offset`; 0 at or past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Let go of what opening took (a file's locks): the image is closed.
    fn release(&self) {}
}

impl ImageSource for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    fn release(&self) {
        crate::unlock_file(self);
    }
}

/// An image file held in memory: a length and the pieces of it that are
/// not zero (each at its offset; between and after them the file reads
/// as zeros). Pieces may overlap; a later one wins.
#[derive(Debug, Clone, Default)]
pub struct MemFile {
    len: u64,
    pieces: Vec<(u64, Vec<u8>)>,
}

impl MemFile {
    /// A file holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemFile {
        MemFile {
            len: bytes.len() as u64,
            pieces: vec![(0, bytes)],
        }
    }

    /// A file made of `pieces` (offset, bytes), as long as the furthest
    /// piece reaches (a VHDX spreads its metadata over megabytes).
    pub fn sparse(pieces: Vec<(u64, Vec<u8>)>) -> MemFile {
        let len = pieces
            .iter()
            .map(|(o, b)| o.saturating_add(b.len() as u64))
            .max()
            .unwrap_or(0);
        MemFile { len, pieces }
    }
}

impl ImageSource for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        let out = &mut buf[..n];
        out.fill(0);
        let end = offset + n as u64;
        for (at, bytes) in &self.pieces {
            let piece_end = at.saturating_add(bytes.len() as u64);
            if piece_end <= offset || *at >= end {
                continue;
            }
            let from = offset.max(*at);
            let to = end.min(piece_end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
        }
        Ok(n)
    }
}

/// Read all of `buf` at `off`; a short source is an error (`what` says
/// which structure was being read).
pub(crate) fn read_exact(
    src: &dyn ImageSource,
    path: &Path,
    buf: &mut [u8],
    off: u64,
    what: &'static str,
) -> Result<(), BlockError> {
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                return Err(BlockError::io(
                    path,
                    what,
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io(path, what, e)),
        }
    }
    Ok(())
}

/// Read `buf` at `offset`; what lies past the end reads as zeros.
pub(crate) fn read_zero_fill(
    src: &dyn ImageSource,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), BlockError> {
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io(path, "reading", e)),
        }
    }
    Ok(())
}

/// Split a read of `buf` at `offset` into pieces that each lie inside one
/// `unit`-sized cluster of the image (a VMDK grain, a VHDX block), and hand
/// each to `f` with its cluster's index and its offset in the cluster.
pub(crate) fn read_by_unit(
    buf: &mut [u8],
    offset: u64,
    unit: u64,
    mut f: impl FnMut(u64, u64, &mut [u8]) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let in_unit = at % unit;
        let n = ((unit - in_unit) as usize).min(buf.len() - done);
        f(at / unit, in_unit, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// The reading half of [`DiskImage`], for formats Vireo only reads.
pub trait ReadOnlyImage: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    fn format(&self) -> ImageFormat;
    fn path(&self) -> &Path;
    /// As [`DiskImage::block_status`].
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError>;
    fn details(&self) -> ImageDetails;
}

/// A read-only format as a [`DiskImage`]: everything that would change
/// the image is refused.
pub struct ReadOnly<T>(pub T);

impl<T: ReadOnlyImage> DiskImage for ReadOnly<T> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> Result<(), BlockError> {
        Err(self.refuse())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(self.refuse())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(self.refuse())
    }
    fn read_only(&self) -> bool {
        true
    }
    fn format(&self) -> ImageFormat {
        self.0.format()
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        self.0.block_status(offset, len)
    }
    fn details(&self) -> ImageDetails {
        self.0.details()
    }
}

impl<T: ReadOnlyImage> ReadOnly<T> {
    fn refuse(&self) -> BlockError {
        BlockError::ReadOnly {
            path: self.0.path().to_path_buf(),
        }
    }
}

/// Parse an image held in memory (a read-only format: VMDK or VHDX);
/// `name` stands for its path in messages. No file is touched.
pub fn open_in_memory(
    file: MemFile,
    format: ImageFormat,
    name: &str,
) -> Result<Box<dyn DiskImage>, BlockError> {
    let path = PathBuf::from(name);
    match format {
        ImageFormat::Vmdk => Ok(Box::new(ReadOnly(crate::vmdk::VmdkImage::from_source(
            Box::new(file),
            &path,
        )?))),
        ImageFormat::Vhdx => Ok(Box::new(ReadOnly(crate::vhdx::VhdxImage::from_source(
            Box::new(file),
            &path,
        )?))),
        other => Err(BlockError::Invalid {
            path,
            what: format!("{other} images are not read from memory (only vmdk and vhdx are)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_mem_file_reads_its_pieces_and_zeros_between() {
        let f = MemFile::sparse(vec![(2, vec![1, 2, 3]), (8, vec![9]), (3, vec![7])]);
        assert_eq!(f.len().unwrap(), 9);
        let mut b = [0xffu8; 12];
        assert_eq!(ImageSource::read_at(&f, &mut b, 0).unwrap(), 9);
        assert_eq!(&b[..9], &[0, 0, 1, 7, 3, 0, 0, 0, 9]);
        assert_eq!(ImageSource::read_at(&f, &mut b, 9).unwrap(), 0);
        let mut b = [0u8; 2];
        assert_eq!(ImageSource::read_at(&f, &mut b, 3).unwrap(), 2);
        assert_eq!(b, [7, 3]);
        let p = Path::new("m");
        let mut b = [0u8; 4];
        assert!(read_exact(&f, p, &mut b, 7, "x").is_err());
        read_zero_fill(&f, p, &mut b, 7).unwrap();
        assert_eq!(b, [0, 9, 0, 0]);
    }

    #[test]
    fn formats_with_writes_are_not_read_from_memory() {
        let e = open_in_memory(MemFile::new(vec![0; 4096]), ImageFormat::Qcow2, "q")
            .err()
            .unwrap();
        assert!(e.to_string().contains("only vmdk and vhdx"), "{e}");
    }
}
