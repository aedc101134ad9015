//! Raw bindgen output for `<linux/nvme_ioctl.h>`. Private to this crate: only `nvme.rs`
//! touches these types, and nothing outside `ffi` ever sees them.

#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]

include!(concat!(env!("OUT_DIR"), "/nvme_ioctl.rs"));

/// The header spells this `#define nvme_admin_cmd nvme_passthru_cmd`, a macro bindgen cannot
/// turn into a type; the admin ioctl takes exactly that struct.
pub type nvme_admin_cmd = nvme_passthru_cmd;
