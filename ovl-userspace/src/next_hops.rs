//! Next hops for encapsulation where the kernel's FIB helper will not give
//! them: with IPv4 forwarding off on the underlay (a host that only has
//! `--internal` networks), `bpf_fib_lookup` refuses, and the program hands
//! every packet to the kernel's routing (`bpf_redirect_neigh`), a route
//! and neighbour lookup per packet. The agent resolves those next hops
//! itself, from the same tables (`ip route get`, the neighbour table), and
//! writes them into the program's cache as `AGENT_RESOLVED`, which the
//! program sends straight out like the FIB's own answers.
//!
//! The agent only upgrades entries the program made (so only VTEPs that
//! carry traffic), rewrites them every [`REFRESH`] to keep them inside the
//! cache's lifetime, and forgets what it resolved at every route,
//! neighbour or link notification, when the agent also empties the cache.
//! Without an agent the entries expire within `NEXT_HOP_TTL_NS` and the
//! kernel routes again.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use ovl_common::{NextHop, maps::next_hop_via};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
    },
};

use crate::{datapath::Datapath, netlink::Underlay};

/// How often the agent rewrites its entries: four times per cache
/// lifetime (1 s), so a late tick or two never lets one expire.
pub const REFRESH: Duration = Duration::from_millis(250);

/// Subtracted from the clock an entry is stamped with: the program reads
/// the coarse clock before it looks the entry up, so a stamp a tick
/// newer than its reading would look expired (and send one packet back
/// to the kernel's routing, overwriting the entry until the next refresh).
const STAMP_MARGIN_NS: u64 = 20_000_000;

/// How the underlay reaches one VTEP, as the kernel's tables say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU (a path MTU the kernel learned included), else the
    /// device's.
    pub mtu: u32,
}

impl Hop {
    /// The cache entry for this hop, stamped `now`.
    fn entry(&self, now: u64) -> NextHop {
        NextHop {
            dmac: self.dmac,
            smac: self.smac,
            ifindex: self.ifindex,
            via: next_hop_via::AGENT_RESOLVED,
            mtu: self.mtu,
            learned_ns: now,
        }
    }
}

/// What one refresh did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Entries written (upgraded or kept fresh).
    pub written: usize,
    /// Agent entries dropped because their next hop is no longer known.
    pub dropped: usize,
}

/// Resolves and refreshes next hops the FIB helper cannot give.
pub struct Resolver {
    handle: Handle,
    underlay: Underlay,
    /// What each VTEP resolved to since the last change of routes,
    /// neighbours or links (`None`: the kernel keeps routing it, e.g.
    /// while its neighbour is unresolved — resolving it is a neighbour
    /// change, which clears this).
    known: HashMap<Ipv4Addr, Option<Hop>>,
}

impl Resolver {
    pub fn new(underlay: &Underlay) -> Result<Resolver> {
        Ok(Resolver {
            handle: crate::netlink::connect()?,
            underlay: underlay.clone(),
            known: HashMap::new(),
        })
    }

    /// Forgets every resolution (routes, neighbours or links changed).
    pub fn forget(&mut self) {
        self.known.clear();
    }

    /// Upgrades the cache's kernel-routed entries whose next hop the
    /// tables resolve, and rewrites its own entries with a fresh stamp.
    /// Nothing to do while the underlay forwards: the FIB helper answers.
    pub async fn refresh(&mut self, dp: &mut Datapath) -> Result<Refreshed> {
        let mut done = Refreshed::default();
        if forwarding(&self.underlay.name) {
            return Ok(done);
        }
        let now = coarse_now().saturating_sub(STAMP_MARGIN_NS);
        for (vtep, hop) in dp.next_hops()? {
            if hop.via != next_hop_via::KERNEL_ROUTED && hop.via != next_hop_via::AGENT_RESOLVED {
                continue;
            }
            let addr = Ipv4Addr::from(vtep);
            let resolved = match self.known.get(&addr) {
                Some(known) => *known,
                None => {
                    let r = self.resolve(addr).await;
                    self.known.insert(addr, r);
                    r
                }
            };
            match resolved {
                Some(h) => {
                    dp.set_next_hop(vtep, h.entry(now))?;
                    done.written += 1;
                }
                None if hop.via == next_hop_via::AGENT_RESOLVED => {
                    dp.forget_next_hop(vtep);
                    done.dropped += 1;
                }
                None => {}
            }
        }
        Ok(done)
    }

