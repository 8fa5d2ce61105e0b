//! VXLAN encapsulation at TC (RFC 7348 §5): outer Ethernet / IPv4 / UDP
//! (destination 4789) / VXLAN around the container's frame, next hop taken
//! from the kernel's FIB and neighbour tables through a per-VTEP cache.

use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_hash_recalc, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr, vxlan::VxlanHdr};
use ovl_common::{
    DropReason, Endpoint, Iface, NextHop, NodeConfig,
    maps::{network_flags, next_hop_via, vtep_flags},
    wire::{
        ENCAP_INSERT_LEN, ENCAP_OVERHEAD, ETH_HDR_LEN, ETH_P_IP, INNER_ETH_OFFSET, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_DF, IPV4_HDR_LEN, MIN_PATH_MTU, OUTER_TTL, UDP_HDR_LEN, VXLAN_FLAG_I,
        WIREGUARD_OVERHEAD, ipv4_checksum, vxlan_src_port,
    },
};

use crate::{egress::Flow, icmp, maps, packet::Frame, stats};

const AF_INET: u8 = 2;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: length of the inner L2 header.
const ADJ_ROOM_ENCAP_L2_ETH_LEN: u64 = (ETH_HDR_LEN as u64 & 0xff) << 56;
/// The kernel keeps GSO valid for a UDP tunnel carrying Ethernet; FIXED_GSO
/// keeps the container's segment size, which its 1450 MTU already sized
/// for the underlay.
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ADJ_ROOM_ENCAP_L2_ETH_LEN;

/// Where an encapsulated frame leaves the node.
#[derive(Clone, Copy)]
enum Exit {
    /// Straight out of the underlay, routed by the kernel FIB.
    Underlay,
    /// To the agent's crypto device (this ifindex), which sends it on
    /// encrypted: the VXLAN packet becomes the payload of a WireGuard
    /// message to the VTEP's node.
    Crypto(u32),
}

/// The exit of the frames of `iface`'s network to `dst`: an encrypted
/// network's go to the crypto device or nowhere (fail closed: no agent, or
/// a VTEP whose node published no key, is `no_key` — never the underlay in
/// clear).
#[inline(always)]
fn exit_of(iface: &Iface, dst: &Endpoint) -> Result<Exit, DropReason> {
    let vni = iface.vni;
    if iface.network_flags & network_flags::ENCRYPTED == 0 {
        return Ok(Exit::Underlay);
    }
    let device = maps::crypto_device().ok_or(DropReason::NoKey)?;
    if maps::vtep_flags(vni, dst.vtep) & vtep_flags::KEYED == 0 {
        return Err(DropReason::NoKey);
    }
    Ok(Exit::Crypto(device))
}

