// Scenario: a lab removes everything it made — namespaces, processes, bpffs
// mounts, temp dir — even when the test panics, and its processes are usable.

use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, ensure};
use ovl_tests::{Lab, Signal, run, wait_until};

/// What a lab made, recorded before the panic so it can be checked after.
#[derive(Default)]
struct Made {
    namespaces: Vec<String>,
    pid: Option<u32>,
    bpffs: Option<PathBuf>,
    tempdir: Option<PathBuf>,
}

#[test]
fn lab_cleans_up_after_panic() -> Result<()> {
    let made = Mutex::new(Made::default());
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new("panic").expect("lab");
        let (_router, hosts) = lab.routed_hosts(2).expect("routed hosts");
        lab.container("app").expect("container");
        let sleeper = lab
            .spawn(&hosts[0].netns, &["sleep", "60"], &[])
            .expect("spawn");
        let bpffs = lab.bpffs().expect("bpffs");
        {
            let mut made = made.lock().expect("record");
            made.namespaces = lab
                .namespaces()
                .iter()
                .map(|ns| ns.name().to_string())
                .collect();
            made.pid = Some(sleeper.pid());
            made.bpffs = Some(bpffs);
            made.tempdir = Some(lab.tempdir().to_path_buf());
        }
        panic!("scenario failed on purpose");
    }));
    ensure!(outcome.is_err(), "the closure was meant to panic");

    let made = made.into_inner().expect("record");
    ensure!(
        made.namespaces.len() == 4,
        "router, 2 hosts, container: {:?}",
        made.namespaces
    );
    let listing = String::from_utf8_lossy(&run(&["ip", "netns", "list"])?.stdout).into_owned();
    for name in &made.namespaces {
        ensure!(
            !listing
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} survived the panic"
        );
    }
    let pid = made.pid.expect("pid recorded");
    ensure!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "spawned pid {pid} survived"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let bpffs = made.bpffs.expect("bpffs recorded");
    ensure!(
        !mounts.contains(bpffs.to_string_lossy().as_ref()),
        "bpffs {} still mounted",
        bpffs.display()
    );
    let tempdir = made.tempdir.expect("tempdir recorded");
    ensure!(!tempdir.exists(), "temp dir {} survived", tempdir.display());
    Ok(())
}

#[test]
fn spawned_process_output_and_exit_are_observable() -> Result<()> {
    let lab = Lab::new("spawn")?;
    let netns = lab.netns("solo")?;
    let greeter = lab.spawn(
        &netns,
        &["sh", "-c", "echo \"ready in $OVLT_WHERE\"; exec sleep 30"],
        &[("OVLT_WHERE", netns.name())],
    )?;
    wait_until(Duration::from_secs(5), || {
        Ok(greeter.stdout()?.contains("ready in"))
    })?;
    ensure!(greeter.stdout()?.contains(netns.name()));
    ensure!(greeter.try_status()?.is_none(), "sleep exited early");

    greeter.signal(Signal::Terminate)?;
    let status = greeter.wait_timeout(Duration::from_secs(2))?;
    ensure!(
        status.signal() == Some(libc::SIGTERM),
        "unexpected exit: {status}"
    );
    ensure!(
        greeter.signal(Signal::Kill).is_err(),
        "signalling a dead process must fail"
    );
    Ok(())
}
