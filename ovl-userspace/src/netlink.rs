//! Link plumbing over rtnetlink and ioctls: interface lookups, the
//! container veth pair `ovl connect` makes, and the per-link knobs (GRO,
//! IPv6) the data path depends on.

use std::{ffi::CString, fs, net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkInfo},
    },
};

use crate::{model::MacAddr, netns};

/// An rtnetlink handle whose socket lives in the current thread's
/// namespace (the connection task runs on the caller's runtime).
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A link or IPv4 address notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    /// The index of the link it says was deleted, if it says that.
    pub deleted: Option<u32>,
}

/// Notifications of link changes (created, deleted, renamed, up/down, MTU)
/// and of IPv4 addresses added or removed in the current namespace: the
/// agent's cue to look at container veths and the underlay again instead
/// of polling for them. A deletion names its link: a device deleted and
/// made anew under the same index between two looks is otherwise the same
/// device to whoever looks.
/// `received` counts the notifications as they arrive, before the
/// receiver takes them: what remembers link names checks it.
pub fn link_events(
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>> {
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage as M};
    let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Link,
        rtnetlink::MulticastGroup::Ipv4Ifaddr,
    ])
    .context("subscribe to link and address notifications")?;
    Ok(forward_notifications(conn, messages, move |message| {
        received.fetch_add(1, std::sync::atomic::Ordering::Release);
        let deleted = match &message.payload {
            // A bridge port's leaving its bridge is an AF_BRIDGE
            // RTM_DELLINK of a device that stays.
            NetlinkPayload::InnerMessage(M::DelLink(l))
                if l.header.interface_family == AddressFamily::Unspec =>
            {
                Some(l.header.index)
            }
            _ => None,
        };
        Some(LinkEvent { deleted })
    }))
}

/// Notifications of what may change how this node reaches other VTEPs:
/// IPv4 routes added or removed, and neighbours of the underlay device
/// `underlay` that got another MAC, became unusable or went. The agent's
/// cue to empty the data path's next-hop cache.
pub fn underlay_path_events(underlay: u32) -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Neigh,
        rtnetlink::MulticastGroup::Ipv4Route,
    ])
    .context("subscribe to route and neighbour notifications")?;
    let mut macs = NeighbourMacs::default();
    Ok(forward_notifications(conn, messages, move |message| {
        let relevant = match &message.payload {
            NetlinkPayload::InnerMessage(M::NewNeighbour(n)) => {
                n.header.ifindex == underlay && macs.moves_next_hop(n, false)
            }
            NetlinkPayload::InnerMessage(M::DelNeighbour(n)) => {
                n.header.ifindex == underlay && macs.moves_next_hop(n, true)
            }
            NetlinkPayload::InnerMessage(M::NewRoute(_) | M::DelRoute(_)) => true,
            // Anything else (an overrun included): look again to be safe.
            _ => true,
        };
        relevant.then_some(())
    }))
}

/// Runs the rtnetlink connection `conn` of a multicast subscription and
/// sends what `event` makes of each of its notifications (nothing for
/// `None`), until the receiver is dropped. The connection is stopped before its stream of
/// notifications is dropped: the other way round it would warn of a
/// closed channel at each notification still arriving (the agent's own
/// crypto device going away as it stops, say).
fn forward_notifications<C, S, F, T>(
    conn: C,
    mut messages: S,
    mut event: F,
) -> tokio::sync::mpsc::UnboundedReceiver<T>
where
    T: Send + 'static,
    C: std::future::Future<Output = ()> + Send + 'static,
    S: futures_util::Stream<
            Item = (
                rtnetlink::packet_core::NetlinkMessage<
                    rtnetlink::packet_route::RouteNetlinkMessage,
                >,
                rtnetlink::sys::SocketAddr,
            ),
        > + Send
        + Unpin
        + 'static,
    F: FnMut(
            &rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        ) -> Option<T>
        + Send
        + 'static,
{
    use futures_util::StreamExt;
    let conn = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => break,
                message = messages.next() => match message {
                    Some((message, _)) => {
                        if let Some(e) = event(&message)
                            && tx.send(e).is_err()
                        {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
        conn.abort();
        // Cancelled (or ended) before the stream goes.
        let _ = conn.await;
        drop(messages);
    });
    rx
}

/// The MAC each IPv4 neighbour of the underlay had at its last
/// notification. Most notifications only move an entry between states
/// (reachable, stale, delay, probe: every neighbour does so every few
/// tens of seconds) and leave every next hop as it was.
#[derive(Default)]
struct NeighbourMacs(std::collections::HashMap<Ipv4Addr, Vec<u8>>);

impl NeighbourMacs {
    /// Whether the notification of `n` (`deleted` for RTM_DELNEIGH) may
    /// change a next hop: an IPv4 neighbour gone, unusable, or with a MAC
    /// other than the one last seen.
    fn moves_next_hop(
        &mut self,
        n: &rtnetlink::packet_route::neighbour::NeighbourMessage,
        deleted: bool,
    ) -> bool {
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute as A, NeighbourState as S,
        };
        let mut addr = None;
        let mut mac = None;
        for a in &n.attributes {
            match a {
                A::Destination(NeighbourAddress::Inet(ip)) => addr = Some(*ip),
                A::LinkLayerAddress(m) => mac = Some(m),
                _ => {}
            }
        }
        let Some(addr) = addr else {
            return false;
        };
        let usable = matches!(
            n.header.state,
            S::Reachable | S::Stale | S::Delay | S::Probe | S::Permanent | S::Noarp
        );
        match mac {
            Some(mac) if usable && !deleted => {
                self.0.insert(addr, mac.clone()).as_ref() != Some(mac)
            }
            _ => {
                self.0.remove(&addr);
                true
            }
        }
    }
}

