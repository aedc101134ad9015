//! The declared minimum Rust version is real: no locked dependency needs a newer one.

use serde_json::Value;

/// `1.89` and `1.89.0` compare equal.
fn version(v: &str) -> [u32; 3] {
    let mut parts = [0; 3];
    for (slot, p) in parts.iter_mut().zip(v.split('.')) {
        *slot = p.parse().unwrap_or(0);
    }
    parts
}

/// The host's target triple (`rustc -vV`).
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// Every dependency this platform builds (offline, so only those a build downloaded: the
/// lock file's Windows-only crates are not in a fresh machine's cache).
#[test]
fn rust_version_is_at_least_every_dependency_s() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = host_triple();
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let packages = meta["packages"].as_array().expect("packages");
    let mut needing = Vec::new();
    for p in packages {
        if let Some(needed) = p["rust_version"].as_str() {
            if version(needed) > ours {
                needing.push(format!("{} {} needs {needed}", p["name"], p["version"]));
            }
        }
    }
    assert!(
        packages.len() > 50,
        "cargo metadata listed the dependency graph"
    );
    assert!(
        needing.is_empty(),
        "rust-version {} is below what dependencies need: {needing:?}",
        env!("CARGO_PKG_RUST_VERSION")
    );
}
