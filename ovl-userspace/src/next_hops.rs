//! Next hops for encapsulation where the kernel's FIB helper will not give
//! them: with IPv4 forwarding off on the underlay (a host that only has
//! `--internal` networks), `bpf_fib_lookup` refuses, and the program hands
//! every packet to the kernel's routing (`bpf_redirect_neigh`), a route
//! and neighbour lookup per packet. The agent resolves those next hops
//! itself, from the same tables (`ip route get`, the neighbour table), and
//! writes them into the program's cache as `AGENT_RESOLVED`, which the
//! program sends straight out like the FIB's own answers.
//!
//! The agent only upgrades entries the program made within the cache's
//! lifetime (VTEPs that carry traffic now), rewrites them every
//! [`REFRESH`] to keep them inside it, and forgets what it resolved at
//! every route, neighbour or link notification, when the agent also
//! empties the cache. Without an agent the entries expire within
//! `NEXT_HOP_TTL_NS` and the kernel routes again. Each of these writes
//! ends the maps' epoch (`Datapath::clear_next_hops`): egress's flow
//! cache keeps copies of next hops, which the next packet then reads
//! afresh.
//!
//! A packet sent straight out leaves no trace the agent could read, so it
//! cannot tell a VTEP still in use from one whose traffic stopped. Each
//! entry is therefore rewritten for a [`LEASE`] only, then left to
//! expire: if traffic still flows, the program's next packet finds it
//! expired, marks it kernel-routed again and the agent upgrades it within
//! a refresh (those packets take the kernel's routing meanwhile, about
//! [`REFRESH`] in every [`LEASE`]); if not, the expired entry is removed
//! and its neighbour no longer kept checked.
//!
//! A next hop sent to straight (the agent's or the FIB's answer) passes
//! no neighbour layer, so nothing would check it again: a router that
//! changed its MAC without announcing it would be sent to at the old one
//! for as long as the entry stays stale. The agent marks the neighbours
//! of the entries in use as used (`NTF_USE`, what a packet through the
//! kernel's routing does), about once a second while one is stale; the
//! kernel then probes it, and a failed or changed neighbour reaches the
//! agent as a notification that empties the cache
//! (`tests/tests/next_hop.rs` follows an unannounced MAC with forwarding
//! on and off).

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use ovl_common::{NextHop, maps::next_hop_via, wire::NEXT_HOP_TTL_NS};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
    },
};

use crate::{datapath::Datapath, netlink::Underlay};

/// How often the agent rewrites its entries: four times per cache
/// lifetime (1 s), so a late tick or two never lets one expire.
pub const REFRESH: Duration = Duration::from_millis(250);

/// How long the agent keeps rewriting an entry before it lets it expire
/// once, to find out whether its VTEP still carries traffic.
pub const LEASE: Duration = Duration::from_secs(10);

/// Stale neighbours in use are marked used every this many refreshes.
const KEEPALIVE_EVERY: u32 = 4;

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
    /// The neighbour whose MAC `dmac` is (the router, or the VTEP itself).
    pub neighbour: Ipv4Addr,
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
    /// Agent entries removed because they expired after their lease with
    /// no packet since: their VTEP's traffic stopped.
    pub retired: usize,
    /// Stale neighbours in use marked used, so the kernel checks them.
    pub nudged: usize,
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
    /// Refreshes so far (the neighbour keep-alive runs every
    /// [`KEEPALIVE_EVERY`]th).
    refreshes: u32,
    /// When the agent began rewriting each of its entries (coarse clock).
    leases: HashMap<[u8; 4], u64>,
}

/// What a refresh does with one entry of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Not the agent's business (an expired FIB answer, a kernel-routed
    /// entry no packet used within the cache's lifetime, anything but a
    /// fresh FIB answer where the underlay forwards): the program asks
    /// again at its next packet.
    Skip,
    /// A fresh FIB answer in use: only its neighbour is kept checked.
    Watch,
    /// The agent's to write (an entry the program just marked
    /// kernel-routed, or the agent's own within its lease).
    Own,
    /// The agent's, its lease over: left to expire, its neighbour still
    /// kept checked meanwhile.
    Lapse,
    /// The agent's and expired: its VTEP's traffic stopped.
    Retire,
}

