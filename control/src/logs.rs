//! The server's own log files and the support bundle built from them.
//!
//! `evstor serve` writes its log to standard error and to `<data-dir>/logs/evstor.log`,
//! rotated by size ([`LOG_FILE_BYTES_MAX`], keeping [`LOG_FILES_MAX`] files: the directory
//! never holds more than their product). [`Bundle`] writes the support bundle of
//! `GET /api/v2/logs`: a tar (gzip-compressed unless asked otherwise) of those log files,
//! version, configuration, cluster state, `journal verify`, RocksDB and block store
//! statistics and the metrics. It reads no key, token or certificate file, and the texts it
//! generates name none (the test greps the bundle for them).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::limits::{LOG_FILES_MAX, LOG_FILE_BYTES_MAX};

/// Name of the newest log file; older ones are `evstor.log.1` (newest) to `.N`.
pub const LOG_FILE: &str = "evstor.log";

/// Where the logs of a data directory live.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// A size-rotated log file, shared by every thread that logs. Cheap to clone.
#[derive(Clone)]
pub struct RotatingLog {
    inner: Arc<Mutex<Current>>,
}

struct Current {
    dir: PathBuf,
    file: File,
    bytes: u64,
}

impl RotatingLog {
    /// Opens (appending) `dir/evstor.log`, creating the directory.
    pub fn open(dir: &Path) -> io::Result<RotatingLog> {
        fs::create_dir_all(dir)?;
        let file = open_append(&dir.join(LOG_FILE))?;
        let bytes = file.metadata()?.len();
        Ok(RotatingLog {
            inner: Arc::new(Mutex::new(Current {
                dir: dir.to_path_buf(),
                file,
                bytes,
            })),
        })
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Current {
    /// `evstor.log.{N-1}` → `.N` … `evstor.log` → `.1`, then a fresh `evstor.log`. The
    /// oldest file falls off the end.
    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: usize| self.dir.join(format!("{LOG_FILE}.{i}"));
        for i in (1..LOG_FILES_MAX).rev() {
            let from = if i == 1 {
                self.dir.join(LOG_FILE)
            } else {
                name(i - 1)
            };
            match fs::rename(&from, name(i)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.file = open_append(&self.dir.join(LOG_FILE))?;
        self.bytes = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut cur = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if cur.bytes > 0 && cur.bytes + buf.len() as u64 > LOG_FILE_BYTES_MAX {
            // A log that cannot rotate keeps writing where it is rather than losing lines.
            let _ = cur.rotate();
        }
        let n = cur.file.write(buf)?;
        cur.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut cur = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        cur.file.flush()
    }
}

/// Log files of `dir` modified within `days` days, oldest first.
pub fn recent_logs(dir: &Path, days: u32) -> Vec<PathBuf> {
    let since = SystemTime::now()
        .checked_sub(Duration::from_secs(u64::from(days) * 86_400))
        .unwrap_or(UNIX_EPOCH);
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(LOG_FILE))
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            (modified >= since).then(|| (modified, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// Writes a support bundle as a tar stream: generated texts, then files.
pub struct Bundle<W: Write> {
    tar: tar::Builder<W>,
    root: String,
    mtime: u64,
}

impl<W: Write> Bundle<W> {
    /// A bundle whose entries live under `root/`.
    pub fn new(out: W, root: &str) -> Bundle<W> {
        let mtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Bundle {
            tar: tar::Builder::new(out),
            root: root.to_string(),
            mtime,
        }
    }

    /// Adds a generated file.
    pub fn text(&mut self, name: &str, body: &str) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        header.set_cksum();
        let path = format!("{}/{name}", self.root);
        self.tar.append_data(&mut header, path, body.as_bytes())
    }

    /// Adds a file from disk under `dir_in_bundle/` (its current length: a log still being
    /// written is cut where it stood when it was opened).
    pub fn file(&mut self, dir_in_bundle: &str, path: &Path) -> io::Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else {
            return Ok(());
        };
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        header.set_cksum();
        let entry = format!("{}/{dir_in_bundle}/{name}", self.root);
        let mut limited = io::Read::take(&mut file, len);
        self.tar.append_data(&mut header, entry, &mut limited)
    }

    /// Ends the archive and returns the writer.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_at_most_the_configured_files_and_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = RotatingLog::open(dir.path()).expect("open");
        let line = vec![b'x'; 64 * 1024];
        let total = LOG_FILE_BYTES_MAX * (LOG_FILES_MAX as u64 + 3);
        let mut written = 0;
        while written < total {
            log.write_all(&line).expect("write");
            written += line.len() as u64;
        }
        let files = recent_logs(dir.path(), 1);
        assert_eq!(files.len(), LOG_FILES_MAX, "{files:?}");
        let bytes: u64 = files
            .iter()
            .map(|f| fs::metadata(f).expect("meta").len())
            .sum();
        assert!(bytes <= LOG_FILE_BYTES_MAX * LOG_FILES_MAX as u64);
        assert!(dir
            .path()
            .join(format!("{LOG_FILE}.{}", LOG_FILES_MAX - 1))
            .exists());
        assert!(!dir
            .path()
            .join(format!("{LOG_FILE}.{LOG_FILES_MAX}"))
            .exists());
    }
}
