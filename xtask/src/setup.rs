// `cargo xtask setup`: checks, and installs only when missing, the nightly
// toolchain and components, bpf-linker, and the Debian packages tests use.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{command, ebpf, workspace};

/// The toolchain channel that builds the kernel programs (`-Z build-std`).
const NIGHTLY: &str = "nightly";

/// Nightly components: `rust-src` for `build-std=core`; clippy and rustfmt
/// for linting the eBPF crate on its own target.
const NIGHTLY_COMPONENTS: [&str; 3] = ["rust-src", "clippy", "rustfmt"];

/// Components of the toolchain that builds userspace, for `lint`.
const HOST_COMPONENTS: [&str; 2] = ["clippy", "rustfmt"];

/// The bpf-linker release ovl is built with; it must be linked against the
/// nightly's own LLVM (see /work/shared/notes/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What `bpf-linker --version` starts with for an acceptable release.
const BPF_LINKER_BANNER: &str = "bpf-linker 0.13.";

/// Directory under `$CARGO_HOME` standing in for an LLVM install: its
/// `lib/` links to the nightly's libLLVM. bpf-linker keeps it as its
/// RUNPATH, so it must live as long as the installed binary.
const LLVM_PREFIX_DIR: &str = "ovl-llvm-prefix";

/// Debian packages the tests and benchmarks run: namespaces and routing,
/// probes, captures, load generators, scapy for crafted packets, bpftool,
/// etcd for the etcd store backend, Prometheus (server and promtool) that
/// scrapes the agent, curl, the font the benchmark chart's text is drawn
/// with, podman with the reference CNI plugins for the CNI plugin's
/// scenarios, Docker 20.10 (docker.io) and Docker Compose for the Docker
/// plugin's, busybox-static for their offline container image, what the
/// agent runs for external egress (nftables for the masquerade, conntrack
/// to forget a leaving container's translations) with netcat to open
/// connections through it, and for the DNS scenarios dnsmasq (the lab's
/// upstream resolver) and dig; strace, to stop a command at a chosen
/// system call (a connect killed half-way); systemd, whose
/// `systemd-analyze verify` checks the agent's unit.
const DEBIAN_PACKAGES: [&str; 28] = [
    "iproute2",
    "iputils-ping",
    "traceroute",
    "tcpdump",
    "tshark",
    "iperf3",
    "sockperf",
    "ethtool",
    "python3-scapy",
    "bpftool",
    "etcd-server",
    "etcd-client",
    "prometheus",
    "curl",
    "fonts-dejavu-core",
    "podman",
    "runc",
    "containernetworking-plugins",
    "dnsmasq-base",
    "dnsutils",
    "docker.io",
    "docker-compose",
    "busybox-static",
    "nftables",
    "conntrack",
    "netcat-openbsd",
    "strace",
    "systemd",
];

/// Debian packages the build itself needs: protoc and protobuf's
/// well-known types, for the etcd client's generated gRPC code.
const BUILD_PACKAGES: [&str; 2] = ["protobuf-compiler", "libprotobuf-dev"];

/// Makes sure the eBPF build can run: the nightly toolchain with its
/// components, the host toolchain's clippy and rustfmt, bpf-linker, and
/// the build's Debian packages. Changes nothing that is already present.
pub fn toolchain() -> Result<()> {
    install_missing(&BUILD_PACKAGES)?;
    ensure_nightly()?;
    let host = host_triple()?;
    ensure_components(NIGHTLY, &NIGHTLY_COMPONENTS, &host)?;
    let host_toolchain = active_toolchain()?;
    ensure_components(&host_toolchain, &HOST_COMPONENTS, &host)?;
    ensure_bpf_linker()
}

/// Makes sure every Debian package in [`DEBIAN_PACKAGES`] is installed,
/// running `apt-get update` and one `apt-get install` only if some is not.
pub fn packages() -> Result<()> {
    install_missing(&DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` is missing, with one `apt-get update`
/// and one `apt-get install`.
fn install_missing(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        if is_package_installed(package)? {
            report(&format!("Debian package {package}"), "present");
        } else {
            report(&format!("Debian package {package}"), "missing");
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }

    let by_hand = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        missing.join(" ")
    );
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{} Debian package(s) missing and installing them needs root; run as root:\n  {by_hand}",
            missing.len()
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    // Before the first update of a fresh machine the package lists are
    // empty and every install fails to find its package.
    let mut update = Command::new("apt-get");
    update.arg("update");
    command::run_step("apt-get update", &mut update)
        .with_context(|| format!("installing Debian packages failed; run by hand:\n  {by_hand}"))?;
    let mut install = Command::new("apt-get");
    // noninteractive: tshark asks whether non-root users may capture; CI has
    // no stdin, so the question must take its default instead of blocking.
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    command::run_step("apt-get install", &mut install)
        .with_context(|| format!("installing Debian packages failed; run by hand:\n  {by_hand}"))?;

    for package in missing {
        if !is_package_installed(package)? {
            bail!("apt-get install succeeded but {package} is still not installed");
        }
        report(&format!("Debian package {package}"), "installed");
    }
    Ok(())
}

/// `rustup run nightly PROGRAM`, cleared of the host-build variables an
/// outer cargo sets and with `$CARGO_HOME/bin` on PATH, where `cargo
/// install` puts bpf-linker and rustc looks for it.
pub fn nightly_command(program: &str) -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace::root())
        .args(["run", NIGHTLY, program]);
    for var in ebpf::HOST_BUILD_VARS {
        cmd.env_remove(var);
    }
    cmd.env("PATH", path_with_cargo_bin()?);
    Ok(cmd)
}

