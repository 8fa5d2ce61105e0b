// Ctrl-C (SIGINT) and SIGTERM on a running benchmark: its labs must go
// with it — namespaces, the processes in them, mounts and temp dirs.

//! Drives the real `ovl-bench` binary: `--hold bare` builds the bare
//! underlay's lab (two routed hosts, iperf3 and sockperf servers) and
//! waits on standard input, exactly where a user presses Ctrl-C instead
//! of Enter. Requires root, iperf3 and sockperf (`cargo xtask setup`).

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the lab may take to come up (it waits for the servers).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the harness may take to remove its lab once signalled.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The held harness; killed, and whatever a dead run left swept, when the
/// test ends — also when it fails.
struct Harness {
    child: Child,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Err(error) = ovl_tests::remove_stale_labs() {
            eprintln!("sweeping the harness's leftovers failed: {error:#}");
        }
    }
}

/// `ip netns list` names of the labs of process `pid`.
fn lab_namespaces_of(pid: u32) -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list runs");
    let marker = format!("-{pid}-");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(ovl_tests::LAB_NAME_PREFIX) && name.contains(&marker))
        .map(str::to_string)
        .collect()
}

/// The processes inside namespace `name`.
fn pids_in(name: &str) -> Vec<i32> {
    let output = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .expect("ip netns pids runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Lab temp dirs and mounts of process `pid` under the temp dir.
fn lab_dirs_and_mounts_of(pid: u32) -> Vec<String> {
    let marker = format!("-{pid}-");
    let temp = std::env::temp_dir();
    let mut found: Vec<String> = std::fs::read_dir(&temp)
        .expect("temp dir lists")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(ovl_tests::LAB_NAME_PREFIX) && name.contains(&marker))
        .collect();
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts read");
    found.extend(
        mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|mount| Path::new(mount).starts_with(&temp) && mount.contains(&marker))
            .map(str::to_string),
    );
    found
}

/// Starts `ovl-bench --hold bare` in a process group of its own (as a
/// shell's job) and returns once its lab is up.
fn hold_bare_lab() -> Harness {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ovl-bench"))
        // The bare underlay runs no ovl.
        .args(["--ovl", "/nonexistent/ovl", "--hold", "bare"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("ovl-bench starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("ovl-bench: {line}");
            if line.contains("Press Enter") {
                let _ = ready_tx.send(());
            }
        }
    });
    let harness = Harness { child };
    ready_rx
        .recv_timeout(READY_TIMEOUT)
        .expect("ovl-bench --hold bare reports its lab up");
    harness
}

/// Signals the held harness's process group with `signal` (Ctrl-C reaches
/// the whole foreground group) and checks that it exits 128 + signal having
/// removed every namespace, process, mount and temp dir of its lab.
fn signal_removes_the_lab(signal: libc::c_int) {
    let mut harness = hold_bare_lab();
    let pid = harness.child.id();
    let namespaces = lab_namespaces_of(pid);
    assert!(
        namespaces.len() >= 3,
        "router and two hosts expected: {namespaces:?}"
    );
    let processes: Vec<i32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
    assert!(
        processes.len() >= 2,
        "iperf3 and sockperf servers expected in {namespaces:?}"
    );

    // SAFETY: signalling the group this test started.
    assert_eq!(unsafe { libc::kill(-(pid as i32), signal) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = harness
            .child
            .try_wait()
            .expect("ovl-bench can be waited for")
        {
            break status;
        }
        assert!(
            started.elapsed() < EXIT_TIMEOUT,
            "ovl-bench still runs {EXIT_TIMEOUT:?} after the signal"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(lab_namespaces_of(pid), Vec::<String>::new());
    let survivors: Vec<i32> = processes.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        survivors.is_empty(),
        "lab processes still run: {survivors:?}"
    );
    assert_eq!(lab_dirs_and_mounts_of(pid), Vec::<String>::new());
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "ovl-bench should exit {} after removing its lab, not die by the signal: {status:?} (signal {:?})",
        128 + signal,
        status.signal()
    );
}

#[test]
fn ctrl_c_on_a_held_lab_removes_it() {
    signal_removes_the_lab(libc::SIGINT);
}

#[test]
fn sigterm_on_a_held_lab_removes_it() {
    signal_removes_the_lab(libc::SIGTERM);
}
