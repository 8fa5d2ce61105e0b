// The `Lab` cleanup guard: owns every namespace, process, bpffs mount and
// temp dir a test makes, and removes all of them on drop, panic or not.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::netns::Netns;
use crate::process::{ChildHandle, Signal, SpawnedProcess};
use crate::stale;

/// Every namespace and temp dir a lab creates starts with this, so leftovers
/// of a killed run can be found (see [`remove_stale_labs`](crate::remove_stale_labs)).
pub const LAB_NAME_PREFIX: &str = "ovlt-";

/// How long a spawned process gets to exit after SIGTERM before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the kernel to reap a process after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How much of each spawned process's stdout and stderr a dropping lab
/// prints: the end of a log is where a failure shows.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// Longest tag kept in lab names: namespace names have no 15-byte limit
/// like interface names, but short names keep `ip` output readable.
const MAX_TAG_LEN: usize = 10;

/// Longest role kept in a namespace name.
const MAX_ROLE_LEN: usize = 20;

/// Numbers labs within this process so parallel tests get distinct names.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Leftovers of killed runs are swept once per test process, before its
/// first lab exists.
static STALE_SWEEP: Once = Once::new();

/// Serialises `ip netns add/del` within the process: iproute2 sets up the
/// shared `/run/netns` mount on first use, and parallel first uses race.
static NETNS_ADMIN: Mutex<()> = Mutex::new(());

/// Closed once an interrupt started removing this process's labs (see
/// [`remove_labs_on_interrupt`](crate::remove_labs_on_interrupt)): from then
/// on no lab makes a namespace, process, mount or temp dir the sweep could
/// miss.
static OPEN: Mutex<bool> = Mutex::new(true);

/// Held while a lab makes something only a sweep by name would find.
fn gate() -> Result<MutexGuard<'static, bool>> {
    let open = lock(&OPEN);
    if !*open {
        bail!("interrupted: this process's labs are being removed");
    }
    Ok(open)
}

/// Whether an interrupt closed the gate: its thread owns the cleanup.
fn interrupted() -> bool {
    !*lock(&OPEN)
}

/// Closes the gate once whatever a lab is making right now is made.
pub(crate) fn close_gate() {
    *lock(&OPEN) = false;
}

/// Fails, saying so, unless this process runs as root, as every lab needs:
/// for programs that build labs (the benchmark, the demo) to check before
/// anything slow or half-done. `program` is how the user started them.
pub fn require_root(program: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    match root_refusal(program, unsafe { libc::geteuid() }) {
        Some(refusal) => bail!("{refusal}"),
        None => Ok(()),
    }
}

fn root_refusal(program: &str, euid: libc::uid_t) -> Option<String> {
    (euid != 0).then(|| {
        format!(
            "{program} builds network namespaces, loads BPF programs and runs agents: \
             run it as root"
        )
    })
}

/// When a cleanup registered with [`Lab::on_cleanup`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupStage {
    /// While every process still runs (e.g. ask a daemon to remove what
    /// it made).
    BeforeProcesses,
    /// After the lab's processes were stopped (e.g. kill what they left
    /// outside their process groups and namespaces).
    AfterProcesses,
}

type Cleanup = Box<dyn FnOnce() + Send>;

/// A test's private world: the namespaces, background processes, bpffs
/// mounts and temp dir it created. Dropping the lab — including during a
/// panic's unwinding — stops the processes (SIGTERM, then SIGKILL), unmounts
/// the mounts, deletes the namespaces (which deletes their links) and
/// removes the temp dir. Failures during cleanup are printed, never raised.
///
/// Names are `ovlt-<tag>-<pid>-<n>[-<role>]`, unique per process and lab, so
/// tests run in parallel and a sweep can tell whose leftovers are dead.
pub struct Lab {
    prefix: String,
    tempdir: PathBuf,
    namespaces: Mutex<Vec<Netns>>,
    /// Namespaces deleted before the lab dropped whose `/etc/netns` entry
    /// may be left.
    deleted_namespaces: Mutex<Vec<String>>,
    processes: Mutex<Vec<Arc<SpawnedProcess>>>,
    mounts: Mutex<Vec<PathBuf>>,
    cleanups: Mutex<Vec<(CleanupStage, Cleanup)>>,
    next_item: AtomicU32,
}