/// One line per checked thing, so a second run shows nothing changed.
fn report(thing: &str, state: &str) {
    eprintln!("xtask: {thing}: {state}");
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace::root());
    cmd
}

fn ensure_nightly() -> Result<()> {
    let list = command::stdout_of(rustup().args(["toolchain", "list"]))
        .context("rustup is required to build ovl (https://rustup.rs)")?;
    if list.lines().any(is_nightly_channel) {
        let version = command::stdout_of(nightly_command("rustc")?.arg("--version"))?;
        report(
            "nightly toolchain",
            &format!("present ({})", version.trim()),
        );
        return Ok(());
    }
    report("nightly toolchain", "missing, installing");
    // Minimal: the components it needs are added one by one below.
    command::run_step(
        "install the nightly toolchain",
        rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]),
    )
}

/// Whether a `rustup toolchain list` line is the moving `nightly` channel
/// (`nightly-<host>`), not a dated `nightly-YYYY-MM-DD-<host>` that
/// `rustup run nightly` would not pick.
fn is_nightly_channel(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or("");
    name == NIGHTLY
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The toolchain that builds userspace here, e.g.
/// `stable-x86_64-unknown-linux-gnu`.
fn active_toolchain() -> Result<String> {
    let shown = command::stdout_of(rustup().args(["show", "active-toolchain"]))?;
    shown
        .split_whitespace()
        .next()
        .map(str::to_string)
        .context("`rustup show active-toolchain` printed nothing")
}

fn ensure_components(toolchain: &str, wanted: &[&str], host: &str) -> Result<()> {
    let installed = command::stdout_of(rustup().args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    let mut missing = Vec::new();
    for &component in wanted {
        let thing = format!("{component} for {toolchain}");
        if installed
            .lines()
            .any(|line| is_component(line.trim(), component, host))
        {
            report(&thing, "present");
        } else {
            report(&thing, "missing, installing");
            missing.push(component);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    command::run_step(
        &format!("add components to {toolchain}"),
        rustup()
            .args(["component", "add", "--toolchain", toolchain])
            .args(&missing),
    )
}

/// Whether an installed-component line names `component`: target-less ones
/// are listed bare (`rust-src`), the rest with the host triple
/// (`clippy-x86_64-unknown-linux-gnu`).
fn is_component(line: &str, component: &str, host: &str) -> bool {
    line == component
        || line
            .strip_prefix(component)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|triple| triple == host)
}

/// The host triple, from `rustc -vV` (`host: x86_64-unknown-linux-gnu`).
fn host_triple() -> Result<String> {
    let verbose = command::stdout_of(
        Command::new("rustc")
            .current_dir(workspace::root())
            .arg("-vV"),
    )?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("host:"))
        .map(|host| host.trim().to_string())
        .with_context(|| format!("no host triple in `rustc -vV`:\n{verbose}"))
}

fn ensure_bpf_linker() -> Result<()> {
    let thing = format!(
        "bpf-linker {}x",
        BPF_LINKER_BANNER.trim_start_matches("bpf-linker ")
    );
    let mut found = Vec::new();
    for candidate in bpf_linker_candidates()? {
        match bpf_linker_version(&candidate) {
            Ok(version) if version.starts_with(BPF_LINKER_BANNER) => {
                report(
                    &thing,
                    &format!("present ({version}, {})", candidate.display()),
                );
                return Ok(());
            }
            Ok(version) => found.push(format!("{}: {version}", candidate.display())),
            Err(error) if is_not_found(&error) => {
                found.push(format!("{}: not found", candidate.display()))
            }
            Err(error) => found.push(format!("{}: {error:#}", candidate.display())),
        }
    }
    report(
        &thing,
        &format!(
            "missing ({}), building {BPF_LINKER_VERSION}",
            found.join("; ")
        ),
    );
    install_bpf_linker()?;

    let installed = cargo_home()?.join("bin/bpf-linker");
    match bpf_linker_version(&installed) {
        Ok(version) if version.starts_with(BPF_LINKER_BANNER) => {
            report(&thing, &format!("installed ({version})"));
            Ok(())
        }
        Ok(version) => bail!("installed bpf-linker reports `{version}`"),
        Err(error) => Err(error.context("the freshly installed bpf-linker does not run")),
    }
}

/// The one on PATH (what rustc will run), then the one `cargo install`
/// puts in `$CARGO_HOME/bin` (which the eBPF builds add to PATH).
fn bpf_linker_candidates() -> Result<Vec<PathBuf>> {
    Ok(vec![
        PathBuf::from("bpf-linker"),
        cargo_home()?.join("bin/bpf-linker"),
    ])
}

/// Whether `error` says a program does not exist at all.
fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|cause| cause.kind() == io::ErrorKind::NotFound)
}