/// An rtnetlink handle bound to namespace `name`.
pub fn connect_in(name: &str) -> Result<Handle> {
    let _inside = netns::enter(name)?;
    connect()
}

/// Index of interface `name` in the current namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Name of interface `ifindex` in the current namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has room for IF_NAMESIZE bytes, as the call needs.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// What the agent needs to know of the underlay interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub mtu: u32,
}

/// Looks up `name`'s index, MTU and first IPv4 address.
pub async fn underlay(handle: &Handle, name: &str) -> Result<Underlay> {
    let Some(ifindex) = ifindex(name) else {
        bail!(
            "interface {name:?} does not exist in this network namespace; list them with `ip link`"
        );
    };
    let mtu = link_state_by_index(handle, ifindex)
        .await
        .with_context(|| format!("read link {name}"))?
        .mtu
        .unwrap_or(1500);
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .with_context(|| format!("read addresses of {name}"))?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(v4)) = attr {
                return Ok(Underlay {
                    name: name.to_owned(),
                    ifindex,
                    addr: *v4,
                    mtu,
                });
            }
        }
    }
    bail!(
        "interface {name} has no IPv4 address; the VTEP needs one (e.g. `ip addr add 192.0.2.10/24 dev {name}`)"
    )
}

/// The link message of interface `ifindex`.
async fn link_by_index(
    handle: &Handle,
    ifindex: u32,
) -> Result<rtnetlink::packet_route::link::LinkMessage> {
    handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await?
        .with_context(|| format!("interface {ifindex} vanished"))
}

/// Where the container end of a new veth pair goes.
#[derive(Clone, Copy, Debug)]
pub enum Placement<'a> {
    /// Into namespace `netns`, renamed `ifname` (default: the first free
    /// `ethN`; a name the container already uses is refused), with its
    /// address, and up.
    Namespace {
        netns: &'a str,
        ifname: Option<&'a str>,
    },
    /// Left in this namespace as `peer`, with MAC and MTU set and no
    /// address, for a runtime that moves, renames and addresses it itself
    /// (Docker's Join answers with its name).
    HostSide { peer: &'a str },
}

/// The container end of a new veth pair, before it is configured.
pub struct ContainerLink<'a> {
    pub host_ifname: &'a str,
    pub placement: Placement<'a>,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: MacAddr,
    pub mtu: u32,
    /// The gateway of the container's subnet.
    pub gateway: Ipv4Addr,
    /// Destinations (address, prefix length) routed through `gateway`:
    /// `0.0.0.0/0` for the default route.
    pub via_gateway: &'a [(Ipv4Addr, u8)],
}

/// Makes the veth pair of a container endpoint: the host end stays here
/// (named `host_ifname`), the other end goes where `spec.placement` says
/// (into the container's namespace with its address, MAC, MTU and routes
/// through its gateway, or left here for a runtime that moves it itself).
/// Returns the container-side interface name. On failure nothing is left.
pub async fn create_container_link(handle: &Handle, spec: &ContainerLink<'_>) -> Result<String> {
    let peer_tmp = match spec.placement {
        Placement::Namespace { .. } => crate::model::unmoved_peer_ifname(spec.host_ifname),
        Placement::HostSide { peer } => peer.to_owned(),
    };
    handle
        .link()
        .add(
            LinkVeth::new(spec.host_ifname, &peer_tmp)
                .mtu(spec.mtu)
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("create veth pair {} / {peer_tmp}", spec.host_ifname))?;
    let result = configure_container_link(handle, spec, &peer_tmp).await;
    if result.is_err() {
        // Deleting one end deletes the pair, wherever the peer went.
        let _ = delete_link(handle, spec.host_ifname).await;
    }
    result
}

