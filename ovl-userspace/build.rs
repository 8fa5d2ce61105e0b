//! Builds ovl's kernel programs (crate `ovl-ebpf`, bpfel-unknown-none, nightly
//! with build-std) and hands the object to `ovl` to embed.
//!
//! `OVL_EBPF_SKIP=1` writes an empty object instead, for `cargo clippy`/`doc`
//! on machines without the eBPF toolchain; such an `ovl` refuses to attach.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("ovl-ebpf.o");
    println!("cargo:rerun-if-env-changed=OVL_EBPF_SKIP");
    if env::var_os("OVL_EBPF_SKIP").is_some_and(|v| v == "1") {
        fs::write(&object, []).expect("write empty eBPF stub");
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir
        .parent()
        .expect("ovl-userspace sits in the workspace");
    for dir in ["ovl-ebpf/src", "ovl-common/src"] {
        rerun_if_tree_changed(&workspace.join(dir));
    }
    // The eBPF rustflags live in ovl-ebpf/.cargo/config.toml, which the
    // nightly cargo below reads (run in that directory, RUSTFLAGS removed).
    for file in [
        "ovl-ebpf/Cargo.toml",
        "ovl-ebpf/.cargo/config.toml",
        "ovl-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(file).display());
    }

    // A target dir of its own (the outer cargo holds the lock on its own),
    // shared with `cargo xtask build-ebpf` and by debug and release builds.
    let target_dir = workspace.join("target/ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace.join("ovl-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--package",
            "ovl-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host target; none may leak in.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // `cargo install` puts bpf-linker in $CARGO_HOME/bin, which need not be
    // on PATH (e.g. under sudo or in CI shells).
    if let Some(cargo_home) = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let mut paths = vec![cargo_home.join("bin")];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        cmd.env(
            "PATH",
            env::join_paths(paths).expect("PATH entries are valid"),
        );
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run `rustup run nightly cargo` to build ovl-ebpf ({e}); run `cargo xtask setup`"
        )
    });
    if !status.success() {
        panic!(
            "building ovl-ebpf failed ({status}); run `cargo xtask setup` to install the \
             nightly rust-src and bpf-linker, or set OVL_EBPF_SKIP=1 to build without kernel programs"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/ovl");
    fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), object.display()));
}

fn rerun_if_tree_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                rerun_if_tree_changed(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
