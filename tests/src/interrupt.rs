// Ctrl-C and SIGTERM for programs that keep labs up outside a test
// harness (the benchmark, the demo): remove this process's labs, then exit.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};

use crate::{lab, stale};

/// The signals that end such a program: Ctrl-C and a polite `kill`.
const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Write end of the pipe the handler reports a signal on; -1 until
/// installed.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn report(signal: libc::c_int) {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; a full pipe only loses a
    // repeated signal, which changes nothing.
    unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
}

/// On SIGINT or SIGTERM, removes every lab this process made — kills the
/// processes in its namespaces, deletes them, unmounts its bpffs and tmpfs
/// mounts and removes its temp dirs — and exits with 128 + the signal.
///
/// Without this the signal's default action ends the process at once: no
/// `Lab` drops, and its agents, servers (each in a process group of its
/// own, so Ctrl-C does not reach them), namespaces and mounts stay until
/// another lab's stale sweep. A `Lab` cannot be dropped from another
/// thread while its owner uses it, so the cleanup removes by name what
/// [`remove_stale_labs`](crate::remove_stale_labs) would remove once this
/// process is dead, after closing the labs to anything new. `program`
/// prefixes the messages.
pub fn remove_labs_on_interrupt(program: &'static str) -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create the signal pipe");
    }
    // SAFETY: pipe2 just returned these and nothing else owns them.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), fds[1]) };
    if REPORT_FD
        .compare_exchange(-1, write_end, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: the write end is still only ours.
        unsafe { libc::close(write_end) };
        bail!("labs are already removed on interrupt in this process");
    }
    std::thread::Builder::new()
        .name("interrupt".to_string())
        .spawn(move || {
            let mut signal = [0u8; 1];
            let mut pipe = std::fs::File::from(read_end);
            if pipe.read_exact(&mut signal).is_err() {
                return;
            }
            remove_labs_and_exit(program, libc::c_int::from(signal[0]));
        })
        .context("cannot start the interrupt thread")?;
    for signal in SIGNALS {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only calls write(2).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = report as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // Restarted system calls: the program goes on undisturbed until the
        // cleanup ends it.
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is fully initialised and outlives the call.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot handle signal {signal}"));
        }
    }
    Ok(())
}

fn remove_labs_and_exit(program: &str, signal: libc::c_int) -> ! {
    let name = match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    };
    eprintln!("{program}: {name}: removing this run's labs (namespaces, processes, mounts)");
    lab::close_gate();
    match stale::remove_own_labs() {
        Ok(removed) => eprintln!("{program}: removed {removed} namespace(s); exiting"),
        Err(error) => eprintln!("{program}: removing the labs: {error:#}"),
    }
    std::process::exit(128 + signal)
}
