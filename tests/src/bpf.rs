//! Programs of "another tool" for tests that put them beside ovl's: the
//! smallest BPF program (`r0 = verdict; exit`) loaded, pinned and linked
//! with raw bpf(2), as any other loader would.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result};

/// bpf(2) commands and kinds used here (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;

/// The program types tests load.
#[derive(Clone, Copy)]
pub enum ProgramKind {
    /// BPF_PROG_TYPE_XDP.
    Xdp = 6,
    /// BPF_PROG_TYPE_SCHED_CLS (TC and TCX).
    SchedCls = 3,
}

/// bpf(`cmd`, `attr`): its non-negative result.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed; the pointers
    // in it live until the call returns.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// bpf(`cmd`, `attr`) for a command that returns a new descriptor.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = verdict; exit` as a program of `kind` called `name` (the
/// kernel keeps 15 bytes of it).
pub fn load_trivial(kind: ProgramKind, name: &str, verdict: i32) -> Result<OwnedFd> {
    let mut insns = [0u8; 16];
    insns[0] = 0xb7; // r0 = imm
    insns[4..8].copy_from_slice(&verdict.to_le_bytes());
    insns[8] = 0x95; // exit
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(kind as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let name = name.as_bytes();
    let len = name.len().min(15);
    attr[48..48 + len].copy_from_slice(&name[..len]);
    bpf_fd(BPF_PROG_LOAD, &mut attr).context("bpf(BPF_PROG_LOAD)")
}

/// Pins `prog` at `path` (in a bpffs).
pub fn pin(prog: &OwnedFd, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pin at {}", path.display()))?;
    Ok(())
}

/// Links `prog` (SchedCls) to TCX ingress of interface `ifindex` of the
/// calling thread's namespace; the link lasts as long as the descriptor.
pub fn link_tcx_ingress(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
    bpf_fd(BPF_LINK_CREATE, &mut attr).context("bpf(BPF_LINK_CREATE) on TCX ingress")
}
