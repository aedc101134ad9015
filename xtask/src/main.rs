//! `cargo xtask`: the README's two commands on a fresh Debian/Ubuntu machine.
//!
//! - `cargo xtask serve [ARGS]`: installs what the build needs (libclang for bindgen, a C++
//!   compiler for RocksDB, the kernel UAPI headers), then runs `cargo run --release -- serve ARGS`.
//! - `cargo xtask test [ARGS]`: installs what the build and the tests need (plus etcd, losetup,
//!   promtool, Node.js with the npm package oidc-provider, and the host VM of
//!   `shared/tools/nvme-host-vm`), then runs `cargo fmt --check`,
//!   `.ci/clippy` and `cargo test --workspace ARGS` with nothing allowed to skip. `.ci/run` runs
//!   exactly this.
//! - `cargo xtask deps [serve|test]`: only the installation step.
//!
//! Packages are installed with `apt-get`, as root or through `sudo`; otherwise the command
//! stops and names what to install. It has no dependencies, so it builds in seconds before
//! anything else exists.

use std::env;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// A system package and why evstor needs it.
#[derive(Clone, Copy)]
struct Package {
    name: &'static str,
    why: &'static str,
}

/// What building evstor needs.
const BUILD: &[Package] = &[
    Package {
        name: "clang",
        why: "C++ compiler for RocksDB (built from source once)",
    },
    Package {
        name: "libclang-dev",
        why: "bindgen for librocksdb-sys and evstor-ffi",
    },
    Package {
        name: "linux-libc-dev",
        why: "<linux/nvme_ioctl.h>, bound by evstor-ffi",
    },
];

/// What the tests need beyond the build.
const TEST: &[Package] = &[
    Package {
        name: "mount",
        why: "losetup, for the tests that use a real block device",
    },
    Package {
        name: "etcd-server",
        why: "the etcd the cluster-mode tests start",
    },
    Package {
        name: "prometheus",
        why: "promtool, which checks the /metrics exposition",
    },
];

