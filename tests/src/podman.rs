// A podman per simulated host (Debian's podman 4.3 with its CNI backend):
// private storage, run root, locks and CNI configuration directory inside
// the lab, and a guard that removes containers, mounts, namespaces and CNI
// leases even when the test fails.

//! Podman runs as `nsenter --net=/run/netns/HOST podman …` (only the network
//! namespace changes: under `ip netns exec` runc finds no cgroup mount), so
//! the CNI plugins it runs create their host-side links in HOST. Its
//! containers.conf sets explicit (empty) ulimits — the default raises
//! RLIMIT_NOFILE, which needs CAP_SYS_RESOURCE this machine kind lacks —
//! file locks and a tmp dir of its own, so parallel labs share nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::lab::lock;
use crate::{Lab, Netns, cmd, stale};

/// Where the reference CNI plugins (containernetworking-plugins) live.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Where libcni (inside podman) keeps ADD results and host-local its leases.
const CNI_STATE_DIR: &str = "/var/lib/cni";

/// The applets the busybox image links to.
const BUSYBOX_APPLETS: [&str; 13] = [
    "sh", "ping", "ip", "sleep", "nc", "cat", "echo", "ls", "sysctl", "ifconfig", "wc", "timeout",
    "nslookup",
];

/// A container podman started.
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub id: String,
    /// Its network namespace (podman's `SandboxKey`).
    pub netns: PathBuf,
}

/// One host's podman. Dropping it removes every container it ran and what
/// they left: processes, mounts, network namespaces and CNI state files.
pub struct Podman {
    host: Netns,
    root: PathBuf,
    runroot: PathBuf,
    conf: PathBuf,
    cni_dir: PathBuf,
    containers: Mutex<Vec<Container>>,
}

