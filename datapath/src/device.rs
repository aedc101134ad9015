//! What a backing path is before we serve it: a sparse file, a block device or an NVMe
//! controller, with its capacity and (for NVMe) the drive's identity. The ioctls themselves
//! live in `evstor-ffi`; this module only decides which ones to ask.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use evstor_ffi::ControllerIdentity;

/// The kind of thing a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file (a sparse volume image).
    File,
    /// A block device (a disk, partition, loop device or NVMe namespace such as `/dev/nvme0n1`).
    BlockDevice,
    /// An NVMe controller character device (`/dev/nvme0`). A controller has no capacity of its
    /// own (its namespaces do), so its `size_bytes` is 0.
    Nvme,
}

/// What [`probe`] found. `serial`, `model` and `firmware` are set only for NVMe devices that
/// answered Identify Controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub kind: DeviceKind,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
}

impl DeviceInfo {
    fn new(path: &Path, size_bytes: u64, kind: DeviceKind) -> DeviceInfo {
        DeviceInfo {
            path: path.to_path_buf(),
            size_bytes,
            kind,
            serial: None,
            model: None,
            firmware: None,
        }
    }

    /// Identify is best effort: a drive that refuses it (no `CAP_SYS_ADMIN` on the controller
    /// device, a fabrics namespace behind an odd target) is still usable storage.
    fn with_identity_of(mut self, path: &Path) -> DeviceInfo {
        match evstor_ffi::identify_controller(path) {
            Ok(ControllerIdentity {
                serial,
                model,
                firmware,
            }) => {
                self.serial = Some(serial);
                self.model = Some(model);
                self.firmware = Some(firmware);
            }
            Err(e) => tracing::debug!(path = %path.display(), error = %e, "NVMe identify failed"),
        }
        self
    }
}

/// Finds out what `path` is (following symlinks such as `/dev/disk/by-id/nvme-...`):
///
/// - a regular file → [`DeviceKind::File`] with its length;
/// - a block device → [`DeviceKind::BlockDevice`] with its `BLKGETSIZE64` size, plus the
///   controller's identity when the device is named `nvme*`;
/// - an `nvme<N>` character device → [`DeviceKind::Nvme`] with its identity, size 0.
///
/// Anything else (a directory, `/dev/null`, a FIFO, a tty) is an `InvalidInput` error naming
/// the path: none of those can back a volume.
pub fn probe(path: &Path) -> io::Result<DeviceInfo> {
    let metadata = fs::metadata(path)?;
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(DeviceInfo::new(path, metadata.len(), DeviceKind::File));
    }
    let name = kernel_name(path);
    if file_type.is_block_device() {
        let size_bytes = evstor_ffi::block_device_size(path)?;
        let info = DeviceInfo::new(path, size_bytes, DeviceKind::BlockDevice);
        if name.starts_with("nvme") {
            return Ok(info.with_identity_of(path));
        }
        return Ok(info);
    }
    if file_type.is_char_device() && is_nvme_controller_name(&name) {
        return Ok(DeviceInfo::new(path, 0, DeviceKind::Nvme).with_identity_of(path));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: not a regular file, block device or NVMe controller",
            path.display()
        ),
    ))
}

/// The kernel's name for the device (`nvme0n1` for `/dev/disk/by-id/nvme-Samsung...`), or the
/// path's own file name when it cannot be resolved.
fn kernel_name(path: &Path) -> String {
    let resolved = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `nvme<digits>`: a controller, not a namespace (`nvme0n1`) or the fabrics control device.
fn is_nvme_controller_name(name: &str) -> bool {
    name.strip_prefix("nvme")
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_reports_its_length() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let size_bytes = 3 << 30; // 3 GiB of holes; nothing is written
        file.as_file().set_len(size_bytes).expect("set_len");
        let info = probe(file.path()).expect("probe");
        assert_eq!(
            info,
            DeviceInfo::new(file.path(), size_bytes, DeviceKind::File)
        );
    }

    #[test]
    fn symlink_to_a_file_is_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("vol.img");
        fs::File::create(&target)
            .expect("create")
            .set_len(4096)
            .expect("set_len");
        let link = dir.path().join("nvme-looks-like-a-drive");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let info = probe(&link).expect("probe");
        assert_eq!(info.kind, DeviceKind::File);
        assert_eq!(info.size_bytes, 4096);
        assert_eq!(info.path, link);
    }

    #[test]
    fn dev_null_is_rejected_with_its_path() {
        let err = probe(Path::new("/dev/null")).expect_err("/dev/null cannot back a volume");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("/dev/null"), "{err}");
    }

    #[test]
    fn directory_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = probe(dir.path()).expect_err("a directory cannot back a volume");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn missing_path_is_not_found() {
        let err = probe(Path::new("/dev/evstor-no-such-device")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// Loop and zram devices exist on the build machine; when one can be opened, probe must
    /// call it a block device of the size sysfs reports.
    #[test]
    fn block_devices_report_the_sysfs_size() {
        let Ok(entries) = fs::read_dir("/sys/class/block") else {
            // No sysfs here, nothing to compare against: fine on a laptop sandbox, not in CI.
            assert!(
                std::env::var_os("EVSTOR_REQUIRE_ALL").is_none(),
                "no /sys/class/block"
            );
            return;
        };
        let mut checked = 0;
        for entry in entries.filter_map(|e| e.ok()).take(64) {
            let dev = Path::new("/dev").join(entry.file_name());
            // Loop devices are attached and detached by other tests meanwhile; the loop
            // device test checks one it owns.
            if entry.file_name().to_string_lossy().starts_with("loop") {
                continue;
            }
            let Ok(sectors) = fs::read_to_string(entry.path().join("size")) else {
                continue;
            };
            let Ok(info) = probe(&dev) else {
                continue; // no node here, or not ours to open
            };
            let sectors: u64 = sectors.trim().parse().expect("sysfs size is a number");
            assert_eq!(info.kind, DeviceKind::BlockDevice, "{}", dev.display());
            assert_eq!(info.size_bytes, sectors * 512, "{}", dev.display());
            checked += usize::from(sectors > 0);
        }
        // Often none with data can be opened (containers refuse /dev/vda even to root);
        // `a_loop_device_is_a_block_device_of_its_size` always checks one.
        eprintln!("checked {checked} block devices with data");
    }

    #[test]
    fn a_loop_device_is_a_block_device_of_its_size() {
        let backing = tempfile::NamedTempFile::new().expect("tempfile");
        backing.as_file().set_len(40 << 20).expect("set_len");
        let Some(dev) = evstor_ffi::testing::LoopDevice::attach_or_skip(backing.path()) else {
            return;
        };
        let info = probe(dev.path()).expect("probe");
        assert_eq!(
            info,
            DeviceInfo::new(dev.path(), 40 << 20, DeviceKind::BlockDevice)
        );
    }

    #[test]
    fn controller_names_exclude_namespaces() {
        assert!(is_nvme_controller_name("nvme0"));
        assert!(is_nvme_controller_name("nvme17"));
        assert!(!is_nvme_controller_name("nvme0n1"));
        assert!(!is_nvme_controller_name("nvme-fabrics"));
        assert!(!is_nvme_controller_name("nvme"));
        assert!(!is_nvme_controller_name("null"));
    }
}
