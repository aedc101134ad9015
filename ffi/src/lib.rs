//! Linux NVMe and block-device ioctls behind safe wrappers.
//!
//! | module | role |
//! |---|---|
//! | `sys` (private) | bindgen layouts of `<linux/nvme_ioctl.h>`, generated at build time |
//! | [`nvme`] | ioctl numbers, [`identify_controller`], [`block_device_size`], [`local_nvme_controllers`] |
//! | `testing` (feature `testing`) | a loop device over a file, for tests that need a real block device |
//!
//! Architecture invariant: raw bindings never leave this crate; every `unsafe` block lives in
//! `nvme.rs` and carries a `// SAFETY:` comment. Operating errors (a file that is not an NVMe
//! device, a missing permission) come back as `io::Error` with the kernel's errno intact.

pub mod nvme;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use nvme::{
    block_device_size, identify_controller, local_nvme_controllers, ControllerIdentity,
};