impl Podman {
    /// A podman for `host` with its state under the lab's temp dir, looking
    /// for CNI plugins in `plugin_dir` and the reference plugins' directory.
    pub fn new(lab: &Lab, host: &Netns, plugin_dir: &Path) -> Result<Podman> {
        let role = host
            .name()
            .strip_prefix(lab.prefix())
            .unwrap_or(host.name())
            .trim_start_matches('-');
        let dir = lab.tempdir().join(format!("podman-{role}"));
        let cni_dir = dir.join("cni");
        let tmp = dir.join("tmp");
        for d in [&cni_dir, &tmp] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = []\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n\
                 lock_type = \"file\"\ntmp_dir = \"{}\"\n\
                 [network]\nnetwork_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{}\", \"{REFERENCE_PLUGIN_DIR}\"]\n\
                 network_config_dir = \"{}\"\n",
                tmp.display(),
                plugin_dir.display(),
                cni_dir.display()
            ),
        )
        .with_context(|| format!("write {}", conf.display()))?;
        Ok(Podman {
            host: host.clone(),
            root: dir.join("root"),
            runroot: dir.join("runroot"),
            conf,
            cni_dir,
            containers: Mutex::new(Vec::new()),
        })
    }

    /// The directory podman reads network configuration lists from.
    pub fn cni_dir(&self) -> &Path {
        &self.cni_dir
    }

    /// Writes network configuration list `name`.conflist.
    pub fn add_network(&self, name: &str, conflist: &str) -> Result<()> {
        let path = self.cni_dir.join(format!("{name}.conflist"));
        fs::write(&path, conflist).with_context(|| format!("write {}", path.display()))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host.name()))
            .arg("podman")
            // runc, not podman's first choice crun: crun refuses a hybrid
            // cgroup layout whose v2 hierarchy holds any controller (here
            // hugetlb, on some machines of this kind: "cgroups in hybrid
            // mode not supported"), runc runs in it as dockerd's does.
            .arg("--runtime")
            .arg("runc")
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .stdin(Stdio::null());
        c
    }

    /// `podman args...` in the host's network namespace, whatever its exit.
    pub fn run_unchecked(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("cannot run podman {}", args.join(" ")))
    }

    /// `podman args...`; fails unless it exits 0. Returns stdout, trimmed.
    pub fn podman(&self, args: &[&str]) -> Result<String> {
        let out = self.run_unchecked(args)?;
        if !out.status.success() {
            bail!(
                "`podman {}` on {} failed with {}\n--- stdout ---\n{}--- stderr ---\n{}",
                args.join(" "),
                self.host,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(cmd::stdout_text(&out))
    }

    /// Imports image `tag` made offline from busybox-static: a rootfs of
    /// `/bin/busybox` and its applet links, no registry involved.
    pub fn import_busybox(&self, tag: &str) -> Result<()> {
        let rootfs = self.root.with_file_name("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
        fs::copy("/bin/busybox", bin.join("busybox"))
            .context("copy /bin/busybox (Debian package busybox-static)")?;
        for applet in BUSYBOX_APPLETS {
            let link = bin.join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link)
                    .with_context(|| format!("link {}", link.display()))?;
            }
        }
        fs::create_dir_all(rootfs.join("tmp")).context("create rootfs /tmp")?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("start tar")?;
        let out = self
            .command(&["import", "-", tag])
            .stdin(tar.stdout.context("tar stdout")?)
            .output()
            .context("run podman import")?;
        if !out.status.success() {
            bail!(
                "podman import {tag} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `podman run -d --name NAME --network NETWORK IMAGE argv...`; records
    /// the container for cleanup before anything can fail.
    pub fn run(&self, name: &str, network: &str, image: &str, argv: &[&str]) -> Result<Container> {
        let mut args = vec!["run", "-d", "--name", name, "--network", network, image];
        args.extend_from_slice(argv);
        let out = self.run_unchecked(&args)?;
        let id = cmd::stdout_text(&out);
        if !out.status.success() {
            bail!(
                "`podman run {name}` on {} failed with {}: {}",
                self.host,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let netns = self.podman(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            &id,
        ])?;
        let c = Container {
            name: name.to_owned(),
            id,
            netns: PathBuf::from(netns),
        };
        lock(&self.containers).push(c.clone());
        Ok(c)
    }

    /// `podman exec NAME argv...`; fails unless it exits 0. Returns stdout.
    pub fn exec(&self, name: &str, argv: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(argv);
        self.podman(&args)
    }

    /// `podman rm -f -t 0 NAME`.
    pub fn rm(&self, name: &str) -> Result<()> {
        self.podman(&["rm", "-f", "-t", "0", name]).map(|_| ())
    }

    fn cleanup(&self) {
        let containers = lock(&self.containers).clone();
        if let Err(e) = self.podman(&["rm", "-a", "-f", "-t", "0"]) {
            eprintln!("ovl-tests: podman cleanup on {}: {e:#}", self.host);
        }
        for c in &containers {
            // What `podman rm` could not stop: processes in the container's
            // namespace, then the namespace itself.
            if c.netns.exists() {
                if let Some(name) = c.netns.file_name().and_then(|n| n.to_str())
                    && let Err(e) = stale::kill_processes_in(name, stale::Reap::No)
                {
                    eprintln!("ovl-tests: {e:#}");
                }
                let path = c.netns.to_string_lossy().into_owned();
                let _ = cmd::run_unchecked(&["umount", "-l", &path]);
                let _ = fs::remove_file(&c.netns);
            }
            remove_cni_state(&c.id);
        }
        // conmon processes of this podman name its storage on their
        // command line.
        kill_processes_naming(&self.root);
        let dir = self.root.parent().unwrap_or(&self.root);
        match stale::mount_points_under(dir) {
            Ok(mut mounts) => {
                mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
                for m in mounts {
                    let m = m.to_string_lossy().into_owned();
                    if let Err(e) = cmd::run(&["umount", "-l", &m]) {
                        eprintln!("ovl-tests: {e:#}");
                    }
                }
            }
            Err(e) => eprintln!("ovl-tests: {e:#}"),
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Removes libcni's cached results and host-local leases of container `id`.
fn remove_cni_state(id: &str) {
    let results = Path::new(CNI_STATE_DIR).join("results");
    for entry in fs::read_dir(&results).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().contains(id) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let networks = Path::new(CNI_STATE_DIR).join("networks");
    for net in fs::read_dir(&networks).into_iter().flatten().flatten() {
        for lease in fs::read_dir(net.path()).into_iter().flatten().flatten() {
            let held = fs::read_to_string(lease.path()).unwrap_or_default();
            if held.lines().next() == Some(id) {
                let _ = fs::remove_file(lease.path());
            }
        }
    }
}

/// SIGKILLs every process whose command line mentions `path`.
fn kill_processes_naming(path: &Path) {
    let needle = path.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != std::process::id() as libc::pid_t && cmdline.contains(&needle) {
            // SAFETY: kill(2) with a pid read from /proc; ESRCH is harmless.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
