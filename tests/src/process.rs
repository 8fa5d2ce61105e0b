// Background processes a `Lab` started inside its namespaces: signalling,
// waiting with a deadline, reading their logged output, and killing them.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The state letter of a `/proc/PID/stat` (or `/proc/PID/task/TID/stat`)
/// line: `R`, `S`, `T` (stopped), `Z` (zombie)... The command name before
/// it may hold spaces and parentheses, so it ends at the last `) `.
pub(crate) fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// How often a wait re-checks whether a process has exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The signals tests send to the processes they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: what Ctrl-C sends; the agent's graceful-shutdown trigger.
    Interrupt,
    /// SIGTERM: polite termination, sent first on cleanup.
    Terminate,
    /// SIGKILL: cannot be caught; the last resort on cleanup.
    Kill,
    /// SIGSTOP: freezes the process (what it is told meanwhile queues up).
    Stop,
    /// SIGCONT: lets a stopped process go on.
    Continue,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Interrupt => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Continue => libc::SIGCONT,
        }
    }
}

/// A process started by [`Lab::spawn`](crate::Lab::spawn). The lab keeps a
/// second handle and kills the process when it is dropped; this one lets the
/// test signal it, wait for it and read what it printed.
#[derive(Clone)]
pub struct ChildHandle {
    shared: Arc<SpawnedProcess>,
}

/// State shared between a [`ChildHandle`] and the lab that owns the process.
pub(crate) struct SpawnedProcess {
    child: Mutex<Child>,
    pid: u32,
    command_line: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildHandle {
    pub(crate) fn new(
        child: Child,
        command_line: String,
        stdout_path: PathBuf,
        stderr_path: PathBuf,
    ) -> Self {
        let pid = child.id();
        Self {
            shared: Arc::new(SpawnedProcess {
                child: Mutex::new(child),
                pid,
                command_line,
                stdout_path,
                stderr_path,
            }),
        }
    }

    pub(crate) fn shared(&self) -> Arc<SpawnedProcess> {
        Arc::clone(&self.shared)
    }

    /// The process id (also its process group id: each spawned process
    /// leads its own group so cleanup reaches its children too).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The command line it was started with, for messages.
    pub fn command_line(&self) -> &str {
        &self.shared.command_line
    }

    /// Sends `signal` to the process itself (not its group, so a graceful
    /// shutdown path sees exactly one signal). Fails if it already exited:
    /// a test that signals a dead process is testing the wrong thing.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.shared.signal(signal)
    }

    /// The exit status if the process has exited, `None` while it runs.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        self.shared.try_status()
    }

    /// Waits up to `timeout` for the process to exit and returns its exit
    /// status; fails (leaving it running for the lab to kill) on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ExitStatus> {
        match self.shared.wait_deadline(Instant::now() + timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "`{}` (pid {}) still running after {timeout:?}\n{}",
                self.command_line(),
                self.pid(),
                self.output_report()
            ),
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> Result<String> {
        read_log(&self.shared.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> Result<String> {
        read_log(&self.shared.stderr_path)
    }

    /// The file that collects the process's stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.shared.stdout_path
    }

    /// The file that collects the process's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.shared.stderr_path
    }

    /// Both output streams, labelled, for attaching to an assertion message.
    pub fn output_report(&self) -> String {
        self.shared.output_report()
    }
}

impl fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildHandle")
            .field("pid", &self.pid())
            .field("command_line", &self.command_line())
            .finish()
    }
}

impl SpawnedProcess {
    /// Locks the child even if a panicking thread poisoned the mutex:
    /// cleanup runs during unwinding and must still reach the process.
    fn child(&self) -> MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn command_line(&self) -> &str {
        &self.command_line
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let mut child = self.child();
        if let Some(status) = child.try_wait().context("cannot poll child")? {
            bail!(
                "cannot send {signal:?} to `{}` (pid {}): it already exited with {status}",
                self.command_line,
                self.pid
            );
        }
        // The child is not reaped (we hold its lock), so the pid cannot
        // have been reused by another process.
        send(self.pid as libc::pid_t, signal)
            .with_context(|| format!("cannot send {signal:?} to pid {}", self.pid))
    }

    /// Sends `signal` to the process group unless the leader was reaped
    /// (after reaping, the group id could name an unrelated group). Returns
    /// whether the process was still running.
    pub(crate) fn signal_group_if_running(&self, signal: Signal) -> bool {
        let mut child = self.child();
        match child.try_wait() {
            Ok(Some(_)) => false,
            Ok(None) => {
                if let Err(error) = send(-(self.pid as libc::pid_t), signal) {
                    eprintln!(
                        "ovl-tests: cannot send {signal:?} to group {}: {error}",
                        self.pid
                    );
                }
                true
            }
            Err(error) => {
                eprintln!("ovl-tests: cannot poll pid {}: {error}", self.pid);
                false
            }
        }
    }

    pub(crate) fn try_status(&self) -> Result<Option<ExitStatus>> {
        self.child().try_wait().context("cannot poll child")
    }

    /// Polls until the process exits or `deadline` passes; `None` on timeout.
    pub(crate) fn wait_deadline(&self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(EXIT_POLL_INTERVAL);
        }
    }

    pub(crate) fn output_report(&self) -> String {
        self.output_tail(usize::MAX)
    }

    /// Both output streams, each cut to its last `max_bytes` bytes.
    pub(crate) fn output_tail(&self, max_bytes: usize) -> String {
        let show = |path: &Path| match read_log(path) {
            Ok(text) if text.len() > max_bytes => {
                let mut start = text.len() - max_bytes;
                while !text.is_char_boundary(start) {
                    start += 1;
                }
                format!("[... {start} bytes cut ...]\n{}", &text[start..])
            }
            Ok(text) => text,
            Err(error) => format!("<unreadable: {error:#}>"),
        };
        format!(
            "--- `{}` (pid {}) stdout: {} ---\n{}\n--- stderr: {} ---\n{}",
            self.command_line,
            self.pid,
            self.stdout_path.display(),
            show(&self.stdout_path),
            self.stderr_path.display(),
            show(&self.stderr_path),
        )
    }
}

/// `kill(2)`: a positive target is a process, a negative one a group.
pub(crate) fn send(target: libc::pid_t, signal: Signal) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(target, signal.number()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a process with this pid exists (EPERM still means it exists).
pub(crate) fn is_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_log(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
