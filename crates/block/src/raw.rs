//! Raw images: the file (or block device) is the disk, byte for byte.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{
    check_range, pread_zero_fill, punch_hole, pwrite_all, transfer_vectored, unlock_file,
    Allocation, BlockError, DiskImage, ImageFormat, IoBuf,
};

pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Hole punching is only attempted on regular files.
    regular: bool,
}

impl RawImage {
    pub(crate) fn from_file(
        mut file: File,
        path: &Path,
        read_only: bool,
    ) -> Result<Self, BlockError> {
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io(path, "stat", e))?;
        // Seeking to the end gives the size of block devices too.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::io(path, "finding the size", e))?;
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            regular: meta.file_type().is_file(),
        })
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        // If the file shrank under us the tail reads as zeros rather than
        // failing the guest's request.
        pread_zero_fill(&self.file, &self.path, buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        pwrite_all(&self.file, &self.path, buf, offset)
    }

    /// One `preadv` straight into the buffers (guest memory): no bounce.
    fn read_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        self.vectored_len(bufs, offset)?;
        transfer_vectored(&self.file, &self.path, bufs, offset, false)
    }

    fn write_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.vectored_len(bufs, offset)?;
        transfer_vectored(&self.file, &self.path, bufs, offset, true)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(&self.path, "fsync", e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, len)?;
        if self.regular && len > 0 {
            // Advisory: a filesystem without hole punching simply keeps the data.
            punch_hole(&self.file, offset, len);
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.regular && punch_hole(&self.file, offset, len) {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            pwrite_all(&self.file, &self.path, &chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Holes of a regular file (`SEEK_DATA`/`SEEK_HOLE`) are unallocated;
    /// everything else, and all of a block device, is data.
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        check_range(&self.path, self.size, offset, len)?;
        if !self.regular {
            return Ok((Allocation::Data, len));
        }
        let seek = |whence: libc::c_int| -> Option<u64> {
            let off = libc::off_t::try_from(offset).ok()?;
            // SAFETY: lseek on a valid, owned descriptor; no memory is passed.
            let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
            u64::try_from(r).ok()
        };
        let end = offset + len;
        match seek(libc::SEEK_DATA) {
            // No data from here to the end of the file (ENXIO).
            None => Ok((Allocation::Unallocated, len)),
            Some(d) if d > offset => Ok((Allocation::Unallocated, (d - offset).min(len))),
            Some(_) => match seek(libc::SEEK_HOLE) {
                Some(h) if h > offset => Ok((Allocation::Data, (h.min(end)) - offset)),
                _ => Ok((Allocation::Data, len)),
            },
        }
    }

    /// Regular files only: the file is cut or extended (sparsely).
    fn resize(&mut self, new_size: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        if !self.regular {
            return Err(BlockError::Invalid {
                path: self.path.clone(),
                what: "a block device cannot be resized".into(),
            });
        }
        self.file
            .set_len(new_size)
            .map_err(|e| BlockError::io(&self.path, "resizing", e))?;
        self.size = new_size;
        Ok(())
    }

    fn set_lock(&mut self, held: bool) -> Result<(), BlockError> {
        if held {
            crate::lock_file(&self.file, &self.path, self.read_only)
        } else {
            crate::unlock_file(&self.file);
            Ok(())
        }
    }
}

impl Drop for RawImage {
    fn drop(&mut self) {
        unlock_file(&self.file);
    }
}