impl Lab {
    /// Creates an empty lab named after `tag` (a short test name; anything
    /// but ASCII letters and digits is dropped) and its temp dir.
    ///
    /// The first lab of a process also sweeps leftovers of dead test
    /// processes (see [`remove_stale_labs`](crate::remove_stale_labs)).
    pub fn new(tag: &str) -> Result<Lab> {
        STALE_SWEEP.call_once(|| {
            if let Err(error) = stale::remove_stale_labs() {
                eprintln!("ovl-tests: sweeping stale labs failed: {error:#}");
            }
        });
        let mut tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(MAX_TAG_LEN)
            .collect();
        if tag.is_empty() {
            tag = "lab".to_string();
        }
        let prefix = format!(
            "{LAB_NAME_PREFIX}{tag}-{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let tempdir = std::env::temp_dir().join(&prefix);
        let _open = gate()?;
        fs::create_dir(&tempdir)
            .with_context(|| format!("cannot create lab temp dir {}", tempdir.display()))?;
        Ok(Lab {
            prefix,
            tempdir,
            namespaces: Mutex::new(Vec::new()),
            deleted_namespaces: Mutex::new(Vec::new()),
            processes: Mutex::new(Vec::new()),
            mounts: Mutex::new(Vec::new()),
            cleanups: Mutex::new(Vec::new()),
            next_item: AtomicU32::new(0),
        })
    }

    /// The `ovlt-<tag>-<pid>-<n>` prefix of everything this lab names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's private directory (logs of spawned processes, bpffs mount
    /// points, scratch files); removed when the lab drops.
    pub fn tempdir(&self) -> &Path {
        &self.tempdir
    }

    /// The namespaces created so far, oldest first.
    pub fn namespaces(&self) -> Vec<Netns> {
        lock(&self.namespaces).clone()
    }

    /// Creates namespace `<prefix>-<role>` with `lo` up and IPv6 disabled
    /// (no router solicitations or MLD reports, so tests can count packets
    /// exactly). A role used twice gets a numeric suffix.
    pub fn netns(&self, role: &str) -> Result<Netns> {
        let role: String = role
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(MAX_ROLE_LEN)
            .collect();
        let netns = {
            let mut namespaces = lock(&self.namespaces);
            let taken: HashSet<&str> = namespaces.iter().map(Netns::name).collect();
            let mut name = format!("{}-{role}", self.prefix);
            let mut suffix = 1;
            while taken.contains(name.as_str()) {
                name = format!("{}-{role}{suffix}", self.prefix);
                suffix += 1;
            }
            {
                let _open = gate()?;
                let _admin = netns_admin();
                cmd::run(&["ip", "netns", "add", &name])?;
            }
            // Registered before any further step so a failure below still
            // leaves the namespace to the lab's cleanup.
            let netns = Netns::from_name(name);
            namespaces.push(netns.clone());
            netns
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        Ok(netns)
    }

    /// Gives the network namespace of process `pid` (a container some
    /// runtime made) the name `<prefix>-<role>`, so probes can run in it
    /// with `ip netns exec`. The lab removes the name when it drops, and
    /// kills what still runs in that namespace then.
    pub fn attach_netns(&self, role: &str, pid: u32) -> Result<Netns> {
        let name = format!("{}-{role}", self.prefix);
        let _open = gate()?;
        let _admin = netns_admin();
        cmd::run(&["ip", "netns", "attach", &name, &pid.to_string()])?;
        let netns = Netns::from_name(name);
        lock(&self.namespaces).push(netns.clone());
        Ok(netns)
    }

    /// Runs `cleanup` when the lab drops, at `stage`; cleanups of a stage
    /// run newest first.
    pub fn on_cleanup(&self, stage: CleanupStage, cleanup: impl FnOnce() + Send + 'static) {
        lock(&self.cleanups).push((stage, Box::new(cleanup)));
    }

    fn run_cleanups(&self, stage: CleanupStage) {
        let mut all = lock(&self.cleanups);
        let mut keep = Vec::new();
        let mut now = Vec::new();
        for (s, c) in all.drain(..) {
            if s == stage {
                now.push(c)
            } else {
                keep.push((s, c))
            }
        }
        *all = keep;
        drop(all);
        for cleanup in now.into_iter().rev() {
            cleanup();
        }
    }

    /// Starts `argv` in the background inside `netns` with extra environment
    /// `envs`; stdout and stderr go to files in the lab's temp dir. The lab
    /// stops the process (and any children it leaves in its process group)
    /// when it drops.
    pub fn spawn(
        &self,
        netns: &Netns,
        argv: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<ChildHandle> {
        let role = netns
            .name()
            .strip_prefix(&self.prefix)
            .unwrap_or(netns.name())
            .trim_start_matches('-')
            .to_owned();
        let program = argv.first().context("cannot spawn an empty command line")?;
        self.spawn_logged(&role, program, &netns.exec_argv(argv), envs)
    }

    /// Starts a Python TCP server in `netns` on `ip`:`port` that accepts
    /// one connection and runs `serve` (top-level Python, with the
    /// connection as `c` and the peer's address as `peer`); returns once
    /// it listens.
    pub fn python_tcp_server(
        &self,
        netns: &Netns,
        ip: Ipv4Addr,
        port: u16,
        serve: &str,
    ) -> Result<ChildHandle> {
        let script = format!(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{ip}', {port}))\n\
             s.listen(1)\n\
             print('listening', flush=True)\n\
             c, peer = s.accept()\n\
             {serve}\n"
        );
        let server = self.spawn(netns, &["/usr/bin/python3", "-c", &script], &[])?;
        crate::wait_until(Duration::from_secs(10), || {
            Ok(server.stdout()?.contains("listening"))
        })
        .with_context(|| format!("TCP server did not start:\n{}", server.output_report()))?;
        Ok(server)
    }

    /// Starts `argv` in the background in the test's own namespaces (for
    /// tools that enter namespaces themselves, like `nsenter`); otherwise
    /// as [`spawn`](Self::spawn).
    pub fn spawn_here(&self, argv: &[&str], envs: &[(&str, &str)]) -> Result<ChildHandle> {
        let program = argv.first().context("cannot spawn an empty command line")?;
        self.spawn_logged("root", program, argv, envs)
    }

    fn spawn_logged(
        &self,
        role: &str,
        program: &str,
        full_argv: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<ChildHandle> {
        let program_name = Path::new(program)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".to_string());
        let log_stem = format!("{:02}-{role}-{program_name}", self.next_item());
        let stdout_path = self.tempdir.join(format!("{log_stem}.stdout"));
        let stderr_path = self.tempdir.join(format!("{log_stem}.stderr"));
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("cannot create {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;

        let command_line = cmd::command_line(full_argv);
        let _open = gate()?;
        let child = Command::new(full_argv[0])
            .args(&full_argv[1..])
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Own process group: cleanup signals the group, reaching
            // whatever the process forked.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot spawn `{command_line}`"))?;
        let handle = ChildHandle::new(child, command_line, stdout_path, stderr_path);
        lock(&self.processes).push(handle.shared());
        Ok(handle)
    }

    /// Mounts a fresh bpffs on a directory in the lab's temp dir and returns
    /// its path. The mount is made in this process's (the root) mount
    /// namespace, so programs run with `ip netns exec` — which only remounts
    /// /sys — see it too. Lazily unmounted when the lab drops.
    pub fn bpffs(&self) -> Result<PathBuf> {
        let dir = self.tempdir.join(format!("bpffs-{}", self.next_item()));
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir_text = dir.to_string_lossy().into_owned();
        let _open = gate()?;
        cmd::run(&["mount", "-t", "bpf", "bpf", &dir_text])?;
        lock(&self.mounts).push(dir.clone());
        Ok(dir)
    }

    /// Mounts a fresh tmpfs on a directory in the lab's temp dir and returns
    /// its path: for data that must not wait on the machine's disk (a
    /// benchmark's etcd, whose every commit is an fsync). Lazily unmounted
    /// when the lab drops.
    pub fn tmpfs(&self) -> Result<PathBuf> {
        let dir = self.tempdir.join(format!("tmpfs-{}", self.next_item()));
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir_text = dir.to_string_lossy().into_owned();
        let _open = gate()?;
        cmd::run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "mode=0700",
            "tmpfs",
            &dir_text,
        ])?;
        lock(&self.mounts).push(dir.clone());
        Ok(dir)
    }

    fn next_item(&self) -> u32 {
        self.next_item.fetch_add(1, Ordering::Relaxed)
    }

    /// SIGTERM to every live process group, a shared grace period, then
    /// SIGKILL to whatever remains, and reap.
    fn stop_processes(&self) {
        let processes = lock(&self.processes).clone();
        let running: Vec<_> = processes
            .iter()
            .filter(|process| process.signal_group_if_running(Signal::Terminate))
            .collect();
        let deadline = Instant::now() + TERMINATE_GRACE;
        for process in running {
            if matches!(process.wait_deadline(deadline), Ok(Some(_))) {
                continue;
            }
            if process.signal_group_if_running(Signal::Kill) {
                match process.wait_deadline(Instant::now() + KILL_GRACE) {
                    Ok(Some(_)) => {}
                    Ok(None) => eprintln!(
                        "ovl-tests: `{}` survived SIGKILL for {KILL_GRACE:?}",
                        process.command_line()
                    ),
                    Err(error) => eprintln!(
                        "ovl-tests: cannot reap `{}`: {error:#}",
                        process.command_line()
                    ),
                }
            }
        }
        // libtest captures this and shows it only when the test fails,
        // whether by panic or by returning an error.
        for process in &processes {
            eprintln!("{}", process.output_tail(LOG_TAIL_BYTES));
        }
    }

    /// Kills processes still inside the lab's namespaces that are not its
    /// direct children (e.g. daemons that escaped their process group).
    fn kill_stragglers(&self) {
        for netns in lock(&self.namespaces).iter() {
            if let Err(error) = stale::kill_processes_in(netns.name(), stale::Reap::No) {
                eprintln!("ovl-tests: cannot empty namespace {netns}: {error:#}");
            }
        }
    }

    fn unmount_all(&self) {
        for dir in lock(&self.mounts).drain(..).rev() {
            let dir_text = dir.to_string_lossy().into_owned();
            if let Err(error) = cmd::run(&["umount", "-l", &dir_text]) {
                eprintln!("ovl-tests: cannot unmount {dir_text}: {error:#}");
            }
        }
    }

    /// Deletes namespace `netns` now (a container that goes away without
    /// telling ovl), so the lab does not delete it again.
    pub fn remove_netns(&self, netns: &Netns) -> Result<()> {
        self.delete_netns_keeping_etc(netns)?;
        remove_netns_etc(netns.name());
        Ok(())
    }

    /// Deletes namespace `netns` now as `ip netns del` does, leaving its
    /// `/etc/netns/NAME` to whoever wrote there (ovl's agent removes the
    /// resolv.conf of a namespace it collects); the lab removes what is
    /// still there when it drops.
    pub fn delete_netns_keeping_etc(&self, netns: &Netns) -> Result<()> {
        let mut namespaces = lock(&self.namespaces);
        let _admin = netns_admin();
        cmd::run(&["ip", "netns", "del", netns.name()])?;
        namespaces.retain(|n| n.name() != netns.name());
        lock(&self.deleted_namespaces).push(netns.name().to_owned());
        Ok(())
    }

    fn delete_namespaces(&self) {
        let mut namespaces = lock(&self.namespaces);
        let _admin = netns_admin();
        for netns in namespaces.drain(..).rev() {
            if let Err(error) = cmd::run(&["ip", "netns", "del", netns.name()]) {
                eprintln!("ovl-tests: cannot delete namespace {netns}: {error:#}");
            }
            remove_netns_etc(netns.name());
        }
        for name in lock(&self.deleted_namespaces).drain(..) {
            remove_netns_etc(&name);
        }
    }

    fn remove_tempdir(&self) {
        // Never recurse into a mount that failed to go away: removing files
        // there would delete another filesystem's content.
        match stale::mount_points_under(&self.tempdir) {
            Ok(mounts) if mounts.is_empty() => {
                if let Err(error) = fs::remove_dir_all(&self.tempdir) {
                    eprintln!(
                        "ovl-tests: cannot remove {}: {error}",
                        self.tempdir.display()
                    );
                }
            }
            Ok(mounts) => eprintln!(
                "ovl-tests: keeping {}: still mounted: {mounts:?}",
                self.tempdir.display()
            ),
            Err(error) => eprintln!(
                "ovl-tests: keeping {}: cannot read mounts: {error:#}",
                self.tempdir.display()
            ),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if interrupted() {
            // The interrupt thread is removing every lab of this process by
            // name and then ends it: cleaning up here too would race it,
            // and returning could let the process exit before it is done.
            loop {
                std::thread::park();
            }
        }
        // Processes first: they may hold pins in the bpffs and keep the
        // namespaces alive.
        self.run_cleanups(CleanupStage::BeforeProcesses);
        self.stop_processes();
        self.kill_stragglers();
        self.run_cleanups(CleanupStage::AfterProcesses);
        self.unmount_all();
        self.delete_namespaces();
        self.remove_tempdir();
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("tempdir", &self.tempdir)
            .finish_non_exhaustive()
    }
}

/// Removes `/etc/netns/NAME` (the per-namespace /etc files `ip netns
/// exec` mounts, such as the resolv.conf `ovl connect` writes), which a
/// namespace deleted without a disconnect leaves behind.
pub(crate) fn remove_netns_etc(name: &str) {
    let dir = Path::new("/etc/netns").join(name);
    if dir.exists()
        && let Err(error) = fs::remove_dir_all(&dir)
    {
        eprintln!("ovl-tests: cannot remove {}: {error}", dir.display());
    }
}

/// Locks `mutex` even when poisoned: cleanup runs while unwinding from a
/// panic and must still see the lab's records.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes the process-wide namespace administration lock.
pub(crate) fn netns_admin() -> MutexGuard<'static, ()> {
    lock(&NETNS_ADMIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_may_build_labs() {
        assert_eq!(root_refusal("cargo xtask demo", 0), None);
        let refusal = root_refusal("cargo xtask demo", 1000).expect("uid 1000 is refused");
        assert!(
            refusal.starts_with("cargo xtask demo builds network namespaces"),
            "{refusal}"
        );
        assert!(refusal.ends_with("run it as root"), "{refusal}");
    }
}