    /// The next hop to `vtep` out of the underlay, or `None` when the
    /// kernel should keep routing it (no route out of the underlay, a
    /// neighbour not resolved yet, a device without MACs).
    async fn resolve(&self, vtep: Ipv4Addr) -> Option<Hop> {
        match resolve(&self.handle, &self.underlay, vtep).await {
            Ok(hop) => hop,
            Err(e) => {
                log::debug!("next hop to VTEP {vtep}: {e:#}; the kernel keeps routing it");
                None
            }
        }
    }
}

/// Asks the kernel how this node's VTEP address reaches `vtep` out of the
/// underlay (the flow the program's kernel routing uses: UDP from the
/// VTEP address, out of the underlay device), then the neighbour table
/// for the next hop's MAC.
pub async fn resolve(handle: &Handle, underlay: &Underlay, vtep: Ipv4Addr) -> Result<Option<Hop>> {
    let request = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(vtep, 32)
        .source_prefix(underlay.addr, 32)
        .output_interface(underlay.ifindex)
        .ip_protocol(libc::IPPROTO_UDP as u8)
        .build();
    let route = handle
        .route()
        .get(request)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("ip route get {vtep}"))?
        .with_context(|| format!("ip route get {vtep}: no answer"))?;
    let Some(path) = route_path(&route, vtep, underlay.ifindex) else {
        return Ok(None);
    };
    let link = crate::netlink::link_by_index(handle, underlay.ifindex).await?;
    let (Some(smac), Some(device_mtu)) = (link_mac(&link.attributes), link_mtu(&link.attributes))
    else {
        return Ok(None);
    };
    let mut neighbours = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(n) = neighbours.try_next().await.context("list neighbours")? {
        if n.header.ifindex != underlay.ifindex {
            continue;
        }
        if let Some(dmac) = usable_mac(&n, path.next_hop) {
            return Ok(Some(Hop {
                ifindex: underlay.ifindex,
                smac,
                dmac,
                mtu: path.mtu.unwrap_or(device_mtu),
            }));
        }
    }
    Ok(None)
}

/// What a route-get answer says about reaching `vtep` out of `underlay`.
#[derive(Debug, PartialEq, Eq)]
struct RoutePath {
    /// The router's address, or the VTEP's own on a link route.
    next_hop: Ipv4Addr,
    /// The route's (or the learned path's) MTU, if it has one.
    mtu: Option<u32>,
}

/// The next hop and MTU of a route-get answer, if it is a unicast route
/// out of `underlay` (a local, blackhole or prohibit route, or one out of
/// another device, is left to the kernel).
fn route_path(route: &RouteMessage, vtep: Ipv4Addr, underlay: u32) -> Option<RoutePath> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    let mut path = RoutePath {
        next_hop: vtep,
        mtu: None,
    };
    for a in &route.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => path.next_hop = *g,
            RouteAttribute::Metrics(metrics) => {
                path.mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                    _ => None,
                });
            }
            // A multipath or nexthop-object route: the kernel picks per flow.
            RouteAttribute::MultiPath(_) | RouteAttribute::NhId(_) => return None,
            _ => {}
        }
    }
    (oif == Some(underlay)).then_some(path)
}

/// The MAC of neighbour `n` if it is `addr` and usable as the FIB helper
/// would use it (any valid state: reachable, stale, delay, probe,
/// permanent, noarp with an address).
fn usable_mac(n: &NeighbourMessage, addr: Ipv4Addr) -> Option<[u8; 6]> {
    let valid = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !valid {
        return None;
    }
    let mut dst = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::LinkLayerAddress(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => {}
        }
    }
    // An all-zero MAC is not a neighbour's (a NOARP device reports one).
    mac.filter(|m| dst == Some(addr) && *m != [0; 6])
}

