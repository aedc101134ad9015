//! Whole-file copies for snapshots, clones and rollback while volumes are plain sparse files:
//! a reflink (`FICLONE`) when the filesystem shares extents (btrfs, XFS with reflink), else a
//! copy of the data extents only (`SEEK_DATA`/`SEEK_HOLE`), so holes stay holes and a 1 TiB
//! volume holding 1 MiB copies 1 MiB.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Bytes moved per read/write when copying (one buffer per copy, not per block).
pub const COPY_CHUNK_BYTES: usize = 1 << 20;

/// How [`copy_sparse`] did its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The destination shares the source's extents (copy-on-write).
    Reflinked,
    /// The data extents were copied; this many bytes moved.
    Extents { bytes: u64 },
}

/// Makes `dst` hold exactly what `src` holds (same length, same bytes, holes where `src` has
/// holes). `dst` must be open for writing; its old contents are discarded. Does not sync.
pub fn copy_sparse(src: &File, dst: &File) -> io::Result<Copied> {
    if reflink(src, dst).is_ok() {
        return Ok(Copied::Reflinked);
    }
    let len = src.metadata()?.len();
    dst.set_len(0)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut bytes = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(src, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        bytes += copy_range(src, dst, start, end, &mut buf)?;
        pos = end;
    }
    Ok(Copied::Extents { bytes })
}

fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument and touches no user memory;
    // both descriptors are open for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek(fd, from, whence)` for SEEK_DATA/SEEK_HOLE; `None` when there is no more data.
/// A filesystem without the two treats the whole file as data, which is still correct.
fn seek(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: lseek only moves the descriptor's file offset; no memory is passed. The offset
    // is shared with other users of `f`, but every read and write here is positional.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(from)),
        Some(libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<u64> {
    let mut pos = start;
    while pos < end {
        let want = buf.len().min((end - pos) as usize);
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break; // the source shrank under us; what is left reads as zeros anyway
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(pos - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_bytes_keeps_length_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(b"middle", 32 << 20).unwrap();
        src.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        src.sync_all().unwrap();
        let src = File::open(&src_path).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("dst"))
            .unwrap();
        dst.write_all_at(&[0xff; 8192], 4096).unwrap(); // stale data must go
        let how = copy_sparse(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 64 << 20);
        let mut b = [0u8; 6];
        dst.read_exact_at(&mut b[..4], 0).unwrap();
        assert_eq!(&b[..4], b"head");
        dst.read_exact_at(&mut b, 32 << 20).unwrap();
        assert_eq!(&b, b"middle");
        dst.read_exact_at(&mut b[..4], (64 << 20) - 4).unwrap();
        assert_eq!(&b[..4], b"tail");
        let mut stale = [1u8; 8192];
        dst.read_exact_at(&mut stale, 4096).unwrap();
        assert!(
            stale.iter().all(|&x| x == 0),
            "old destination data survived"
        );
        if let Copied::Extents { bytes } = how {
            assert!(bytes < 16 << 20, "copied {bytes} bytes: holes were filled");
            // Allocated blocks (512-byte units) stay far below the apparent size.
            assert!(dst.metadata().unwrap().blocks() * 512 < 16 << 20);
        }
    }

    #[test]
    fn an_empty_source_empties_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::create(dir.path().join("src")).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("dst"))
            .unwrap();
        dst.write_all_at(b"old", 0).unwrap();
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 0);
    }
}
