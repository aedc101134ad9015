//! Generates Rust layouts of the NVMe ioctl structs from the system's kernel headers
//! (`linux-libc-dev`), so they can never drift from what the running kernel expects.

use std::env;
use std::path::PathBuf;

fn main() {
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        // Emits rerun-if-changed for wrapper.h and every header it pulls in.
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_type("nvme_passthru_cmd")
        .derive_default(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!("bindgen on wrapper.h failed (needs libclang and linux-libc-dev): {e}")
        });
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    bindings
        .write_to_file(out_dir.join("nvme_ioctl.rs"))
        .expect("OUT_DIR is writable");
}
