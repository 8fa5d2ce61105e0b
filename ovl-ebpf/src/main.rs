//! ovl's kernel programs. Entry points only: each wires the units
//! (parsing, ARP, encap, decap, counting) together and has one exit that
//! counts drops.
#![no_std]
#![no_main]
// The atomic fetching add of `maps::epoch_fenced` (BPF's target offers no
// `AtomicU64::fetch_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod arp;
mod decap;
mod egress;
mod encap;
mod gateway;
mod icmp;
mod ipv4;
mod maps;
mod packet;
mod pmtu;
mod stats;
mod verdict;

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use ovl_common::{DropReason, counters::UNATTRIBUTED_SLOT};

use crate::{packet::Frame, verdict::Dropped};

/// Underlay ingress at XDP: decapsulates VXLAN for local containers,
/// passes everything that is not ovl's.
#[xdp]
pub fn ovl_xdp_decap(ctx: XdpContext) -> u32 {
    let Some(node) = maps::node_config() else {
        stats::underlay(true);
        return decap::XDP_PASS;
    };
    let frame = Frame::of_xdp(&ctx);
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    // XDP runs on the underlay only: nothing here was decrypted.
    let outcome = match decap::inspect(&frame, frame_len, node, false) {
        Ok(None) => {
            stats::underlay(true);
            return decap::XDP_PASS;
        }
        Ok(Some(delivery)) => {
            stats::underlay(false);
            decap::deliver_xdp(&ctx, &frame, &delivery)
        }
        Err(dropped) => {
            stats::underlay(false);
            Err(dropped)
        }
    };
    outcome.unwrap_or_else(|d| {
        count_decap_drop(&ctx, d, 1);
        decap::XDP_DROP
    })
}

/// Underlay ingress at TC: the same decisions as `ovl_xdp_decap`, for
/// underlays where XDP would cost offloads. Also the ingress of the
/// agent's crypto device, where decrypted VXLAN of encrypted networks
/// comes in.
#[classifier]
pub fn ovl_tc_decap(ctx: TcContext) -> i32 {
    let Some(node) = maps::node_config() else {
        stats::underlay(true);
        return TC_ACT_OK;
    };
    // Headers must be in the linear area for direct access; the payload
    // is better left where it is (`decap::HDR_LEN`).
    let mut frame = Frame::of_skb_headers(&ctx, decap::HDR_LEN);
    let options = decap::outer_options_len(&frame);
    if options != 0 {
        frame = Frame::of_skb_headers(&ctx, decap::HDR_LEN + options);
    }
    // The same program runs on the crypto device, where the agent writes
    // what it decrypted.
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The underlay is never the crypto device: its frames skip the device
    // map's lookup (~8 % of the program's time under traffic).
    let decrypted = ifindex != node.underlay_ifindex && maps::crypto_device() == Some(ifindex);
    let outcome = match decap::inspect(&frame, ctx.len(), node, decrypted) {
        Ok(None) => {
            stats::underlay(true);
            return TC_ACT_OK;
        }
        Ok(Some(delivery)) => {
            stats::underlay(false);
            decap::deliver_tc(&ctx, &frame, &delivery)
        }
        Err(dropped) => {
            stats::underlay(false);
            Err(dropped)
        }
    };
    outcome.unwrap_or_else(|d| {
        count_decap_drop(&ctx, d, stats::gso_segs(&ctx));
        TC_ACT_SHOT
    })
}

/// Container egress at TC ingress of the host end of a container veth.
/// Nothing a container sends reaches the host stack: it is switched or
/// dropped.
#[classifier]
pub fn ovl_tc_egress(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let frame = Frame::of_skb_headers(&ctx, egress::MAX_HDR_LEN);
    let flow = egress::Flow::of(&frame, ifindex);
    let Some(iface) = flow.iface().or_else(|| maps::iface(ifindex)) else {
        stats::drop(
            UNATTRIBUTED_SLOT,
            DropReason::NoEndpoint,
            stats::gso_segs(&ctx),
        );
        return TC_ACT_SHOT;
    };
    egress::switch(&ctx, &frame, ifindex, &iface, &flow).unwrap_or_else(|reason| {
        stats::drop(iface.stats_slot, reason, stats::gso_segs(&ctx));
        TC_ACT_SHOT
    })
}

/// The single drop exit of the decap programs, for a frame of `packets`
/// wire-size packets. VXLAN from a source that is not a VTEP of the
/// network is worth a (debug-level) log line: it is either a
/// misconfiguration or spoofing.
#[inline(always)]
fn count_decap_drop<C: EbpfContext>(ctx: &C, d: Dropped, packets: u64) {
    stats::drop(d.slot, d.reason, packets);
    if d.reason == DropReason::UnknownVtep {
        debug!(
            ctx,
            "dropped VXLAN for VNI {} from a host that is not its VTEP", d.vni
        );
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects loops.
    loop {}
}

/// License of the object: GPL, for the GPL-only helpers (fib lookup,
/// neighbour redirect).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
