// A throwaway namespace with ovl's kernel programs loaded and one network's
// maps filled, and the frames to run through them with BPF_PROG_TEST_RUN.

//! Shared by the golden-packet tests (`tests/golden.rs`) and the
//! micro-benchmark (`ovl-bench`'s `ovl-microbench`, which includes this module
//! by path); each uses part of it.

pub mod fixture;
pub mod frames;

/// Program return codes as BPF_PROG_TEST_RUN reports them.
pub mod action {
    /// XDP verdicts (uapi `enum xdp_action`).
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_REDIRECT: u32 = 4;
    /// TC verdicts (uapi `TC_ACT_*`).
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
}

/// Keeps the calling thread on CPU 0. A test run runs where its caller
/// does, and decap's flow cache is per CPU: a thread that moved between
/// two runs would find the second one's cache empty.
pub fn stay_on_one_cpu() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(anyhow::Error::from(std::io::Error::last_os_error())
                .context("pin the thread to CPU 0"));
        }
    }
    Ok(())
}