fn link_mac(attributes: &[LinkAttribute]) -> Option<[u8; 6]> {
    attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

fn link_mtu(attributes: &[LinkAttribute]) -> Option<u32> {
    attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// Whether IPv4 forwarding is on for device `name` (then the FIB helper
/// resolves next hops itself). Unreadable counts as off: the refresh only
/// touches entries the program marked kernel-routed anyway.
fn forwarding(name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"))
        .is_ok_and(|v| v.trim() == "1")
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the program stamps
/// and ages cache entries with (`bpf_ktime_get_coarse_ns`).
fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::neighbour::NeighbourHeader;

    const VTEP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const MAC: [u8; 6] = [0x02, 0, 0x5e, 0, 1, 1];

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.kind = kind;
        r.attributes = attributes;
        r
    }

    #[test]
    fn a_route_through_a_router_names_the_router_and_its_mtu() {
        let r = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(VTEP)),
                RouteAttribute::Gateway(RouteAddress::Inet(ROUTER)),
                RouteAttribute::Oif(7),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
        );
        assert_eq!(
            route_path(&r, VTEP, 7),
            Some(RoutePath {
                next_hop: ROUTER,
                mtu: Some(1400)
            })
        );
        // Out of another device: the kernel's business.
        assert_eq!(route_path(&r, VTEP, 8), None);
    }

    #[test]
    fn a_link_route_names_the_vtep_and_other_kinds_are_left_to_the_kernel() {
        let link = route(RouteType::Unicast, vec![RouteAttribute::Oif(7)]);
        assert_eq!(
            route_path(&link, VTEP, 7),
            Some(RoutePath {
                next_hop: VTEP,
                mtu: None
            })
        );
        for kind in [RouteType::Local, RouteType::BlackHole, RouteType::Prohibit] {
            assert_eq!(
                route_path(&route(kind, vec![RouteAttribute::Oif(7)]), VTEP, 7),
                None
            );
        }
        let multipath = route(
            RouteType::Unicast,
            vec![RouteAttribute::Oif(7), RouteAttribute::MultiPath(vec![])],
        );
        assert_eq!(route_path(&multipath, VTEP, 7), None);
    }

    fn neighbour(addr: Ipv4Addr, mac: &[u8], state: NeighbourState) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header = NeighbourHeader {
            ifindex: 7,
            state,
            ..Default::default()
        };
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)),
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        ];
        n
    }

    #[test]
    fn only_a_valid_neighbour_with_a_mac_is_used() {
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert_eq!(
                usable_mac(&neighbour(ROUTER, &MAC, state), ROUTER),
                Some(MAC),
                "{state:?}"
            );
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(
                usable_mac(&neighbour(ROUTER, &MAC, state), ROUTER),
                None,
                "{state:?}"
            );
        }
        assert_eq!(
            usable_mac(&neighbour(VTEP, &MAC, NeighbourState::Reachable), ROUTER),
            None
        );
        assert_eq!(
            usable_mac(&neighbour(ROUTER, &[0; 6], NeighbourState::Noarp), ROUTER),
            None
        );
        assert_eq!(
            usable_mac(
                &neighbour(ROUTER, &MAC[..4], NeighbourState::Reachable),
                ROUTER
            ),
            None
        );
    }

    #[test]
    fn an_entry_is_stamped_agent_resolved() {
        let hop = Hop {
            ifindex: 7,
            smac: [2, 0, 0, 0, 0, 1],
            dmac: MAC,
            mtu: 1500,
        };
        let e = hop.entry(42);
        assert_eq!(
            (e.via, e.dmac, e.smac, e.ifindex, e.mtu, e.learned_ns),
            (next_hop_via::AGENT_RESOLVED, MAC, hop.smac, 7, 1500, 42)
        );
    }
}