/// Wraps the IPv4 frame the container of `iface` (host end `ifindex`)
/// sent for the VTEP of `dst` and redirects it to the underlay, or to the
/// crypto device for an encrypted network.
/// `inner_ip` is the frame's IPv4 header (at `ETH_HDR_LEN`), `flow` its
/// flow in the flow cache.
#[inline(always)]
pub fn to_remote(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    node: &NodeConfig,
    dst: &Endpoint,
    inner_ip: &Ipv4Hdr,
    flow: &Flow,
) -> Result<i32, DropReason> {
    let vni = iface.vni;
    let skb = ctx.skb.skb;
    let inner_frame_len = ctx.len();
    // SAFETY: reading fields of the context the program was handed.
    let (gso_size, gso_segs) = unsafe { ((*skb).gso_size, (*skb).gso_segs) };

    let outer_len = largest_outer_len(ctx, inner_ip, inner_frame_len, gso_size)?;
    let exit = exit_of(iface, dst)?;
    // Too big for the way to the VTEP, as known or as the FIB says (it
    // records the route's MTU as the path's): one place answers, with
    // what fits now.
    if outer_len > largest_fitting(node, exit, dst.vtep, outer_len) {
        let fitting = largest_fitting(node, exit, dst.vtep, u32::MAX);
        return refuse_oversize(ctx, ifindex, iface, inner_ip, fitting);
    }
    let route = match exit {
        Exit::Crypto(device) => Route::device(device),
        Exit::Underlay => match route_to(ctx, node, dst.vtep, outer_len, flow) {
            Ok(route) => route,
            Err(DropReason::PathMtu) => {
                let fitting = largest_fitting(node, exit, dst.vtep, u32::MAX);
                return refuse_oversize(ctx, ifindex, iface, inner_ip, fitting);
            }
            Err(reason) => return Err(reason),
        },
    };

    // Flow entropy from the inner flow (RFC 7348 §5, source port): taken
    // before the headers change.
    // SAFETY: helper call on the program's own context.
    let flow_hash = unsafe { bpf_get_hash_recalc(skb) };
    let frame = Frame::of_skb(ctx);
    let inner_eth: EthHdr = frame.read(0)?;

    if ctx
        .adjust_room(ENCAP_INSERT_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .is_err()
    {
        // A container's own tunnel (kind, Docker in Docker) leaves its
        // packets marked encapsulated (for the inner checksum's offload),
        // and the kernel will not mark one twice. A single packet needs no
        // marks (they steer segmentation): the room alone keeps its
        // checksum offsets valid. A super-packet does need them; the agent
        // has such super-packets segmented in the container
        // (`UNWRAPPABLE_GSO`), so one arriving here is counted.
        if gso_size != 0 {
            return Err(DropReason::Unsupported);
        }
        ctx.adjust_room(ENCAP_INSERT_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| DropReason::Malformed)?;
    }

    let frame = Frame::of_skb(ctx);
    let outer_l3_len = ctx.len() - ETH_HDR_LEN as u32;
    frame.write(
        0,
        EthHdr {
            dst_addr: route.dmac,
            src_addr: route.smac,
            ether_type: ETH_P_IP.to_be(),
        },
    )?;
    frame.write(
        ETH_HDR_LEN,
        outer_ipv4(outer_l3_len as u16, inner_ip.tos, node.vtep, dst.vtep),
    )?;
    frame.write(
        ETH_HDR_LEN + IPV4_HDR_LEN,
        outer_udp(outer_l3_len as u16, flow_hash, node.vxlan_port()),
    )?;
    frame.write(ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN, vxlan(vni))?;
    frame.write(
        INNER_ETH_OFFSET,
        EthHdr {
            dst_addr: dst.mac,
            src_addr: inner_eth.src_addr,
            ether_type: ETH_P_IP.to_be(),
        },
    )?;

    stats::tx(
        iface.stats_slot,
        u64::from(gso_segs.max(1)),
        u64::from(inner_frame_len),
    );
    Ok(route.redirect())
}

/// The largest VXLAN packet (underlay L3 bytes) the way to `vtep` takes:
/// the underlay link's MTU, less WireGuard's overhead on the crypto
/// device's way, or a smaller path MTU a router reported (or the FIB's
/// route had) for the VTEP. Every recorded path MTU is at least
/// MIN_PATH_MTU (`set_path_mtu` raises smaller reports), so a packet of
/// `outer_len` no longer than that skips the lookup.
#[inline(always)]
fn largest_fitting(node: &NodeConfig, exit: Exit, vtep: [u8; 4], outer_len: u32) -> u32 {
    let link = node.underlay_mtu;
    match exit {
        // Path MTU reports quote the WireGuard packet, not ovl's VXLAN:
        // they are the host stack's, like any UDP socket's.
        Exit::Crypto(_) => link.saturating_sub(WIREGUARD_OVERHEAD),
        Exit::Underlay if outer_len > MIN_PATH_MTU => match maps::path_mtu(vtep) {
            Some(path) if path < link => path,
            _ => link,
        },
        Exit::Underlay => link,
    }
}

/// Refuses a frame whose packets would exceed `fitting` bytes of VXLAN on
/// the way to their VTEP. With DF its sender is told the MTU that fits,
/// `fitting` less VXLAN's overhead, in ICMP fragmentation needed from its
/// gateway (RFC 1191 §4), as a router on its path would: the sender's
/// path MTU discovery then sends smaller packets, where a silent drop
/// would be a black hole (the underlay's MTU lowered under a running
/// network, a narrower route or link, a container that raised its own
/// MTU). Without DF the sender asked for fragments, which ovl does not
/// make (RFC 7348 §4.3): dropped as `too_big`.
#[inline(always)]
fn refuse_oversize(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    inner_ip: &Ipv4Hdr,
    fitting: u32,
) -> Result<i32, DropReason> {
    if u16::from_be_bytes(inner_ip.frags) & IPV4_DF == 0 {
        return Err(DropReason::TooBig);
    }
    let inner_mtu = fitting
        .saturating_sub(ENCAP_OVERHEAD)
        .min(u32::from(u16::MAX)) as u16;
    icmp::frag_needed(ctx, ifindex, iface, inner_mtu)
}

/// Underlay L3 length of the largest packet this frame turns into: the
/// whole frame, or one segment of a GSO super-packet.
#[inline(always)]
fn largest_outer_len(
    ctx: &TcContext,
    inner_ip: &Ipv4Hdr,
    inner_frame_len: u32,
    gso_size: u32,
) -> Result<u32, DropReason> {
    let inner_l3 = if gso_size == 0 {
        inner_frame_len - ETH_HDR_LEN as u32
    } else {
        let ihl = u32::from(inner_ip.vihl & 0x0f) * 4;
        let l4_hdr = match inner_ip.proto {
            IPPROTO_TCP => {
                // Data offset: high nibble of byte 12 of the TCP header. Read
                // two bytes: LLVM turns a one-byte bounds check into a form
                // the verifier cannot use with a variable offset.
                let off: [u8; 2] = Frame::of_skb(ctx).read(ETH_HDR_LEN + ihl as usize + 12)?;
                u32::from(off[0] >> 4) * 4
            }
            IPPROTO_UDP => UDP_HDR_LEN as u32,
            _ => 0,
        };
        ihl + l4_hdr + gso_size
    };
    Ok(inner_l3 + ENCAP_OVERHEAD)
}

/// How an encapsulated packet leaves for its VTEP. A plain struct, not an
/// enum with data: LLVM leaves the unused fields of an enum variant
/// undefined, and the verifier rejects reading such registers.
struct Route {
    how: Via,
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    next_hop: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// FIB and neighbour known: MACs written here, straight to the device.
    Resolved,
    /// Neighbour not resolved yet: the kernel resolves `next_hop` and fills
    /// in the MACs.
    Unresolved,
    /// The FIB helper refuses to work on a device without IPv4 forwarding;
    /// the kernel then routes (and resolves) the packet itself, out of the
    /// underlay device, until the agent resolves the next hop for it.
    KernelRouted,
}

impl Route {
    /// The way a cached (or just learned) next hop says.
    #[inline(always)]
    fn cached(hop: &NextHop) -> Route {
        Route {
            // RESOLVED (by the FIB) or AGENT_RESOLVED (by the agent, where
            // forwarding is off): the MACs are known either way.
            how: if hop.via == next_hop_via::KERNEL_ROUTED {
                Via::KernelRouted
            } else {
                Via::Resolved
            },
            ifindex: hop.ifindex,
            smac: hop.smac,
            dmac: hop.dmac,
            next_hop: 0,
        }
    }

    /// Straight to a local device that takes any MAC (the crypto device).
    #[inline(always)]
    fn device(ifindex: u32) -> Route {
        Route {
            how: Via::Resolved,
            ifindex,
            smac: [0; 6],
            dmac: [0; 6],
            next_hop: 0,
        }
    }

    #[inline(always)]
    fn redirect(&self) -> i32 {
        // SAFETY (all arms): helper calls with valid arguments; the action
        // they return is the program's verdict.
        match self.how {
            Via::Resolved => unsafe { bpf_redirect(self.ifindex, 0) as i32 },
            Via::Unresolved => unsafe {
                let mut params: bpf_redir_neigh = mem::zeroed();
                params.nh_family = u32::from(AF_INET);
                params.__bindgen_anon_1.ipv4_nh = self.next_hop;
                bpf_redirect_neigh(
                    self.ifindex,
                    &mut params,
                    mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                ) as i32
            },
            Via::KernelRouted => unsafe {
                bpf_redirect_neigh(self.ifindex, core::ptr::null_mut(), 0, 0) as i32
            },
        }
    }
}

/// Routes an underlay packet of `outer_len` bytes of `flow` from this
/// VTEP to `vtep`: from the next-hop cache while its entry is fresh and
/// the packet fits the route's MTU (the flow's copy of it first), else
/// through the kernel FIB (which fills the cache).
#[inline(always)]
fn route_to(
    ctx: &TcContext,
    node: &NodeConfig,
    vtep: [u8; 4],
    outer_len: u32,
    flow: &Flow,
) -> Result<Route, DropReason> {
    // The coarse clock (the last tick's time) is plenty for a one-second
    // lifetime, and reads no clock source: bpf_ktime_get_ns cost ~9 % of
    // the program's time in a VM (read_tsc).
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let hop = flow.hop();
    if maps::is_fresh(&hop, now) && outer_len <= hop.mtu {
        return Ok(Route::cached(&hop));
    }
    if let Some(hop) = maps::next_hop(vtep, now)
        && outer_len <= hop.mtu
    {
        flow.remember_hop(vtep, &hop);
        return Ok(Route::cached(&hop));
    }
    fib_route(ctx, node, vtep, outer_len, now, flow)
}

/// Asks the kernel FIB (and neighbour table) for the route to `vtep`, which
/// also checks the route's MTU, and caches what it learned at `now` (for
/// every flow to `vtep`, and in `flow`'s slot).
#[inline(always)]
fn fib_route(
    ctx: &TcContext,
    node: &NodeConfig,
    vtep: [u8; 4],
    outer_len: u32,
    now: u64,
    flow: &Flow,
) -> Result<Route, DropReason> {
    // The FIB checks the route's MTU too (it skips that check where
    // forwarding is off).
    // SAFETY: an all-zero bpf_fib_lookup is a valid request skeleton.
    let mut fib: bpf_fib_lookup = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.__bindgen_anon_1.tot_len = outer_len as u16;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node.vtep);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(vtep);
    fib.ifindex = node.underlay_ifindex;
    // SAFETY: helper call with a properly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    // SAFETY: the kernel wrote the union members it documents for IPv4.
    let next_hop = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    match rc {
        r if r == BPF_FIB_LKUP_RET_SUCCESS as i64 => {
            let hop = NextHop {
                dmac: fib.dmac,
                smac: fib.smac,
                ifindex: fib.ifindex,
                via: next_hop_via::RESOLVED,
                // SAFETY: on success the kernel writes the route's MTU
                // over tot_len (bpf_fib_set_fwd_params).
                mtu: u32::from(unsafe { fib.__bindgen_anon_1.mtu_result }),
                learned_ns: now,
            };
            cache_next_hop(vtep, &hop, flow);
            Ok(Route::cached(&hop))
        }
        r if r == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 => {
            let hop = NextHop {
                dmac: [0; 6],
                smac: [0; 6],
                ifindex: node.underlay_ifindex,
                via: next_hop_via::KERNEL_ROUTED,
                // The kernel's routing checks the MTU after the program.
                mtu: u32::MAX,
                learned_ns: now,
            };
            cache_next_hop(vtep, &hop, flow);
            Ok(Route::cached(&hop))
        }
        // Not cached: the neighbour subsystem resolves it meanwhile.
        r if r == BPF_FIB_LKUP_RET_NO_NEIGH as i64 => Ok(Route {
            how: Via::Unresolved,
            ifindex: fib.ifindex,
            // Unresolved routes get their MACs from the neighbour
            // subsystem; zeros are fine meanwhile (only a multicast
            // destination is refused).
            smac: [0; 6],
            dmac: [0; 6],
            next_hop,
        }),
        r if r == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 => {
            // The route (or the kernel's own path MTU cache) is smaller:
            // remembered as the VTEP's path MTU, which `to_remote` tells
            // this packet's sender.
            // SAFETY: on FRAG_NEEDED the kernel wrote the MTU in the union.
            let mtu = u32::from(unsafe { fib.__bindgen_anon_1.mtu_result });
            maps::set_path_mtu(vtep, mtu);
            Err(DropReason::PathMtu)
        }
        _ => Err(DropReason::NoRoute),
    }
}