/// The role of `hop` at `now` (coarse clock), on an underlay that does or
/// does not forward, for an entry whose lease (if the agent holds one)
/// began at `lease`.
fn role(hop: &NextHop, now: u64, forwarding: bool, lease: Option<u64>) -> Role {
    let fresh = now.wrapping_sub(hop.learned_ns) < NEXT_HOP_TTL_NS;
    match hop.via {
        next_hop_via::RESOLVED if fresh => Role::Watch,
        // Where the underlay forwards, the FIB helper answers: the agent's
        // old entries expire and the program asks it.
        _ if forwarding => Role::Skip,
        next_hop_via::KERNEL_ROUTED if fresh => Role::Own,
        next_hop_via::AGENT_RESOLVED if !fresh => Role::Retire,
        next_hop_via::AGENT_RESOLVED => match lease {
            Some(start) if now.saturating_sub(start) >= LEASE.as_nanos() as u64 => Role::Lapse,
            _ => Role::Own,
        },
        _ => Role::Skip,
    }
}

impl Resolver {
    pub fn new(underlay: &Underlay) -> Result<Resolver> {
        Ok(Resolver {
            handle: crate::netlink::connect()?,
            underlay: underlay.clone(),
            known: HashMap::new(),
            refreshes: 0,
            leases: HashMap::new(),
        })
    }

    /// Forgets every resolution (routes, neighbours or links changed).
    pub fn forget(&mut self) {
        self.known.clear();
    }

    /// Upgrades the cache's kernel-routed entries in use whose next hop
    /// the tables resolve and rewrites its own with a fresh stamp for
    /// their lease (only where the underlay does not forward: elsewhere
    /// the FIB helper answers), removes its expired ones, and keeps the
    /// neighbours of every entry sent straight out checked (the FIB's
    /// answers pass no neighbour layer either).
    pub async fn refresh(&mut self, dp: &mut Datapath) -> Result<Refreshed> {
        let mut done = Refreshed::default();
        // Unreadable counts as off: only entries the program marked
        // kernel-routed are upgraded anyway.
        let forwarding = crate::egress_nat::ipv4_forwarding(&self.underlay.name).unwrap_or(false);
        let now = coarse_now();
        let stamp = now.saturating_sub(STAMP_MARGIN_NS);
        let mut wanted = Vec::new();
        for (vtep, hop) in dp.next_hops()? {
            let lease = self.leases.get(&vtep).copied();
            match role(&hop, now, forwarding, lease) {
                Role::Skip => {}
                Role::Retire => {
                    dp.forget_next_hop(vtep)?;
                    done.retired += 1;
                }
                role => wanted.push((vtep, hop.via, role)),
            }
        }
        // Leases of entries gone or retired end here.
        self.leases.retain(|vtep, _| {
            wanted
                .iter()
                .any(|(v, _, r)| v == vtep && matches!(r, Role::Own | Role::Lapse))
        });
        self.learn(wanted.iter().map(|(vtep, ..)| Ipv4Addr::from(*vtep)))
            .await;
        let mut in_use = BTreeSet::new();
        for (vtep, via, role) in wanted {
            match self.known.get(&Ipv4Addr::from(vtep)).copied().flatten() {
                Some(h) if role == Role::Own => {
                    dp.set_next_hop(vtep, h.entry(stamp))?;
                    // The program marked it kernel-routed: traffic, so a
                    // new lease (after a lapse too).
                    if via == next_hop_via::KERNEL_ROUTED {
                        self.leases.insert(vtep, now);
                    } else {
                        self.leases.entry(vtep).or_insert(now);
                    }
                    done.written += 1;
                    in_use.insert(h.neighbour);
                }
                Some(h) => {
                    in_use.insert(h.neighbour);
                }
                None if via == next_hop_via::AGENT_RESOLVED => {
                    dp.forget_next_hop(vtep)?;
                    self.leases.remove(&vtep);
                    done.dropped += 1;
                }
                None => {}
            }
        }
        self.refreshes = self.refreshes.wrapping_add(1);
        if !in_use.is_empty() && self.refreshes.is_multiple_of(KEEPALIVE_EVERY) {
            done.nudged = keep_alive(&self.handle, self.underlay.ifindex, &in_use).await?;
        }
        Ok(done)
    }

    /// Resolves the VTEPs among `vteps` not resolved since the last
    /// change, reading the underlay's link and neighbours once for all.
    /// A VTEP whose route the kernel will not give is left to the kernel
    /// (until the next change); tables that cannot be read are tried
    /// again at the next refresh.
    async fn learn(&mut self, vteps: impl Iterator<Item = Ipv4Addr>) {
        let missing: Vec<Ipv4Addr> = vteps.filter(|v| !self.known.contains_key(v)).collect();
        if missing.is_empty() {
            return;
        }
        let tables = match Tables::read(&self.handle, self.underlay.ifindex).await {
            Ok(t) => t,
            Err(e) => {
                log::debug!("next hops: {e:#}; trying again at the next refresh");
                return;
            }
        };
        for vtep in missing {
            let hop = match route_to(&self.handle, &self.underlay, vtep).await {
                Ok(path) => path.and_then(|p| tables.hop(self.underlay.ifindex, &p)),
                Err(e) => {
                    log::debug!("next hop to VTEP {vtep}: {e:#}; the kernel keeps routing it");
                    None
                }
            };
            self.known.insert(vtep, hop);
        }
    }
}