async fn configure_container_link(
    handle: &Handle,
    spec: &ContainerLink<'_>,
    peer_tmp: &str,
) -> Result<String> {
    let peer = ifindex(peer_tmp).context("new veth peer vanished")?;
    let host = ifindex(spec.host_ifname).context("new veth vanished")?;
    // XDP frames redirected into a veth need NAPI on the receiving end,
    // which GRO turns on.
    set_gro(peer_tmp, true)?;
    // Decapsulated frames of wire size leave through the host end; the
    // veth merges them in the container end's GRO only while the sending
    // end has TSO off (veth_skb_is_eligible_for_gro in drivers/net/veth.c).
    set_tso(spec.host_ifname, false)?;
    // Super-packets encapsulation could not wrap: the container's stack
    // segments them itself.
    set_features_off(peer_tmp, &UNWRAPPABLE_GSO)?;
    // A performance setting: a veth without it still carries everything.
    if let Err(e) = spread_over_cpus(spec.host_ifname, peer_tmp) {
        log::warn!("{e:#}; decapsulated TCP to this container is merged on one queue");
    }
    disable_ipv6(spec.host_ifname)?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(peer)
                .address(spec.mac.0.to_vec())
                .mtu(spec.mtu)
                .build(),
        )
        .execute()
        .await
        .context("set container MAC and MTU")?;
    let name = match spec.placement {
        Placement::Namespace { netns, ifname } => {
            move_into_namespace(handle, spec, peer, peer_tmp, netns, ifname).await?
        }
        Placement::HostSide { peer } => peer.to_owned(),
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(host).up().build())
        .execute()
        .await
        .context("bring host veth up")?;
    Ok(name)
}

/// A queue per online CPU (up to [`MAX_CONTAINER_QUEUES`]) on both ends of
/// a container's veth, and the host end's transmit queue chosen by the
/// sending CPU (XPS). The host end carries decapsulated TCP to the
/// container end's GRO; a flow's segments can arrive on two CPUs at once
/// (its sender transmits from the CPU its ACKs come in on too). With one
/// queue, both CPUs' segments meet in one ring and alternate there, GRO
/// cannot merge them, and every one reaches the container's TCP out of
/// order; with a queue (and a NAPI, and GRO) per CPU each CPU's run is
/// merged before the two meet, as the kernel vxlan device's per-CPU
/// gro_cells do.
fn spread_over_cpus(host_ifname: &str, peer: &str) -> Result<()> {
    let cpus = online_cpus()?;
    let queues = set_queues(host_ifname, container_queues(cpus.len()))?;
    set_queues(peer, queues)?;
    set_xps_by_cpu(host_ifname, queues, &cpus)
}

/// Most queues a container veth gets. Each queue of the end that merges
/// (GRO) has its own NAPI, a 256-entry ring and a page pool: a second
/// queue on both ends took ~8.5 KiB more slab per veth pair (300 pairs,
/// measured on 6.18), so a queue per CPU on a host of 128 CPUs would cost
/// every container about 1 MiB. Beyond this many, CPUs share queues (XPS
/// deals them out in turn); two CPUs' segments of one flow then meet in
/// one ring only when both CPUs drew the same queue.
const MAX_CONTAINER_QUEUES: u32 = 16;

/// The queue count for a container veth on a host with `cpus` online CPUs.
fn container_queues(cpus: usize) -> u32 {
    u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_CONTAINER_QUEUES)
}

/// Moves the container end into `netns`, names, addresses and raises it.
async fn move_into_namespace(
    handle: &Handle,
    spec: &ContainerLink<'_>,
    peer: u32,
    peer_tmp: &str,
    netns: &str,
    ifname: Option<&str>,
) -> Result<String> {
    let ns = netns::open(netns)?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(peer)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("move veth end into namespace {netns:?}"))?;

    let inner = connect_in(netns)?;
    let name = container_ifname(&inner, ifname, netns).await?;
    {
        let _inside = netns::enter(netns)?;
        disable_ipv6(peer_tmp)?;
    }
    let idx = container_ifindex(&inner, peer_tmp).await?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(idx).name(name.clone()).build())
        .execute()
        .await
        .with_context(|| format!("rename container interface to {name}"))?;
    inner
        .address()
        .add(idx, spec.ip.into(), spec.prefix)
        .execute()
        .await
        .with_context(|| format!("add {}/{} in {netns:?}", spec.ip, spec.prefix))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .context("bring container interface up")?;
    for (dst, len) in spec.via_gateway {
        let added = inner
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*dst, *len)
                    .gateway(spec.gateway)
                    .output_interface(idx)
                    .build(),
            )
            .execute()
            .await;
        match added {
            Ok(()) => {}
            // The container has that route already, through its first
            // network (a default route, say): it keeps it, as a Docker
            // container keeps one gateway whatever networks it joins.
            Err(e) if is_exists(&e) => log::info!(
                "{netns:?} keeps its route to {dst}/{len}; {name} adds none via {}",
                spec.gateway
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "route {dst}/{len} via {} in {netns:?}",
                    spec.gateway
                )));
            }
        }
    }
    Ok(name)
}

