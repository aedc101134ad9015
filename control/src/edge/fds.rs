//! The process's file descriptor budget: the soft `RLIMIT_NOFILE` is raised to the hard limit
//! at start, and the API's connection cap is sized from it so that the data path and RocksDB
//! keep the larger share (`API_FD_SHARE_DIVISOR` in `limits.rs` documents the split).

use std::io;

use crate::limits::{API_CONNECTIONS_MAX, API_CONNECTIONS_MIN, API_FD_SHARE_DIVISOR};

/// The open files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (to `fs.nr_open` if the hard one is
/// unlimited, the most Linux lets a process have). Never lowers it.
pub fn raise_open_files_limit() -> io::Result<OpenFiles> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into `lim`, a live local of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        nr_open().unwrap_or(soft_before).max(soft_before)
    } else {
        lim.rlim_max
    };
    if target > soft_before {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads `raised`, a live local of the right type.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(OpenFiles {
        soft_before,
        soft: target.max(soft_before),
        hard: lim.rlim_max,
    })
}

/// `fs.nr_open`: the ceiling of any process's open files limit.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The API's share of `open_files` descriptors, one per connection.
pub fn api_connections_max(open_files: u64) -> usize {
    let share = open_files / API_FD_SHARE_DIVISOR;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(API_CONNECTIONS_MIN, API_CONNECTIONS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_gets_a_quarter_within_bounds() {
        assert_eq!(api_connections_max(1024), 256);
        assert_eq!(api_connections_max(256), 64);
        assert_eq!(api_connections_max(20), API_CONNECTIONS_MIN);
        assert_eq!(api_connections_max(1 << 20), API_CONNECTIONS_MAX);
        assert_eq!(api_connections_max(u64::MAX), API_CONNECTIONS_MAX);
    }
}