/// What a failed step reports.
type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    let (verb, rest) = match args.split_first() {
        Some((verb, rest)) => (verb.to_string_lossy().into_owned(), rest),
        None => (String::new(), &[][..]),
    };
    let outcome = match verb.as_str() {
        "serve" => serve(rest),
        "test" => test(rest),
        "deps" => match rest.first().map(|a| a.to_string_lossy()).as_deref() {
            None | Some("test") => install(&[BUILD, TEST].concat())
                .and_then(|()| oidc_provider())
                .and_then(|()| host_vm().map(drop)),
            Some("serve") => install(BUILD),
            Some(other) => Err(format!("unknown deps target {other:?} (serve or test)")),
        },
        _ => {
            eprintln!("usage: cargo xtask serve [EVSTOR SERVE ARGS] | test [CARGO TEST ARGS] | deps [serve|test]");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the build's packages, then replaces this process with the release server (so
/// Ctrl-C and signals reach `evstor serve` itself).
fn serve(args: &[OsString]) -> Result {
    install(BUILD)?;
    let err = cargo()
        .current_dir(root())
        .args(["run", "--release", "--", "serve"])
        .args(args)
        .exec();
    Err(format!("cannot run cargo: {err}"))
}

/// Installs everything, then runs the checks and the suite; nothing may be skipped unless the
/// caller said so with `EVSTOR_SKIP_HOST_VM`.
fn test(args: &[OsString]) -> Result {
    install(&[BUILD, TEST].concat())?;
    oidc_provider()?;
    let skip_vm = env::var_os("EVSTOR_SKIP_HOST_VM").is_some();
    let shared = if skip_vm { None } else { Some(host_vm()?) };
    let root = root();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("cargo fmt --check", fmt.current_dir(&root))?;
    step(
        ".ci/clippy",
        Command::new(root.join(".ci/clippy")).current_dir(&root),
    )?;
    let mut suite = cargo();
    suite.args(["test", "--workspace"]).args(args);
    if let Some(shared) = shared {
        suite.env("EVSTOR_SHARED", shared);
        // A test that cannot run (no host VM, no loop device, no io_uring) fails instead of
        // printing a line that `cargo test` hides and passing.
        suite.env("EVSTOR_REQUIRE_ALL", "1");
    }
    step("cargo test --workspace", suite.current_dir(&root))
}

/// Runs one step to completion, saying how long it took.
fn step(name: &str, cmd: &mut Command) -> Result {
    let started = Instant::now();
    eprintln!("xtask: {name} …");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let secs = started.elapsed().as_secs();
    if !status.success() {
        return Err(format!("{name} failed ({status}) after {secs} s"));
    }
    eprintln!("xtask: {name} passed in {secs} s");
    Ok(())
}

/// Installs the packages that are missing, as root or through sudo.
fn install(packages: &[Package]) -> Result {
    if !Path::new("/usr/bin/dpkg-query").exists() {
        let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
        eprintln!(
            "xtask: not a Debian/Ubuntu system; make sure these (or their equivalents) are installed: {}",
            names.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&Package> = packages.iter().filter(|p| !installed(p.name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for p in &missing {
        eprintln!("xtask: installing {} ({})", p.name, p.why);
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let mut apt = privileged("apt-get").ok_or_else(|| {
        format!(
            "these packages are missing and this user can neither install them nor sudo: \
             run `apt-get install {}` as root",
            names.join(" ")
        )
    })?;
    let mut update = privileged("apt-get").unwrap_or_else(|| Command::new("apt-get"));
    step("apt-get update", update.args(["update", "-q"]))?;
    apt.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive");
    step("apt-get install", &mut apt)
}

/// Whether dpkg has the package installed.
fn installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// `program` as root: directly when we are root, through non-interactive-capable `sudo`
/// otherwise; `None` when neither is possible.
fn privileged(program: &str) -> Option<Command> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        return Some(Command::new(program));
    }
    let sudo = Command::new("sudo").arg("-v").status().ok()?;
    if !sudo.success() {
        return None;
    }
    let mut cmd = Command::new("sudo");
    cmd.arg("-E").arg(program);
    Some(cmd)
}

/// Node.js (20 or later) and the npm package `oidc-provider`, the real OpenID Connect
/// provider the federation tests start (`tests/oidc`, pinned by its package-lock.json).
/// Debian 12's own nodejs is 18: a machine without node gets Debian's, and the version check
/// says what to do if that is too old.
fn oidc_provider() -> Result {
    let has = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("node") || !has("npm") {
        install(&[
            Package {
                name: "nodejs",
                why: "runs oidc-provider for the federation tests",
            },
            Package {
                name: "npm",
                why: "installs oidc-provider",
            },
        ])?;
    }
    let version = Command::new("node")
        .args(["-p", "process.versions.node.split('.')[0]"])
        .output()
        .map_err(|e| format!("cannot run node: {e}"))?;
    let major: u32 = String::from_utf8_lossy(&version.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    if major < 20 {
        return Err(format!(
            "Node.js {major} is too old for oidc-provider (tests/oidc): install Node.js 20 or \
             later (e.g. from deb.nodesource.com)"
        ));
    }
    let dir = root().join("tests/oidc");
    let installed = dir.join("node_modules/.package-lock.json");
    let fresh = match (
        std::fs::metadata(dir.join("package-lock.json")).and_then(|m| m.modified()),
        std::fs::metadata(&installed).and_then(|m| m.modified()),
    ) {
        (Ok(lock), Ok(done)) => done >= lock && dir.join("node_modules/oidc-provider").exists(),
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    let mut npm = Command::new("npm");
    npm.args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir);
    step("npm ci (tests/oidc)", &mut npm)
}

/// Prepares the Linux host VM the real-host tests boot (idempotent: builds its cache once);
/// returns the shared tools directory, which the tests find through `EVSTOR_SHARED`.
fn host_vm() -> Result<PathBuf> {
    let shared = env::var_os("EVSTOR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared"));
    let setup = shared.join("tools/nvme-host-vm/setup.sh");
    if !setup.exists() {
        return Err(format!(
            "the host VM tools are not at {} (set EVSTOR_SHARED to the directory holding \
             tools/nvme-host-vm, or EVSTOR_SKIP_HOST_VM=1 to run without the real-host tests)",
            setup.display()
        ));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&setup).env("EVSTOR_SHARED", &shared);
    step("host VM setup", &mut cmd)?;
    Ok(shared)
}

/// `cargo` as the one that runs us (`$CARGO`), else from `PATH`.
fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace root (this crate's parent directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
