// Which BPF programs are hooked on a link of a lab namespace: XDP and legacy
// TC filters as bpftool reports them, TCX links through BPF_PROG_QUERY.

//! Debian's bpftool (7.1) predates TCX: `bpftool net` does not list the
//! TCX links that aya makes on kernels >= 6.6, and `bpftool link` shows
//! them without their device. So TCX attachments are asked of the kernel
//! directly, from a thread that has entered the link's namespace.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::thread;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Netns, cmd};

/// `enum bpf_cmd`: BPF_PROG_QUERY.
const BPF_PROG_QUERY: libc::c_long = 16;

/// `enum bpf_attach_type`: BPF_TCX_INGRESS and BPF_TCX_EGRESS.
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// Program ids one query returns at most; a link carries a handful.
const MAX_QUERIED_PROGRAMS: usize = 64;

/// One program hooked on a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookedProgram {
    /// Where: `xdp`, `tc/ingress`, `tcx/ingress`, `tcx/egress`, ...
    pub hook: String,
    /// The kernel's program id.
    pub id: u64,
    /// The program name (at most 15 characters), as bpftool reports it.
    pub name: String,
}

/// Every XDP, TC and TCX program hooked on `iface` in `netns`.
pub fn hooked_programs(netns: &Netns, iface: &str) -> Result<Vec<HookedProgram>> {
    let mut hooked = Vec::new();
    let out = netns.exec(&["bpftool", "-j", "net", "show", "dev", iface])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`bpftool net show dev {iface}` in {netns} is not JSON"))?;
    for section in v.as_array().into_iter().flatten() {
        for (hook, progs) in section.as_object().into_iter().flatten() {
            if hook == "flow_dissector" || hook == "netfilter" {
                continue;
            }
            for prog in progs.as_array().into_iter().flatten() {
                let id = prog["id"]
                    .as_u64()
                    .with_context(|| format!("no program id in {prog}"))?;
                let place = prog["kind"]
                    .as_str()
                    .or_else(|| prog["mode"].as_str())
                    .map(|k| format!("{hook}/{k}"))
                    .unwrap_or_else(|| hook.clone());
                // XDP entries carry no name; look it up by id.
                let name = match prog["name"].as_str() {
                    Some(name) => name.to_owned(),
                    None => program_name(id)?,
                };
                hooked.push(HookedProgram {
                    hook: place,
                    id,
                    name,
                });
            }
        }
    }
    for (hook, attach_type) in [
        ("tcx/ingress", BPF_TCX_INGRESS),
        ("tcx/egress", BPF_TCX_EGRESS),
    ] {
        for id in query_in(netns, iface, attach_type)? {
            hooked.push(HookedProgram {
                hook: hook.to_owned(),
                id: u64::from(id),
                name: program_name(id)?,
            });
        }
    }
    Ok(hooked)
}

/// The name of program `id` (program ids are global, not per namespace).
fn program_name(id: impl ToString) -> Result<String> {
    let id = id.to_string();
    let out = cmd::run(&["bpftool", "-j", "prog", "show", "id", &id])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`bpftool prog show id {id}` is not JSON"))?;
    Ok(v["name"].as_str().unwrap_or_default().to_owned())
}

/// The ids of programs attached to `iface` of `netns` at `attach_type`.
/// The query runs in a short-lived thread that enters the namespace, so
/// the test process itself never changes namespace.
fn query_in(netns: &Netns, iface: &str, attach_type: u32) -> Result<Vec<u32>> {
    let path = format!("/run/netns/{}", netns.name());
    let iface = iface.to_owned();
    thread::spawn(move || -> Result<Vec<u32>> {
        let ns = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns takes a valid descriptor we own; it switches only
        // this thread's network namespace, and the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("cannot enter {path}: {}", std::io::Error::last_os_error());
        }
        let name = CString::new(iface.clone())?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no link {iface} in {path}");
        }
        prog_query(ifindex, attach_type)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the BPF_PROG_QUERY thread panicked"))?
}

/// `union bpf_attr` as BPF_PROG_QUERY reads and writes it (the kernel's
/// `query` member, up to `revision`).
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

fn prog_query(ifindex: u32, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; MAX_QUERIED_PROGRAMS];
    let mut attr = ProgQueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_QUERIED_PROGRAMS as u32,
        ..ProgQueryAttr::default()
    };
    // SAFETY: `attr` is a properly laid out bpf_attr prefix whose size we
    // pass; `prog_ids` points at `ids`, which holds `prog_cnt` entries and
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        // ENOENT: no TCX entry on the device, so nothing attached; EINVAL:
        // a kernel before 6.6, which has no TCX to attach to.
        if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) {
            return Ok(Vec::new());
        }
        bail!("BPF_PROG_QUERY(ifindex {ifindex}, attach type {attach_type}): {error}");
    }
    let count = (attr.prog_cnt as usize).min(MAX_QUERIED_PROGRAMS);
    Ok(ids[..count].to_vec())
}