/// True when the kernel refused because the object exists (EEXIST).
fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == libc::EEXIST)
}

/// Brings up the loopback interface of namespace `netns` (ovl's resolver
/// listens on 127.0.0.11 there; a new `ip netns add` namespace has it down).
pub async fn loopback_up(netns: &str) -> Result<()> {
    let inner = connect_in(netns)?;
    let lo = container_ifindex(&inner, "lo")
        .await
        .with_context(|| format!("find the loopback of {netns:?}"))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .with_context(|| format!("bring up the loopback of {netns:?}"))
}

async fn container_ifindex(handle: &Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("find {name} in the container namespace"))?
        .with_context(|| format!("{name} did not arrive in the container namespace"))?;
    Ok(link.header.index)
}

/// The name the container's interface gets: `requested`, unless the
/// container has one by that name already, or the first free `ethN`.
async fn container_ifname(handle: &Handle, requested: Option<&str>, netns: &str) -> Result<String> {
    let mut taken = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.context("list container links")? {
        for a in l.attributes {
            if let LinkAttribute::IfName(n) = a {
                taken.push(n);
            }
        }
    }
    if let Some(name) = requested {
        if taken.iter().any(|t| t == name) {
            bail!("namespace {netns:?} already has an interface named {name}");
        }
        return Ok(name.to_owned());
    }
    (0..64)
        .map(|i| format!("eth{i}"))
        .find(|n| !taken.contains(n))
        .context("container has eth0..eth63 already")
}

/// What a link looks like, as attachments are checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// A veth (IFLA_INFO_KIND "veth").
    pub veth: bool,
    /// The index of its peer (a veth's other end), in the namespace the
    /// peer is in (IFLA_LINK).
    pub peer: Option<u32>,
}

/// The link called `name` in the handle's namespace, if there is one.
pub async fn link_state(handle: &Handle, name: &str) -> Result<Option<LinkState>> {
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.context("list links")? {
        let named = l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
        if named {
            return Ok(Some(state_of(&l)));
        }
    }
    Ok(None)
}

/// The state of interface `ifindex` in the handle's namespace.
pub async fn link_state_by_index(handle: &Handle, ifindex: u32) -> Result<LinkState> {
    Ok(state_of(&link_by_index(handle, ifindex).await?))
}

fn state_of(l: &rtnetlink::packet_route::link::LinkMessage) -> LinkState {
    use rtnetlink::packet_route::link::LinkFlags;
    let mut state = LinkState {
        index: l.header.index,
        mac: None,
        mtu: None,
        up: l.header.flags.contains(LinkFlags::Up),
        veth: false,
        peer: None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::Link(i) => state.peer = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                state.veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(b);
                state.mac = Some(MacAddr(m));
            }
            LinkAttribute::Mtu(m) => state.mtu = Some(*m),
            _ => {}
        }
    }
    state
}

/// IPv4 addresses (address, prefix length) of link `index`.
pub async fn ipv4_addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs.try_next().await.context("list addresses")? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(v4)) = attr {
                out.push((*v4, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// The IPv4 addresses of every interface in the handle's namespace: each
/// one's local address (on a point-to-point link the peer's is
/// `IFA_ADDRESS`).
pub async fn host_ipv4_addresses(handle: &Handle) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.context("list addresses")? {
        let v4 = |a: &AddressAttribute| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(v4)) => Some((true, *v4)),
            AddressAttribute::Address(std::net::IpAddr::V4(v4)) => Some((false, *v4)),
            _ => None,
        };
        let found: Vec<(bool, Ipv4Addr)> = msg.attributes.iter().filter_map(v4).collect();
        let local = found.iter().find(|(local, _)| *local).or(found.first());
        out.extend(local.map(|(_, ip)| *ip));
    }
    Ok(out)
}

