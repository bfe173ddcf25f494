//! Builds the stages in functions/ for wasm32-wasip2 and tells the tests
//! where they are, so no test depends on a stage built by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = here
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf();
    let functions = root.join("functions");
    watch(&functions, &root.join("sdk"));

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(functions.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", functions.join("target"));
    // What cargo sets for this build script is not meant for the stages' build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        build.env_remove(var);
    }
    let status = build.status().unwrap_or_else(|err| {
        panic!(
            "cannot run cargo to build the stages in {}: {err}",
            functions.display()
        )
    });
    if !status.success() {
        panic!(
            "building the stages in {} for wasm32-wasip2 failed (see above); \
             is the target installed? scripts/setup installs it",
            functions.display()
        );
    }
    let out = functions.join("target/wasm32-wasip2/release");
    println!("cargo:rustc-env=RUNNEL_STAGES_DIR={}", out.display());
    println!("cargo:rustc-env=RUNNEL_REPO_DIR={}", root.display());
}

/// Reruns the build when a stage's or the SDK's sources change, and not when
/// the stages' own target folder does.
fn watch(functions: &Path, sdk: &Path) {
    let mut paths = vec![
        functions.join("Cargo.toml"),
        functions.join("Cargo.lock"),
        sdk.join("src"),
        sdk.join("wit"),
        sdk.join("macro/src"),
        sdk.join("Cargo.toml"),
    ];
    if let Ok(entries) = std::fs::read_dir(functions) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.join("Cargo.toml").is_file() {
                paths.push(path.join("Cargo.toml"));
                paths.push(path.join("src"));
            }
        }
    }
    for path in paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
