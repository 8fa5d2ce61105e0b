//! Counting: every outcome of every program lands in the per-network
//! per-CPU counters (drops by reason) or in the node-wide counters.

use aya_ebpf::programs::TcContext;
use ovl_common::{DropReason, VniCounters};

use crate::maps::{GLOBAL, STATS};

/// Wire-size packets the frame stands for, as every counter counts it:
/// its segments for a GSO or GRO super-packet, else one.
#[inline(always)]
pub fn gso_segs(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the program's own context.
    u64::from(unsafe { (*ctx.skb.skb).gso_segs }.max(1))
}

/// Adds to the counters in `slot` (a network's `stats_slot`, or
/// `UNATTRIBUTED_SLOT`). Only a slot beyond the array is missing.
#[inline(always)]
fn with_counters(slot: u32, f: impl FnOnce(&mut VniCounters)) {
    if let Some(c) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        f(unsafe { &mut *c });
    }
}

/// Counts a drop of `packets` packets: a GSO or GRO super-packet counts
/// as the wire-size packets it stands for, as every other counter does.
#[inline(always)]
pub fn drop(slot: u32, reason: DropReason, packets: u64) {
    let idx = reason as usize;
    with_counters(slot, |c| {
        if let Some(d) = c.drops.get_mut(idx) {
            *d += packets;
        }
    });
}

/// Counts frames encapsulated towards a remote VTEP.
#[inline(always)]
pub fn tx(slot: u32, packets: u64, bytes: u64) {
    with_counters(slot, |c| {
        c.tx_packets += packets;
        c.tx_bytes += bytes;
    });
}

/// Counts a frame decapsulated and delivered: `packets` wire-size
/// packets (more than one for a GRO super-packet), `bytes` in all.
#[inline(always)]
pub fn rx(slot: u32, packets: u64, bytes: u64) {
    with_counters(slot, |c| {
        c.rx_packets += packets;
        c.rx_bytes += bytes;
    });
}

/// Counts frames switched between two local containers.
#[inline(always)]
pub fn local(slot: u32, packets: u64) {
    with_counters(slot, |c| c.local_packets += packets);
}

/// Counts frames handed to the host's stack for external egress.
#[inline(always)]
pub fn egress(slot: u32, packets: u64) {
    with_counters(slot, |c| c.egress_packets += packets);
}

/// Counts an underlay report of a smaller path MTU to a remote VTEP.
#[inline(always)]
pub fn path_mtu_report() {
    if let Some(c) = GLOBAL.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { (*c).path_mtu_reports += 1 };
    }
}

/// Counts an ARP request answered by proxy.
#[inline(always)]
pub fn arp_reply(slot: u32) {
    with_counters(slot, |c| c.arp_replies += 1);
}

/// Counts one underlay frame, and whether it went on to the host stack.
#[inline(always)]
pub fn underlay(passed: bool) {
    if let Some(c) = GLOBAL.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.passed += u64::from(passed);
    }
}