/// The underlay's MAC and MTU, and the MACs of its usable neighbours.
struct Tables {
    /// `None` on a device without a MAC: nothing to resolve.
    smac: Option<[u8; 6]>,
    mtu: u32,
    neighbours: HashMap<Ipv4Addr, [u8; 6]>,
}

impl Tables {
    async fn read(handle: &Handle, ifindex: u32) -> Result<Tables> {
        let link = crate::netlink::link_state_by_index(handle, ifindex).await?;
        let mut tables = Tables {
            smac: link.mac.map(|m| m.0),
            mtu: link.mtu.unwrap_or(1500),
            neighbours: HashMap::new(),
        };
        for n in neighbours_of(handle, ifindex).await? {
            if let Some((addr, mac)) = neighbour_addr(&n).and_then(|a| Some((a, usable_mac(&n)?))) {
                tables.neighbours.insert(addr, mac);
            }
        }
        Ok(tables)
    }

    /// The hop along `path`, if its neighbour is usable.
    fn hop(&self, ifindex: u32, path: &RoutePath) -> Option<Hop> {
        Some(Hop {
            ifindex,
            smac: self.smac?,
            dmac: *self.neighbours.get(&path.next_hop)?,
            mtu: path.mtu.unwrap_or(self.mtu),
            neighbour: path.next_hop,
        })
    }
}

/// Asks the kernel how this node's VTEP address reaches `vtep` out of the
/// underlay (the flow the program's kernel routing uses: UDP from the
/// VTEP address, out of the underlay device). `None`: not a unicast route
/// out of the underlay.
async fn route_to(
    handle: &Handle,
    underlay: &Underlay,
    vtep: Ipv4Addr,
) -> Result<Option<RoutePath>> {
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
    Ok(route_path(&route, vtep, underlay.ifindex))
}

/// Marks the stale neighbours among `addrs` on device `ifindex` used
/// (`NTF_USE`), as a packet through the kernel's routing would: the kernel
/// confirms each (delay, then a unicast probe) and reports it failed or
/// changed if it is. Entries an administrator set (permanent, noarp) are
/// left alone: marking them used would take their state away. Returns
/// how many were marked.
async fn keep_alive(handle: &Handle, ifindex: u32, addrs: &BTreeSet<Ipv4Addr>) -> Result<usize> {
    use futures_util::StreamExt;
    use rtnetlink::{
        packet_core::{NLM_F_ACK, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
        packet_route::{RouteNetlinkMessage, neighbour::NeighbourFlags},
    };
    let mut stale = Vec::new();
    for n in neighbours_of(handle, ifindex).await? {
        if n.header.state == NeighbourState::Stale {
            stale.extend(neighbour_addr(&n).filter(|a| addrs.contains(a)));
        }
    }
    for addr in &stale {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.header.flags = NeighbourFlags::Use;
        msg.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(
            *addr,
        ))];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
        // No NLM_F_CREATE: a neighbour gone meanwhile is not made again.
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE;
        let mut response = handle
            .clone()
            .request(req)
            .context("mark a neighbour used")?;
        while let Some(m) = response.next().await {
            if let NetlinkPayload::Error(e) = m.payload
                && e.code.is_some()
            {
                // Gone or changed meanwhile: its notification follows.
                log::debug!("mark neighbour {addr} used: {e}");
            }
        }
    }
    Ok(stale.len())
}

/// The IPv4 neighbours of device `ifindex`.
async fn neighbours_of(handle: &Handle, ifindex: u32) -> Result<Vec<NeighbourMessage>> {
    let mut out = Vec::new();
    let mut neighbours = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(n) = neighbours.try_next().await.context("list neighbours")? {
        if n.header.ifindex == ifindex {
            out.push(n);
        }
    }
    Ok(out)
}