/// An IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// RT_SCOPE_* (0 universe, 253 link, 254 host).
    pub scope: u8,
}

/// The unicast IPv4 routes of the main table in the handle's namespace.
pub async fn ipv4_routes(handle: &Handle) -> Result<Vec<Route4>> {
    use rtnetlink::{
        RouteMessageBuilder,
        packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType},
    };
    let mut out = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.try_next().await.context("list routes")? {
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast {
            continue;
        }
        let mut route = Route4 {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: r.header.destination_prefix_length,
            gateway: None,
            oif: None,
            scope: u8::from(r.header.scope),
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => route.dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        out.push(route);
    }
    Ok(out)
}

/// Deletes link `name` in the handle's namespace.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<()> {
    let idx = ifindex(name).with_context(|| format!("interface {name} does not exist"))?;
    handle
        .link()
        .del(idx)
        .execute()
        .await
        .with_context(|| format!("delete {name}"))
}

/// Turns off IPv6 on `ifname` in the current namespace: ovl networks are
/// IPv4, and a link-local stack would only send frames that get dropped.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // No IPv6 in this kernel: nothing to turn off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("write {path}")),
    }
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETHTOOL_GCHANNELS: u32 = 0x3c;
const ETHTOOL_SCHANNELS: u32 = 0x3d;
/// The string set of netdev feature names.
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// struct ethtool_channels.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

#[repr(C)]
struct EthtoolDrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

fn ethtool(ifname: &str, data: *mut libc::c_void) -> std::io::Result<()> {
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = data.cast();
    // SAFETY: a datagram socket only to carry the ioctl; closed on return.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with a request block of the kind `cmd` names.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// Switches generic receive offload of `ifname` on or off.
pub fn set_gro(ifname: &str, on: bool) -> Result<()> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: u32::from(on),
    };
    ethtool(ifname, (&raw mut v).cast()).with_context(|| format!("set GRO on {ifname}"))
}

/// Gives `ifname` `queues` receive and transmit queues (as `ethtool -L
/// IFACE rx N tx N`), or as many as it has if fewer; returns the count set.
fn set_queues(ifname: &str, queues: u32) -> Result<u32> {
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    ethtool(ifname, (&raw mut ch).cast())
        .with_context(|| format!("read the queue counts of {ifname}"))?;
    let count = queues.min(ch.max_rx).min(ch.max_tx).max(1);
    if ch.rx_count == count && ch.tx_count == count {
        return Ok(count);
    }
    ch.cmd = ETHTOOL_SCHANNELS;
    ch.rx_count = count;
    ch.tx_count = count;
    ethtool(ifname, (&raw mut ch).cast())
        .with_context(|| format!("give {ifname} {count} queues"))?;
    Ok(count)
}