/// Caches the next hop to `vtep` the FIB just gave, for every flow and in
/// `flow`'s slot.
#[inline(always)]
fn cache_next_hop(vtep: [u8; 4], hop: &NextHop, flow: &Flow) {
    maps::set_next_hop(vtep, hop);
    flow.remember_hop(vtep, hop);
}

#[inline(always)]
fn outer_ipv4(tot_len: u16, tos: u8, src: [u8; 4], dst: [u8; 4]) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        // RFC 6040 normal mode: the outer header carries the inner ECN (and
        // DSCP) so congestion marks survive the tunnel.
        tos,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        // RFC 7348 §4.3 forbids VTEPs from fragmenting, so the underlay
        // must not either: DF, and the MTU is checked before.
        frags: IPV4_DF.to_be_bytes(),
        ttl: OUTER_TTL,
        proto: IPPROTO_UDP,
        check: [0; 2],
        src_addr: src,
        dst_addr: dst,
    };
    let words = [
        u16::from_be_bytes([ip.vihl, ip.tos]),
        tot_len,
        0,
        IPV4_DF,
        u16::from_be_bytes([OUTER_TTL, IPPROTO_UDP]),
        0,
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
    ];
    ip.check = ipv4_checksum(&words).to_be_bytes();
    ip
}

#[inline(always)]
fn outer_udp(outer_l3_len: u16, flow_hash: u32, port: u16) -> UdpHdr {
    let mut udp: UdpHdr = UdpHdr {
        src: [0; 2],
        dst: [0; 2],
        len: [0; 2],
        check: [0; 2],
    };
    udp.set_src_port(vxlan_src_port(flow_hash));
    udp.set_dst_port(port);
    udp.set_len(outer_l3_len - IPV4_HDR_LEN as u16);
    // A zero UDP checksum is allowed for VXLAN over IPv4 (RFC 7348 §5).
    udp
}

#[inline(always)]
fn vxlan(vni: u32) -> VxlanHdr {
    let mut hdr = VxlanHdr {
        flags: VXLAN_FLAG_I,
        _reserved1: [0; 3],
        vni: [0; 3],
        _reserved2: 0,
    };
    hdr.set_vni(vni);
    hdr
}