/// The IPv4 address a neighbour message is about.
fn neighbour_addr(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
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

/// The MAC of neighbour `n` if it is usable as the FIB helper would use
/// it (any valid state: reachable, stale, delay, probe, permanent, noarp
/// with an address).
fn usable_mac(n: &NeighbourMessage) -> Option<[u8; 6]> {
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
    let mac = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    });
    // An all-zero MAC is not a neighbour's (a NOARP device reports one).
    mac.filter(|m| *m != [0; 6])
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
                usable_mac(&neighbour(ROUTER, &MAC, state)),
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
                usable_mac(&neighbour(ROUTER, &MAC, state)),
                None,
                "{state:?}"
            );
        }
        assert_eq!(
            neighbour_addr(&neighbour(VTEP, &MAC, NeighbourState::Reachable)),
            Some(VTEP)
        );
        assert_eq!(
            usable_mac(&neighbour(ROUTER, &[0; 6], NeighbourState::Noarp)),
            None
        );
        assert_eq!(
            usable_mac(&neighbour(ROUTER, &MAC[..4], NeighbourState::Reachable)),
            None
        );
    }

    #[test]
    fn a_hop_needs_a_usable_neighbour_and_a_device_mac() {
        let mut tables = Tables {
            smac: Some([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            neighbours: HashMap::from([(ROUTER, MAC)]),
        };
        let via_router = RoutePath {
            next_hop: ROUTER,
            mtu: None,
        };
        assert_eq!(
            tables.hop(7, &via_router),
            Some(Hop {
                ifindex: 7,
                smac: [2, 0, 0, 0, 0, 1],
                dmac: MAC,
                mtu: 1500,
                neighbour: ROUTER
            })
        );
        let learned = RoutePath {
            next_hop: ROUTER,
            mtu: Some(1400),
        };
        assert_eq!(tables.hop(7, &learned).map(|h| h.mtu), Some(1400));
        let direct = RoutePath {
            next_hop: VTEP,
            mtu: None,
        };
        assert_eq!(tables.hop(7, &direct), None, "VTEP not resolved");
        tables.smac = None;
        assert_eq!(tables.hop(7, &via_router), None, "no MAC of our own");
    }

    #[test]
    fn the_agent_owns_entries_in_use_for_a_lease_then_lets_them_expire() {
        const SEC: u64 = 1_000_000_000;
        let now = 100 * SEC;
        let lease = LEASE.as_nanos() as u64;
        let hop = |via, age: u64| NextHop {
            via,
            learned_ns: now - age,
            ..NextHop::default()
        };
        let (kernel, agent, fib) = (
            next_hop_via::KERNEL_ROUTED,
            next_hop_via::AGENT_RESOLVED,
            next_hop_via::RESOLVED,
        );
        // Forwarding off: what the program marked kernel-routed just now
        // is in use, what it marked long ago is not.
        assert_eq!(role(&hop(kernel, 0), now, false, None), Role::Own);
        assert_eq!(role(&hop(kernel, 2 * SEC), now, false, None), Role::Skip);
        // The agent's own: rewritten within the lease (or with none known),
        // left to expire after it, removed once expired.
        assert_eq!(
            role(&hop(agent, 0), now, false, Some(now - lease + 1)),
            Role::Own
        );
        assert_eq!(role(&hop(agent, 0), now, false, None), Role::Own);
        assert_eq!(
            role(&hop(agent, 0), now, false, Some(now - lease)),
            Role::Lapse
        );
        assert_eq!(
            role(&hop(agent, SEC), now, false, Some(now - lease)),
            Role::Retire
        );
        assert_eq!(role(&hop(agent, SEC), now, false, None), Role::Retire);
        // A fresh FIB answer is watched, whether the underlay forwards or
        // not; an expired one is the program's to ask again.
        assert_eq!(role(&hop(fib, 0), now, true, None), Role::Watch);
        assert_eq!(role(&hop(fib, 0), now, false, None), Role::Watch);
        assert_eq!(role(&hop(fib, SEC), now, true, None), Role::Skip);
        // Forwarding on: the agent writes nothing; its old entries expire.
        assert_eq!(role(&hop(kernel, 0), now, true, None), Role::Skip);
        assert_eq!(role(&hop(agent, 0), now, true, Some(now)), Role::Skip);
    }

    #[test]
    fn an_entry_is_stamped_agent_resolved() {
        let hop = Hop {
            ifindex: 7,
            smac: [2, 0, 0, 0, 0, 1],
            dmac: MAC,
            mtu: 1500,
            neighbour: ROUTER,
        };
        let e = hop.entry(42);
        assert_eq!(
            (e.via, e.dmac, e.smac, e.ifindex, e.mtu, e.learned_ns),
            (next_hop_via::AGENT_RESOLVED, MAC, hop.smac, 7, 1500, 42)
        );
    }
}
