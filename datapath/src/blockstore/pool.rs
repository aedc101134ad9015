//! The devices under the block store: files or block devices concatenated into one space of
//! 4 KiB pages, read and written through the connection's io_uring (or inline for memory-
//! backed files, where io_uring would only bounce the copy through a worker thread).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types};

use crate::backend::IoQueue;
use crate::limits::BLOCK_BYTES;

/// One device of the pool, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// A regular file (created sparse if missing) or a block device.
    pub path: PathBuf,
    /// Size for a file that has to be created or grown; ignored for block devices.
    pub size_bytes: u64,
}

#[derive(Debug)]
struct Dev {
    file: File,
    path: PathBuf,
    first_page: u64,
    pages: u64,
}

/// A raw transfer of whole sectors.
#[derive(Debug, Clone, Copy)]
pub struct RawOp {
    /// Write (else read).
    pub write: bool,
    /// First pool sector.
    pub sector: u64,
    /// Bytes (a multiple of 512 that does not cross a device end).
    pub len: u32,
    /// Memory to read into or write from.
    pub buf: *mut u8,
}

/// The devices, addressed as one run of pages.
#[derive(Debug)]
pub struct Pool {
    devs: Vec<Dev>,
    pages: u64,
    inline: bool,
}

impl Pool {
    /// Opens (creating sparse files where missing) every device, in order.
    pub fn open(specs: &[DeviceSpec]) -> io::Result<Pool> {
        let mut devs = Vec::with_capacity(specs.len());
        let mut first_page = 0;
        let mut inline = true;
        for s in specs {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(!is_block_device(&s.path))
                .truncate(false)
                .open(&s.path)?;
            let md = file.metadata()?;
            let bytes = if md.is_file() {
                if md.len() < s.size_bytes {
                    file.set_len(s.size_bytes)?;
                }
                md.len().max(s.size_bytes)
            } else {
                evstor_ffi::block_device_size(&s.path)?
            };
            let pages = bytes / BLOCK_BYTES;
            inline &= crate::backend::memory_backed(&file);
            devs.push(Dev {
                file,
                path: s.path.clone(),
                first_page,
                pages,
            });
            first_page += pages;
        }
        Ok(Pool {
            devs,
            pages: first_page,
            inline,
        })
    }

    /// Capacity in 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Device paths with their sizes in bytes.
    pub fn devices(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.devs
            .iter()
            .map(|d| (d.path.as_path(), d.pages * BLOCK_BYTES))
    }

    /// The device holding `sector`.
    pub fn device_of(&self, sector: u64) -> &Path {
        &self.locate(sector).0.path
    }

    fn locate(&self, sector: u64) -> (&Dev, u64) {
        let page = sector / 8;
        let i = self
            .devs
            .partition_point(|d| d.first_page + d.pages <= page)
            .min(self.devs.len() - 1);
        let d = &self.devs[i];
        (d, (sector - d.first_page * 8) * 512)
    }

    /// Runs every op; returns the first failure (as -errno) or 0.
    ///
    /// # Safety
    /// Every op's `buf` must be valid for `len` bytes (writable for reads) and not touched
    /// by anyone else until this returns.
    pub unsafe fn run(&self, q: &mut IoQueue, ops: &[RawOp], res: &mut [i32]) -> i32 {
        if self.inline || !q.is_uring() {
            for (op, r) in ops.iter().zip(res.iter_mut()) {
                // SAFETY: forwarded caller contract.
                *r = unsafe { self.run_one(op) };
            }
        } else {
            let entries = ops.iter().map(|op| {
                let (d, off) = self.locate(op.sector);
                let fd = types::Fd(d.file.as_raw_fd());
                if op.write {
                    opcode::Write::new(fd, op.buf, op.len).offset(off).build()
                } else {
                    opcode::Read::new(fd, op.buf, op.len).offset(off).build()
                }
            });
            // SAFETY: the buffers stay valid until run_batch has reaped every completion;
            // the files live as long as self.
            if let Err(e) = unsafe { q.run_batch(entries, &mut res[..ops.len()]) } {
                return -e.raw_os_error().unwrap_or(libc::EIO);
            }
        }
        for (op, &r) in ops.iter().zip(res.iter()) {
            if r < 0 {
                return r;
            }
            if r as u32 != op.len {
                return -libc::EIO;
            }
        }
        0
    }

    /// # Safety
    /// As [`Pool::run`].
    unsafe fn run_one(&self, op: &RawOp) -> i32 {
        let (d, off) = self.locate(op.sector);
        let len = op.len as usize;
        let r = if op.write {
            // SAFETY: caller guarantees buf is valid for len bytes.
            let b = unsafe { std::slice::from_raw_parts(op.buf, len) };
            d.file.write_all_at(b, off)
        } else {
            // SAFETY: caller guarantees buf is valid and exclusively ours for len bytes.
            let b = unsafe { std::slice::from_raw_parts_mut(op.buf, len) };
            d.file.read_exact_at(b, off)
        };
        match r {
            Ok(()) => op.len as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        for d in &self.devs {
            d.file.sync_data()?;
        }
        Ok(())
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}
