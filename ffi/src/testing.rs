//! Test support (feature `testing`): a real block device for tests, a loop device over a file
//! set up with `losetup` (util-linux), detached on drop.

use std::path::{Path, PathBuf};

/// A loop device attached to a backing file; detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches the first free loop device to `backing`. Needs root and `losetup`.
    pub fn attach(backing: &Path) -> std::io::Result<LoopDevice> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }

    /// As [`LoopDevice::attach`], or `None` after saying why on stderr where loop devices
    /// cannot be set up (not root, no util-linux). Under `EVSTOR_REQUIRE_ALL` (CI) that is a
    /// panic: a skipped test must not pass.
    pub fn attach_or_skip(backing: &Path) -> Option<LoopDevice> {
        match LoopDevice::attach(backing) {
            Ok(dev) => Some(dev),
            Err(e) => {
                let why = format!("cannot set up a loop device: {e}");
                assert!(std::env::var_os("EVSTOR_REQUIRE_ALL").is_none(), "{why}");
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}
