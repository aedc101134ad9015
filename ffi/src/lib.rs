//! Bindings to the Linux NVMe ioctl UAPI (bindgen output lands with the block-store issue).