/// Transmit queue `i` of `ifname` sends what the `k`-th of `cpus`
/// transmits for every `k` with `k % queues == i` (XPS,
/// `queues/tx-i/xps_cpus`), so each CPU's frames keep to one queue and the
/// CPUs share the queues evenly.
fn set_xps_by_cpu(ifname: &str, queues: u32, cpus: &[u32]) -> Result<()> {
    for (queue, mask) in xps_masks(queues, cpus).iter().enumerate() {
        let path = format!("/sys/class/net/{ifname}/queues/tx-{queue}/xps_cpus");
        fs::write(&path, mask).with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

/// The XPS mask of each of `queues` transmit queues: the `k`-th of `cpus`
/// goes to queue `k % queues`.
fn xps_masks(queues: u32, cpus: &[u32]) -> Vec<String> {
    (0..queues)
        .map(|queue| {
            let mine: Vec<u32> = cpus
                .iter()
                .zip((0..queues).cycle())
                .filter(|(_, q)| *q == queue)
                .map(|(cpu, _)| *cpu)
                .collect();
            cpu_mask(&mine)
        })
        .collect()
}

/// The online CPUs (aya reads `/sys/devices/system/cpu/online`).
fn online_cpus() -> Result<Vec<u32>> {
    aya::util::online_cpus()
        .map_err(|(path, e)| anyhow::Error::new(e).context(format!("read {path}")))
}

/// A CPU set as sysfs writes it: hex, 32 CPUs per comma-separated word,
/// most significant word first ("1", "2", "ffffffff,00000001").
fn cpu_mask(cpus: &[u32]) -> String {
    let words = cpus.iter().map(|c| c / 32 + 1).max().unwrap_or(1) as usize;
    let mut mask = vec![0u32; words];
    for c in cpus {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    mask.iter()
        .rev()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                format!("{w:x}")
            } else {
                format!("{w:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Switches TCP segmentation offload of `ifname` on or off: every
/// `tx-tcp*-segmentation` feature, as `ethtool -K IFACE tso on|off` does.
/// (`ETHTOOL_STSO` leaves `tx-tcp-accecn-segmentation` alone, and
/// `ethtool -k` then still reads "tcp-segmentation-offload: on".)
pub fn set_tso(ifname: &str, on: bool) -> Result<()> {
    let tso = tso_feature_bits(ifname)?;
    set_features(ifname, &tso, on).with_context(|| format!("set TSO on {ifname}"))
}

/// Whether any TCP segmentation offload feature of `ifname` is on.
pub fn tso(ifname: &str) -> Result<bool> {
    let tso = tso_feature_bits(ifname)?;
    let active = active_features(ifname, tso.len())
        .with_context(|| format!("read the features of {ifname}"))?;
    Ok(tso.iter().zip(&active).any(|(want, on)| want & on != 0))
}

/// The feature bitmap (32-bit words) with a bit for every
/// `tx-tcp*-segmentation` feature of `ifname`'s kernel.
fn tso_feature_bits(ifname: &str) -> Result<Vec<u32>> {
    let names = feature_names(ifname).with_context(|| format!("list the features of {ifname}"))?;
    let bits = feature_bits(&names, |name| {
        name.starts_with("tx-tcp") && name.ends_with("-segmentation")
    });
    if bits.iter().all(|w| *w == 0) {
        bail!("{ifname}'s kernel names no tx-tcp*-segmentation feature");
    }
    Ok(bits)
}

/// The feature bitmap (32-bit words) with a bit for every feature of
/// `names` (in bit order) that `wanted` picks.
fn feature_bits(names: &[String], wanted: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut bits = vec![0u32; names.len().div_ceil(32)];
    for (i, name) in names.iter().enumerate() {
        if wanted(name) {
            bits[i / 32] |= 1 << (i % 32);
        }
    }
    bits
}

/// The segmentation offloads of a container end whose super-packets
/// ovl's encapsulation cannot wrap: the container's own tunnels (GRE,
/// IP-in-IP, VXLAN/Geneve: the kernel refuses to mark a packet
/// encapsulated twice), SCTP (segmented by chunks, not by size) and
/// fraglist GSO. Off, the container's stack segments them before its
/// veth; TCP and UDP segmentation stay on.
pub const UNWRAPPABLE_GSO: [&str; 8] = [
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
    "tx-ipxip6-segmentation",
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-sctp-segmentation",
    "tx-gso-list",
];

/// Switches the features named `off` off on `ifname` (those its kernel
/// does not name are skipped).
pub fn set_features_off(ifname: &str, off: &[&str]) -> Result<()> {
    let names = feature_names(ifname).with_context(|| format!("list the features of {ifname}"))?;
    let bits = feature_bits(&names, |name| off.contains(&name));
    set_features(ifname, &bits, false)
        .with_context(|| format!("switch {} off on {ifname}", off.join(", ")))
}

/// The receive features that make GRO merge UDP datagrams no socket asked
/// to have merged: on an underlay they merge a VTEP's VXLAN datagrams into
/// batches that only a tunnel socket could split again, which decap drops.
const UDP_FORWARDING_GRO: [&str; 2] = ["rx-udp-gro-forwarding", "rx-gro-list"];

/// Switches off the features of [`UDP_FORWARDING_GRO`] that are on for
/// `ifname`; returns their names (none: nothing changed).
pub fn disable_udp_forwarding_gro(ifname: &str) -> Result<Vec<String>> {
    let names = feature_names(ifname).with_context(|| format!("list the features of {ifname}"))?;
    let wanted = feature_bits(&names, |name| UDP_FORWARDING_GRO.contains(&name));
    let active = active_features(ifname, wanted.len())
        .with_context(|| format!("read the features of {ifname}"))?;
    let on: Vec<u32> = wanted.iter().zip(&active).map(|(w, a)| w & a).collect();
    let switched: Vec<String> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| on[i / 32] & (1 << (i % 32)) != 0)
        .map(|(_, name)| name.clone())
        .collect();
    if !switched.is_empty() {
        set_features(ifname, &on, false)
            .with_context(|| format!("switch {} off on {ifname}", switched.join(", ")))?;
    }
    Ok(switched)
}

/// The names of the kernel's netdev features, in bit order
/// (`ETH_SS_FEATURES`).
fn feature_names(ifname: &str) -> std::io::Result<Vec<String>> {
    // struct ethtool_sset_info with one data word.
    let mut info = [0u32; 5];
    info[0] = ETHTOOL_GSSET_INFO;
    // sset_mask: a u64 at offset 8.
    let mask = (1u64 << ETH_SS_FEATURES).to_ne_bytes();
    info[2] = u32::from_ne_bytes([mask[0], mask[1], mask[2], mask[3]]);
    info[3] = u32::from_ne_bytes([mask[4], mask[5], mask[6], mask[7]]);
    ethtool(ifname, info.as_mut_ptr().cast())?;
    let count = info[4] as usize;
    // struct ethtool_gstrings: cmd, string_set, len, then len strings.
    let mut buf = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    buf[0] = ETHTOOL_GSTRINGS;
    buf[1] = ETH_SS_FEATURES;
    buf[2] = count as u32;
    ethtool(ifname, buf.as_mut_ptr().cast())?;
    let bytes: Vec<u8> = buf[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(bytes
        .chunks(ETH_GSTRING_LEN)
        .map(|s| {
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        })
        .collect())
}

/// `ifname`'s active features, `words` 32-bit words of them.
fn active_features(ifname: &str, words: usize) -> std::io::Result<Vec<u32>> {
    // struct ethtool_gfeatures: cmd, size, then per word {available,
    // requested, active, never_changed}.
    let mut buf = vec![0u32; 2 + 4 * words];
    buf[0] = ETHTOOL_GFEATURES;
    buf[1] = words as u32;
    ethtool(ifname, buf.as_mut_ptr().cast())?;
    Ok(buf[2..].chunks(4).map(|b| b[2]).collect())
}

/// Requests the features in `mask` on or off.
fn set_features(ifname: &str, mask: &[u32], on: bool) -> std::io::Result<()> {
    // struct ethtool_sfeatures: cmd, size, then per word {valid, requested}.
    let mut buf = vec![0u32; 2 + 2 * mask.len()];
    buf[0] = ETHTOOL_SFEATURES;
    buf[1] = mask.len() as u32;
    for (i, word) in mask.iter().enumerate() {
        buf[2 + 2 * i] = *word;
        buf[3 + 2 * i] = if on { *word } else { 0 };
    }
    ethtool(ifname, buf.as_mut_ptr().cast())
}

/// Kernel driver behind `ifname` ("veth", "virtio_net", ...).
pub fn driver(ifname: &str) -> Result<String> {
    // SAFETY: an all-zero ethtool_drvinfo is a valid request.
    let mut info: EthtoolDrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(ifname, (&raw mut info).cast()).with_context(|| format!("query driver of {ifname}"))?;
    let end = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// An XDP program attached to an interface: its id and the mode flag
/// (`XDP_FLAGS_*_MODE`) it was attached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpAttachment {
    pub prog_id: u32,
    mode: u32,
}

/// `XDP_FLAGS_*` of the kernel's if_link.h.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;

/// The XDP programs attached to `ifindex`, one per mode (at most three).
pub async fn xdp_attachments(handle: &Handle, ifindex: u32) -> Result<Vec<XdpAttachment>> {
    use rtnetlink::packet_route::link::{LinkXdp, XdpAttached};
    let link = link_by_index(handle, ifindex).await?;
    let Some(xdp) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    }) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for attr in xdp {
        let (prog_id, mode) = match *attr {
            LinkXdp::DrvProgId(id) => (id, XDP_FLAGS_DRV_MODE),
            LinkXdp::SkbProgId(id) => (id, XDP_FLAGS_SKB_MODE),
            LinkXdp::HwProgId(id) => (id, XDP_FLAGS_HW_MODE),
            _ => continue,
        };
        found.push(XdpAttachment { prog_id, mode });
    }
    // One mode only: the kernel may name it in `attached` and give the
    // plain program id alone.
    if found.is_empty() {
        let mode = xdp.iter().find_map(|a| match a {
            LinkXdp::Attached(XdpAttached::Driver) => Some(XDP_FLAGS_DRV_MODE),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(XDP_FLAGS_SKB_MODE),
            LinkXdp::Attached(XdpAttached::Hardware) => Some(XDP_FLAGS_HW_MODE),
            _ => None,
        });
        let id = xdp.iter().find_map(|a| match a {
            LinkXdp::ProgId(id) => Some(*id),
            _ => None,
        });
        if let (Some(mode), Some(prog_id)) = (mode, id) {
            found.push(XdpAttachment { prog_id, mode });
        }
    }
    Ok(found)
}

/// Detaches `attached` (attached the netlink way, without a link) from
/// `ifindex` if it is still the program there: `prog` is its fd, which the
/// kernel compares (XDP_FLAGS_REPLACE), so a program attached in between
/// by someone else stays.
pub async fn clear_xdp(
    handle: &Handle,
    ifindex: u32,
    attached: XdpAttachment,
    prog: std::os::fd::BorrowedFd<'_>,
) -> Result<()> {
    use std::os::fd::AsRawFd;

    use rtnetlink::packet_route::link::LinkXdp;
    let expected = u32::try_from(prog.as_raw_fd()).context("a negative file descriptor")?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(ifindex)
                .append_extra_attribute(LinkAttribute::Xdp(vec![
                    LinkXdp::Fd(-1),
                    LinkXdp::ExpectedFd(expected),
                    LinkXdp::Flags(attached.mode | XDP_FLAGS_REPLACE),
                ]))
                .build(),
        )
        .execute()
        .await
        .context("detach XDP")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_online_cpu_sends_on_one_queue_and_the_queues_share_them() {
        assert_eq!(xps_masks(2, &[0, 1]), ["1", "2"]);
        // Offline CPUs in between do not pile the rest onto one queue.
        assert_eq!(xps_masks(2, &[0, 2, 4, 6]), ["11", "44"]);
        assert_eq!(xps_masks(1, &[0, 1, 2]), ["7"]);
    }

    #[test]
    fn a_container_veth_gets_a_queue_per_cpu_up_to_a_cap() {
        assert_eq!(container_queues(0), 1);
        assert_eq!(container_queues(1), 1);
        assert_eq!(container_queues(2), 2);
        assert_eq!(container_queues(16), 16);
        assert_eq!(container_queues(128), MAX_CONTAINER_QUEUES);
        // 128 CPUs on 16 queues: eight CPUs a queue (queue 0: CPUs 0,
        // 16, 32, …, 112), each CPU on one.
        let cpus: Vec<u32> = (0..128).collect();
        let masks = xps_masks(container_queues(cpus.len()), &cpus);
        assert_eq!(masks.len(), 16);
        assert_eq!(masks[0], "10001,00010001,00010001,00010001");
        assert_eq!(masks[15], "80008000,80008000,80008000,80008000");
    }

    #[test]
    fn cpu_masks_are_hex_words_of_32_cpus_most_significant_first() {
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 2, 4]), "15");
        assert_eq!(cpu_mask(&[0, 32]), "1,00000001");
        assert_eq!(cpu_mask(&[33]), "2,00000000");
    }

    fn neighbour(
        addr: Ipv4Addr,
        mac: &[u8],
        state: rtnetlink::packet_route::neighbour::NeighbourState,
    ) -> rtnetlink::packet_route::neighbour::NeighbourMessage {
        use rtnetlink::packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourMessage,
        };
        let mut n = NeighbourMessage::default();
        n.header.state = state;
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)),
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        ];
        n
    }

    #[test]
    fn only_a_new_mac_or_a_lost_neighbour_moves_a_next_hop() {
        use rtnetlink::packet_route::neighbour::NeighbourState as S;
        let router = Ipv4Addr::new(192, 0, 2, 1);
        let (old, new) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut macs = NeighbourMacs::default();
        assert!(macs.moves_next_hop(&neighbour(router, &old, S::Reachable), false));
        assert!(!macs.moves_next_hop(&neighbour(router, &old, S::Stale), false));
        assert!(!macs.moves_next_hop(&neighbour(router, &old, S::Delay), false));
        assert!(macs.moves_next_hop(&neighbour(router, &new, S::Reachable), false));
        assert!(macs.moves_next_hop(&neighbour(router, &new, S::Failed), false));
        assert!(macs.moves_next_hop(&neighbour(router, &new, S::Reachable), false));
        assert!(macs.moves_next_hop(&neighbour(router, &new, S::Reachable), true));
        let mut v6 = neighbour(router, &old, S::Reachable);
        v6.attributes.remove(0);
        assert!(!macs.moves_next_hop(&v6, false));
    }

    #[test]
    fn tso_covers_every_tcp_segmentation_feature_the_kernel_names() {
        let names = feature_names("lo").expect("every namespace has lo");
        let bits = tso_feature_bits("lo").expect("lo has TSO features");
        let covered: Vec<&str> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| bits[i / 32] & (1 << (i % 32)) != 0)
            .map(|(_, n)| n.as_str())
            .collect();
        assert!(covered.contains(&"tx-tcp-segmentation"), "{covered:?}");
        assert!(covered.contains(&"tx-tcp6-segmentation"), "{covered:?}");
        assert!(covered.iter().all(|n| n.ends_with("-segmentation")));
        assert!(!covered.contains(&"tx-udp-segmentation"), "{covered:?}");
    }
}
