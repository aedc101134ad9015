/* The kernel UAPI that build.rs hands to bindgen. Only the structs are used: the ioctl
 * numbers are function-like macros bindgen cannot evaluate, so src/nvme.rs computes them. */
#include <linux/nvme_ioctl.h>
