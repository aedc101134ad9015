//! The one place evstor talks ioctl to the kernel: NVMe Identify through the admin passthrough
//! and the size of a block device. Everything here turns errno into `io::Error`; nothing panics
//! on a file that turns out not to be what the caller hoped.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::sys;

// The `_IOC` encoding below is the asm-generic one (x86, arm, riscv, s390...). powerpc, mips
// and sparc put the direction bits elsewhere and would need their own constants.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
compile_error!("evstor-ffi computes ioctl numbers with the asm-generic _IOC layout only");

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` from `<asm-generic/ioctl.h>`.
const fn ioc(dir: u32, ty: u32, nr: u32, size_bytes: usize) -> u32 {
    // The size field is 14 bits wide; a larger struct would silently alias another ioctl.
    assert!(size_bytes < (1 << 14));
    (dir << 30) | ((size_bytes as u32) << 16) | (ty << 8) | nr
}

/// `_IOWR('N', 0x41, struct nvme_admin_cmd)`.
pub const NVME_IOCTL_ADMIN_CMD: u32 = ioc(
    IOC_READ | IOC_WRITE,
    b'N' as u32,
    0x41,
    size_of::<sys::nvme_admin_cmd>(),
);

/// `_IOR(0x12, 114, size_t)`. The number is built from `size_t`, but the kernel always writes a
/// full `u64` (`put_u64`), which is why [`block_device_size`] reads into a `u64`.
pub const BLKGETSIZE64: u32 = ioc(IOC_READ, 0x12, 114, size_of::<libc::size_t>());

/// Admin opcode Identify (NVMe base spec, figure "Opcodes for Admin Commands").
const ADMIN_OPCODE_IDENTIFY: u8 = 0x06;
/// CDW10.CNS = 01h: Identify Controller data structure.
const IDENTIFY_CNS_CONTROLLER: u32 = 0x01;
/// Every Identify data structure is one 4 KiB page.
const IDENTIFY_DATA_BYTES: usize = 4096;
/// Bound on the `/sys/class/nvme` scan; a host with more controllers than this is not one we
/// know how to run on.
const CONTROLLERS_MAX: usize = 1024;
const SYS_CLASS_NVME: &str = "/sys/class/nvme";

/// Who a controller says it is (Identify Controller bytes 4..72), trimmed of its space padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerIdentity {
    pub serial: String,
    pub model: String,
    pub firmware: String,
}

impl ControllerIdentity {
    /// SN is bytes 4..24, MN 24..64, FR 64..72: ASCII, padded with spaces (some firmware pads
    /// with NULs instead).
    fn parse(page: &[u8; IDENTIFY_DATA_BYTES]) -> ControllerIdentity {
        ControllerIdentity {
            serial: ascii_field(&page[4..24]),
            model: ascii_field(&page[24..64]),
            firmware: ascii_field(&page[64..72]),
        }
    }
}

fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_matches(|c: char| c.is_ascii_whitespace() || c == '\0')
        .to_owned()
}

/// The kernel DMAs (or bounce-copies) the Identify data into this; page alignment keeps it on
/// the zero-copy path.
#[repr(C, align(4096))]
struct IdentifyPage([u8; IDENTIFY_DATA_BYTES]);

/// Opens read-only and non-blocking: a FIFO or tty passed by mistake must not hang the open,
/// and the NVMe and block ioctls used here need no write access.
fn open_for_ioctl(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Issues Identify Controller to `path`, an NVMe controller (`/dev/nvme0`) or one of its
/// namespaces (`/dev/nvme0n1`). A file that is not NVMe answers `ENOTTY` (or `EINVAL`); a
/// controller device without `CAP_SYS_ADMIN` answers `EACCES`. An NVMe status code from the
/// device itself comes back as an `io::ErrorKind::Other` naming the status.
pub fn identify_controller(path: &Path) -> io::Result<ControllerIdentity> {
    let file = open_for_ioctl(path)?;
    let mut page = Box::new(IdentifyPage([0; IDENTIFY_DATA_BYTES]));
    let mut cmd = sys::nvme_admin_cmd {
        opcode: ADMIN_OPCODE_IDENTIFY,
        addr: page.0.as_mut_ptr() as u64,
        data_len: IDENTIFY_DATA_BYTES as u32,
        cdw10: IDENTIFY_CNS_CONTROLLER,
        ..Default::default()
    };
    // SAFETY: `file` is an open descriptor for the whole call. NVME_IOCTL_ADMIN_CMD takes a
    // pointer to a `struct nvme_admin_cmd`, whose layout bindgen generated from the kernel
    // header and whose size is encoded in the request number. The kernel writes at most
    // `data_len` = 4096 bytes to `addr`, which points at `page`, a live, exclusively borrowed
    // 4096-byte buffer; it writes `cmd.result`, which we own mutably. Neither is touched again
    // until the call returns.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            NVME_IOCTL_ADMIN_CMD as libc::Ioctl,
            &mut cmd as *mut sys::nvme_admin_cmd,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc > 0 {
        return Err(io::Error::other(format!(
            "identify controller on {}: NVMe status {rc:#x}",
            path.display()
        )));
    }
    Ok(ControllerIdentity::parse(&page.0))
}

/// Size in bytes of the block device at `path`. A regular file or a character device answers
/// `ENOTTY`; use its metadata instead.
pub fn block_device_size(path: &Path) -> io::Result<u64> {
    let file = open_for_ioctl(path)?;
    let mut size_bytes: u64 = 0;
    // SAFETY: `file` is an open descriptor for the whole call. BLKGETSIZE64 writes one u64
    // through its argument (the kernel's `put_u64`, whatever `size_t` is), and the argument
    // points at `size_bytes`, a live, exclusively borrowed u64.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64 as libc::Ioctl,
            &mut size_bytes as *mut u64,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size_bytes)
}

/// The NVMe controller character devices (`/dev/nvme<N>`) of this host, in controller order:
/// every `nvme<N>` that `/sys/class/nvme` lists and that has a character device node in
/// `/dev`. Empty when the host has no NVMe driver or no drives (or sysfs is not mounted).
pub fn local_nvme_controllers() -> Vec<PathBuf> {
    controllers_in(Path::new(SYS_CLASS_NVME), Path::new("/dev"))
}

/// [`local_nvme_controllers`] over a given sysfs class directory and device directory.
fn controllers_in(sys_class: &Path, dev_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(sys_class) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .take(CONTROLLERS_MAX)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let index = controller_index(&name)?;
            let dev = dev_dir.join(&name);
            let is_char = fs::metadata(&dev).ok()?.file_type().is_char_device();
            is_char.then_some((index, dev))
        })
        .collect();
    // Numeric, so nvme10 comes after nvme2.
    found.sort_unstable_by_key(|(index, _)| *index);
    found.into_iter().map(|(_, dev)| dev).collect()
}

/// `nvme<digits>` → the digits; anything else (namespaces `nvme0n1`, `nvme-fabrics`) → None.
fn controller_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nvme")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn assert_not_nvme(err: &io::Error) {
        let errno = err.raw_os_error();
        assert!(
            errno == Some(libc::ENOTTY) || errno == Some(libc::EINVAL),
            "expected ENOTTY or EINVAL, got {err:?}"
        );
    }

    #[test]
    fn admin_ioctl_number_and_struct_size_match_the_kernel() {
        assert_eq!(size_of::<sys::nvme_admin_cmd>(), 72);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xC048_4E41);
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn blkgetsize64_number_matches_the_kernel() {
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }

    #[test]
    fn identify_page_fields_are_sliced_and_trimmed() {
        let mut page = [0u8; IDENTIFY_DATA_BYTES];
        page[4..24].copy_from_slice(b"S4EVNX0N123456      ");
        page[24..64].copy_from_slice(b"Samsung SSD 980 PRO 1TB                 ");
        page[64..72].copy_from_slice(b"5B2QGXA7");
        page[72] = b'X'; // the next field must not leak into FR
        let id = ControllerIdentity::parse(&page);
        assert_eq!(id.serial, "S4EVNX0N123456");
        assert_eq!(id.model, "Samsung SSD 980 PRO 1TB");
        assert_eq!(id.firmware, "5B2QGXA7");
    }

    #[test]
    fn identify_page_nul_padding_is_trimmed() {
        let mut page = [0u8; IDENTIFY_DATA_BYTES];
        page[4..8].copy_from_slice(b"  SN");
        let id = ControllerIdentity::parse(&page);
        assert_eq!(id.serial, "SN");
        assert_eq!(id.model, "");
        assert_eq!(id.firmware, "");
    }

    #[test]
    fn identify_on_a_regular_file_is_an_error() {
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(&[0u8; 4096]).expect("write");
        let err = identify_controller(file.path()).expect_err("a regular file is not NVMe");
        assert_not_nvme(&err);
    }

    #[test]
    fn identify_on_dev_null_is_an_error() {
        let err = identify_controller(Path::new("/dev/null")).expect_err("/dev/null is not NVMe");
        assert_not_nvme(&err);
    }

    #[test]
    fn identify_on_a_missing_path_is_not_found() {
        let err =
            identify_controller(Path::new("/dev/evstor-no-such-device")).expect_err("missing path");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn block_size_of_a_regular_file_is_enotty() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let err = block_device_size(file.path()).expect_err("a regular file is not a block device");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY), "{err:?}");
    }

    /// Every block device sysfs knows and we may open must report the size sysfs reports
    /// (`/sys/class/block/<name>/size` counts 512-byte sectors). Runs against whatever the host
    /// has (on the build machine: vda, loop*, zram0, when run as root).
    #[test]
    fn block_device_size_agrees_with_sysfs() {
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
            let name = entry.file_name();
            let dev = Path::new("/dev").join(&name);
            // Loop devices are attached and detached by other tests meanwhile; the loop
            // device test checks one it owns.
            if entry.file_name().to_string_lossy().starts_with("loop") {
                continue;
            }
            let Ok(sectors) = fs::read_to_string(entry.path().join("size")) else {
                continue;
            };
            let sectors: u64 = sectors.trim().parse().expect("sysfs size is a number");
            match block_device_size(&dev) {
                Ok(size_bytes) => {
                    assert_eq!(size_bytes, sectors * 512, "{}", dev.display());
                    checked += usize::from(size_bytes > 0);
                }
                // No node in this /dev, not ours to open, or a device that refuses opens.
                Err(e) => eprintln!("skipping {}: {e}", dev.display()),
            }
        }
        // Often none with data can be opened (containers refuse /dev/vda even to root);
        // `a_loop_device_is_as_large_as_its_backing_file` always checks one.
        eprintln!("checked {checked} block devices with data");
    }

    /// The listing logic against a made-up sysfs and /dev: controllers only (no namespaces,
    /// no `nvme-fabrics`), only with a character device node, in numeric order.
    #[test]
    fn controllers_are_listed_from_sysfs_with_char_device_nodes_in_order() {
        let root = tempfile::tempdir().expect("tempdir");
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        for d in [&sys, &dev] {
            fs::create_dir(d).expect("mkdir");
        }
        for name in [
            "nvme10",
            "nvme2",
            "nvme0",
            "nvme0n1",
            "nvme-fabrics",
            "nvme3",
            "nvme4",
        ] {
            fs::create_dir(sys.join(name)).expect("sysfs entry");
        }
        // /dev/null is a character device anyone may point at; nvme3's node is a plain file
        // and nvme4 has none.
        for name in ["nvme10", "nvme2", "nvme0", "nvme0n1", "nvme-fabrics"] {
            std::os::unix::fs::symlink("/dev/null", dev.join(name)).expect("symlink");
        }
        fs::write(dev.join("nvme3"), b"").expect("plain file");
        let found = controllers_in(&sys, &dev);
        let want: Vec<PathBuf> = ["nvme0", "nvme2", "nvme10"]
            .iter()
            .map(|n| dev.join(n))
            .collect();
        assert_eq!(found, want);
        assert!(controllers_in(&root.path().join("absent"), &dev).is_empty());
    }

    #[test]
    fn a_loop_device_is_as_large_as_its_backing_file() {
        let backing = tempfile::NamedTempFile::new().expect("tempfile");
        backing.as_file().set_len(24 << 20).expect("set_len");
        let Some(dev) = crate::testing::LoopDevice::attach_or_skip(backing.path()) else {
            return;
        };
        assert_eq!(
            block_device_size(dev.path()).expect("BLKGETSIZE64"),
            24 << 20
        );
        let err = identify_controller(dev.path()).expect_err("a loop device is not NVMe");
        assert_not_nvme(&err);
    }

    #[test]
    fn controller_names_are_parsed_strictly() {
        assert_eq!(controller_index("nvme0"), Some(0));
        assert_eq!(controller_index("nvme12"), Some(12));
        assert_eq!(controller_index("nvme0n1"), None);
        assert_eq!(controller_index("nvme-fabrics"), None);
        assert_eq!(controller_index("nvme"), None);
        assert_eq!(controller_index("sda"), None);
    }

    /// Agrees with `/sys/class/nvme` (empty on this build machine), and when a controller does
    /// exist, Identify answers with a serial number.
    #[test]
    fn local_controllers_agree_with_sysfs_and_identify() {
        let listed: Vec<String> = fs::read_dir(SYS_CLASS_NVME)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| controller_index(name).is_some())
                    .collect()
            })
            .unwrap_or_default();
        let found = local_nvme_controllers();
        if listed.is_empty() {
            assert!(
                found.is_empty(),
                "{found:?} without /sys/class/nvme entries"
            );
        }
        for dev in &found {
            let name = dev
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            assert!(listed.iter().any(|l| l == name), "{name} not in sysfs");
            assert!(fs::metadata(dev)
                .expect("exists")
                .file_type()
                .is_char_device());
            match identify_controller(dev) {
                Ok(id) => assert!(!id.serial.is_empty(), "{}: {id:?}", dev.display()),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    eprintln!("{}: identify needs CAP_SYS_ADMIN: {e}", dev.display())
                }
                Err(e) => panic!("identify {}: {e}", dev.display()),
            }
        }
    }
}