/// `bpf-linker --version`, trimmed. Running it also proves the libLLVM it
/// was linked against still resolves.
fn bpf_linker_version(program: &Path) -> Result<String> {
    let version = command::stdout_of(Command::new(program).arg("--version"))?;
    Ok(version.trim().to_string())
}

/// Builds bpf-linker against the nightly's LLVM, as the toolchain notes
/// prove: no llvm-config exists, so `LLVM_PREFIX` points at a directory
/// whose `lib/` links to the nightly's libLLVM under both the plain name
/// (for the linker) and its SONAME (for the loader).
fn install_bpf_linker() -> Result<()> {
    let verbose = command::stdout_of(nightly_command("rustc")?.arg("-vV"))?;
    let llvm_major = llvm_major(&verbose)
        .with_context(|| format!("no LLVM version in `rustc +nightly -vV`:\n{verbose}"))?;
    let sysroot = command::stdout_of(nightly_command("rustc")?.args(["--print", "sysroot"]))?;
    let library = nightly_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let soname = library
        .file_name()
        .context("libLLVM path has no file name")?;

    let prefix = cargo_home()?.join(LLVM_PREFIX_DIR);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        replace_symlink(&library, &prefix_lib.join(name))?;
    }

    let mut install = nightly_command("cargo")?;
    install
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        // Reached only when no working 0.13 exists; an installed but broken
        // one (its libLLVM gone with an old nightly) must be replaced.
        .arg("--force");
    command::run_step("install bpf-linker", &mut install)
}

/// The LLVM major version from `rustc -vV` (`LLVM version: 22.1.4` → 22).
fn llvm_major(verbose: &str) -> Option<u32> {
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The nightly's real libLLVM shared object (`libLLVM.so.<ver>-rust-...`),
/// not the `libLLVM-NN-rust-*.so` linker script beside it.
fn nightly_libllvm(sysroot_lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
    let mut libraries: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("libLLVM.so.")
                && entry.file_type().is_ok_and(|kind| kind.is_file())
        })
        .map(|entry| entry.path())
        .collect();
    libraries.sort();
    libraries.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library",
            sysroot_lib.display()
        )
    })
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot replace {}", link.display()));
        }
    }
    symlink(target, link)
        .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))
}

/// `$CARGO_HOME`, by default `~/.cargo`.
fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// PATH with `$CARGO_HOME/bin` first unless it is already on it.
fn path_with_cargo_bin() -> Result<OsString> {
    let bin = cargo_home()?.join("bin");
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin);
    }
    std::env::join_paths(dirs).context("a PATH entry contains ':'")
}

fn is_package_installed(package: &str) -> Result<bool> {
    let output = command::capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("dpkg-query is missing: ovl's tests need a Debian-based machine")?;
    // Exit status 1 with "no packages found" is the ordinary "missing".
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout).trim() == "install ok installed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_nightly_is_recognised_but_dated_ones_are_not() {
        assert!(is_nightly_channel("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_nightly_channel(
            "nightly-x86_64-unknown-linux-gnu (active)"
        ));
        assert!(!is_nightly_channel(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_nightly_channel(
            "stable-x86_64-unknown-linux-gnu (default)"
        ));
    }

    #[test]
    fn components_match_bare_or_with_host_triple() {
        let host = "x86_64-unknown-linux-gnu";
        assert!(is_component("rust-src", "rust-src", host));
        assert!(is_component(
            "clippy-x86_64-unknown-linux-gnu",
            "clippy",
            host
        ));
        assert!(!is_component(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src",
            host
        ));
        assert!(!is_component("rustfmt-preview", "rustfmt", host));
        assert!(!is_component(
            "rust-docs-x86_64-unknown-linux-gnu",
            "rust",
            host
        ));
    }

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let verbose = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\n\
                       release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(verbose), Some(22));
        assert_eq!(llvm_major("rustc 1.0.0\n"), None);
    }
}
