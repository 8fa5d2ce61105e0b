//! The host's side of external egress (Docker's gwbridge role): packets
//! the egress program hands to the host's stack carry their network in the
//! mark ([`egress_mark`]); here the host is set up to masquerade them behind
//! its own address and to route the replies back to their container.
//!
//! What it installs, all kernel state that outlives the agent:
//! - nftables table `ip ovl`: a conntrack zone per network for the
//!   original direction (map `zones`, so networks sharing a subnet never
//!   share an entry), the mark saved in and restored from conntrack
//!   (so replies carry their network's mark), a container's packet that
//!   conntrack takes for the reply of another network's connection
//!   dropped (set `own_replies`: a network sharing a subnet has the
//!   server's address too), a container's forwarded packet that
//!   conntrack takes for invalid dropped (it has no translation and would
//!   leave with its overlay address), masquerade of registered
//!   containers (set `endpoints` of address . mark), and — only when ovl had
//!   to switch IPv4 forwarding on for the underlay — a guard that forwards
//!   nothing from the underlay but replies to ovl's connections;
//! - per network, a routing table numbered as its mark, holding a route to
//!   each local container through its veth (with a permanent neighbour, so
//!   the host never ARPs into a container), and a rule `fwmark → table`.
//!   Tables per network keep networks whose subnets overlap apart;
//! - IPv4 forwarding on the container veths and the underlay;
//! - published ports (Docker's `-p`): per port a DNAT rule in chain
//!   `published` of the same table, reached from prerouting for packets to
//!   a local address and from output for the host's own connections to
//!   its addresses and 127.0.0.1 (`localhost`; the rest of 127/8 is left
//!   to the host's own services, a resolver on 127.0.0.53 say): such a
//!   connection from the loopback is masqueraded
//!   as it leaves for the container, whose veth has `route_localnet` on
//!   (and what a container sends to 127/8 is dropped). It marks the
//!   connection with the container's
//!   network, so the packet is routed by that network's table and the
//!   forward guard lets it through; the container's replies come back
//!   marked by the egress program and conntrack undoes the DNAT. The
//!   client's address is kept; a client from outside claiming an address
//!   of the container's network is not translated;
//! - hairpin (a container reaching a published port through a host
//!   address, Docker's hairpin NAT): the connection is translated as any
//!   other and its source too, to the address the container dialled
//!   (chain `hairpin`), so the server answers the host — never straight
//!   across the overlay — and conntrack undoes both. Its original
//!   direction goes by the server's network (the connection's mark); its
//!   replies by the client's, which the connection's conntrack zone names
//!   (map `zone_networks`).
//!
//! [`ensure`] is idempotent and cheap when nothing changed, and the agent
//! runs it again every [`RECHECK`] ([`recheck`]) to repair what others
//! changed behind its back; [`remove`]
//! (`ovl detach`) takes everything away again and restores the underlay's
//! forwarding. When a container goes, its conntrack entries (its address
//! translations) go with it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context, Result, bail};
use ovl_common::maps::{EGRESS_MARK_BASE, EGRESS_MARK_MASK, egress_mark};
use serde_json::Value;

use crate::{desired::EgressEndpoint, host_firewall, ipam::Subnet, ports::PublishedPort};

/// nftables table (family ip) holding ovl's NAT.
pub const TABLE: &str = "ovl";
/// Priority of the `fwmark → table` rules: before the main table (32766),
/// so a reply reaches its container even where main routes the address.
pub const RULE_PRIORITY: u32 = 1000;
/// Chain present only when ovl switched the underlay's forwarding on.
const GUARD_CHAIN: &str = "underlay_guard";
/// The chains a complete table has (the guard aside).
const CHAINS: [&str; 10] = [
    "zone",
    FOREIGN_REPLIES_CHAIN,
    INVALID_CHAIN,
    "prerouting",
    "output",
    "postrouting",
    "publish",
    "publish_local",
    PUBLISHED_CHAIN,
    HAIRPIN_CHAIN,
];
/// The chain of published ports' DNAT rules, one per port.
const PUBLISHED_CHAIN: &str = "published";
/// The chain translating the source of containers' connections to
/// published ports (hairpin).
const HAIRPIN_CHAIN: &str = "hairpin";
/// The chain dropping what a container sends as the reply of another
/// network's connection (set `own_replies`).
const FOREIGN_REPLIES_CHAIN: &str = "foreign_replies";
/// The chain dropping the containers' forwarded packets that conntrack
/// takes for invalid: they have no translation and would leave with their
/// overlay source.
const INVALID_CHAIN: &str = "invalid";

/// The conntrack zone network `mark` would rather have for the original
/// direction of its connections (map `zones`): the VNI's low 16 bits,
/// never 0, the host's own. Networks may share a subnet, and two of their
/// containers with one address sending from one port to one destination
/// would otherwise share a conntrack entry, whose mark (and so whose
/// replies) the last sender takes. Replies need no zone: masquerading
/// gives every entry a reply tuple of its own. Networks whose VNIs differ
/// by a multiple of 65536 would rather have the same zone: the later one
/// gets another ([`assign_zones`]).
fn zone_of(mark: u32) -> u16 {
    (mark as u16).max(1)
}

/// The zone of each network of `marks`, one network's alone: what `had`
/// (the table's map `zones`) gave a network stays (its connections are
/// in that zone), a network new here gets its own [`zone_of`] if free,
/// else the lowest free zone.
fn assign_zones(had: &BTreeMap<u32, u16>, marks: &BTreeSet<u32>) -> BTreeMap<u32, u16> {
    let mut zones = BTreeMap::new();
    let mut used = BTreeSet::new();
    // A zone two networks share (a table of an agent before zones were
    // one network's) stays the first's.
    for (mark, zone) in had {
        if marks.contains(mark) && used.insert(*zone) {
            zones.insert(*mark, *zone);
        }
    }
    for mark in marks {
        if zones.contains_key(mark) {
            continue;
        }
        let zone = Some(zone_of(*mark))
            .filter(|z| !used.contains(z))
            .or_else(|| (1..=u16::MAX).find(|z| !used.contains(z)))
            // 65535 local networks: no zone is free, share one.
            .unwrap_or_else(|| zone_of(*mark));
        used.insert(zone);
        zones.insert(*mark, zone);
    }
    zones
}

/// What the table's sets and maps hold: set `endpoints` (address . mark),
/// map `zones` (mark → zone; set `own_replies` follows its marks) and
/// map `zone_networks` (zone → mark).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Elements {
    endpoints: BTreeSet<(Ipv4Addr, u32)>,
    zones: BTreeMap<u32, u16>,
    zone_networks: BTreeMap<u16, u32>,
}

impl Elements {
    /// The elements for containers `endpoints`, keeping the zones `had`
    /// gave their networks.
    fn wanted(endpoints: BTreeSet<(Ipv4Addr, u32)>, had: &Elements) -> Elements {
        let marks = endpoints.iter().map(|(_, mark)| *mark).collect();
        let zones = assign_zones(&had.zones, &marks);
        let zone_networks = zones.iter().map(|(mark, zone)| (*zone, *mark)).collect();
        Elements {
            endpoints,
            zones,
            zone_networks,
        }
    }

    /// The zone of network `mark`'s connections.
    fn zone(&self, mark: u32) -> u16 {
        self.zones
            .get(&mark)
            .copied()
            .unwrap_or_else(|| zone_of(mark))
    }
}

/// What this agent process installed, so that an unchanged state costs
/// one `nft` call. Empty after a start: everything is installed again
/// (every step replaces), which also repairs what changed meanwhile.
static INSTALLED: Mutex<Option<Installed>> = Mutex::new(None);

/// The last request [`ensure_logged`] saw succeed: (underlay, endpoints).
static LAST_DONE: Mutex<Option<(String, Vec<EgressEndpoint>)>> = Mutex::new(None);

/// The last request [`ensure_logged`] saw, whatever came of it: what
/// [`recheck`] makes sure of again.
static LAST_ASKED: Mutex<Option<(String, Vec<EgressEndpoint>)>> = Mutex::new(None);

/// How often the agent looks at the table again ([`recheck`]): nothing
/// tells it when someone else deletes or changes it.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct Installed {
    /// (VNI, address) → (host ifindex, MAC) with route and neighbour.
    endpoints: BTreeMap<(u32, Ipv4Addr), (u32, [u8; 6])>,
    /// Networks with a rule, once the rules were brought in line.
    vnis: Option<BTreeSet<u32>>,
    /// The device whose forwarding ovl switched on, as the table's guard
    /// named it when this agent last wrote or read it. The table is the
    /// record, but an operator's `nft flush ruleset` (`systemctl restart
    /// nftables`) deletes it and leaves the forwarding on: written again
    /// without its guard, the host would forward everything arriving on
    /// the underlay, and `ovl detach` would leave that on.
    guarded: Option<String>,
}

/// The table as the kernel has it.
struct Table {
    chains: BTreeSet<String>,
    elements: Elements,
    /// The device whose forwarding ovl switched on: its guard rule's
    /// `iifname`.
    guarded: Option<String>,
    /// The comments of the rules in chain `published`: which ports they
    /// publish ([`PortRule::comment`]).
    published: BTreeSet<String>,
    /// The version its fixed part carries ([`version`]); `None` from an
    /// agent that marked none.
    version: Option<String>,
}

/// A published port of a local container, as a DNAT rule and the rule
/// before it that leaves spoofed packets alone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortRule {
    mark: u32,
    ip: Ipv4Addr,
    port: PublishedPort,
    /// The container's network's subnets: a packet from one of their
    /// addresses arriving from outside is spoofed (the overlay's own
    /// traffic never comes this way), and translating it would let a
    /// client anywhere pass as the container's peer — and have the
    /// container's answer sent to that peer, across the overlay. From a
    /// container (marked by the egress program, which lets it send only
    /// as itself) such an address is the hairpin's client.
    subnets: Vec<Subnet>,
}

/// The longest comment nftables keeps on a rule.
const MAX_COMMENT: usize = 128;

impl PortRule {
    /// What the DNAT rule is, in its comment: how the table tells it has
    /// the rules it should.
    fn comment(&self) -> String {
        format!("{:#x} {} {}", self.mark, self.ip, self.port.mapping())
    }

    /// What the rule leaving spoofed packets untranslated is, in its
    /// comment. The subnets are named while they fit (a network's subnets
    /// are fixed for its life, so their count stands in for them beyond).
    fn spoofed_comment(&self) -> String {
        let head = format!("{} untranslated from outside as", self.comment());
        let subnets: Vec<String> = self.subnets.iter().map(Subnet::to_string).collect();
        let named = format!("{head} {}", subnets.join(","));
        if named.len() <= MAX_COMMENT {
            named
        } else {
            format!("{head} its {} subnets", subnets.len())
        }
    }

    /// The comments of [`PortRule::nft`]'s rules.
    fn comments(&self) -> Vec<String> {
        let mut comments = Vec::new();
        if !self.subnets.is_empty() {
            comments.push(self.spoofed_comment());
        }
        comments.push(self.comment());
        comments
    }

    /// The rules, in order, for chain `published`: packets from outside in
    /// the name of the network's addresses return untranslated (nftables
    /// has no "or": the DNAT rule itself takes both the outside's other
    /// addresses and every container), then the DNAT.
    fn nft(&self) -> Vec<String> {
        let p = &self.port;
        let daddr = p
            .host_ip
            .map(|ip| format!("ip daddr {ip} "))
            .unwrap_or_default();
        let dport = format!("{daddr}{} dport {}", p.protocol, p.host_port);
        let mut rules = Vec::new();
        if !self.subnets.is_empty() {
            let list: Vec<String> = self.subnets.iter().map(Subnet::to_string).collect();
            rules.push(format!(
                "meta mark & {EGRESS_MARK_MASK:#x} != {EGRESS_MARK_BASE:#x} ip saddr {{ {} }} {dport} return comment \"{}\"",
                list.join(", "),
                self.spoofed_comment()
            ));
        }
        rules.push(format!(
            "{dport} meta mark set {mark:#x} ct mark set {mark:#x} dnat to {ip}:{container} comment \"{comment}\"",
            mark = self.mark,
            ip = self.ip,
            container = p.container_port,
            comment = self.comment()
        ));
        rules
    }
}

/// The DNAT rules `endpoints` publish.
fn port_rules(endpoints: &[EgressEndpoint]) -> BTreeSet<PortRule> {
    endpoints
        .iter()
        .flat_map(|e| {
            e.ports.iter().map(|p| PortRule {
                mark: egress_mark(e.vni),
                ip: e.ip,
                port: *p,
                subnets: e.subnets.clone(),
            })
        })
        .collect()
}

/// Replaces chain `published`'s rules with `rules`.
fn published_script(rules: &BTreeSet<PortRule>) -> String {
    let mut s = format!("flush chain ip {TABLE} {PUBLISHED_CHAIN}\n");
    for rule in rules.iter().flat_map(PortRule::nft) {
        s.push_str(&format!("add rule ip {TABLE} {PUBLISHED_CHAIN} {rule}\n"));
    }
    s
}

/// Makes the host masquerade and route back the external traffic of
/// `endpoints` (the local containers of networks that lead out) through
/// `underlay`, and forgets containers that are gone (translations
/// included). With `recheck`, what this agent installed is looked at
/// again too, not only the table: others change it with nothing telling
/// the agent — systemd-networkd deletes routing policy rules it did not
/// make whenever it reconfigures (`ManageForeignRoutingPolicyRules=`, on
/// by default), and `sysctl net.ipv4.ip_forward=0` (a hardening
/// profile's) switches forwarding off on every device, the veths too.
pub fn ensure(underlay: &str, endpoints: &[EgressEndpoint], recheck: bool) -> Result<()> {
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if recheck && let Some(installed) = installed.as_mut() {
        installed.vnis = None;
    }
    let table = if endpoints.is_empty() && installed.is_none() {
        // Nothing leads out here: touch the kernel only to clean up what an
        // earlier agent left, and need no nft on hosts that never egress.
        match read_table() {
            Ok(None) | Err(_) => return Ok(()),
            Ok(Some(t)) => Some(t),
        }
    } else {
        read_table()?
    };
    let memory = installed.get_or_insert_with(Installed::default);
    let had = table
        .as_ref()
        .map(|t| t.elements.clone())
        .unwrap_or_default();
    let want = Elements::wanted(
        endpoints
            .iter()
            .map(|e| (e.ip, egress_mark(e.vni)))
            .collect(),
        &had,
    );
    let rules = port_rules(endpoints);

    // A guard naming another device was left by an agent on a former
    // underlay: ovl switched that device's forwarding on, so it goes off
    // again, and the guard is written anew for this underlay if needed.
    // (Left as it was, the former device would forward with a guard and
    // this one without, and `ovl detach` would switch off the wrong one.)
    let recorded = table
        .as_ref()
        .and_then(|t| t.guarded.clone())
        .or_else(|| memory.guarded.clone());
    let former = recorded.clone().filter(|g| g != underlay);
    // Where the host forwards by its owner's choice — dockerd switches
    // `ip_forward` on for its bridge — ovl's switch is no longer what
    // makes a device forward, and switching it off, or guarding it, would
    // cut off what the host forwards for others (Docker's bridge
    // containers' replies and published ports arrive on the underlay).
    let host_forwards = host_forwarding()?;
    if let Some(former) = &former
        && !host_forwards
        && has_ipv4_conf(former)
    {
        set_sysctl(former, "forwarding", "0")?;
        log::info!("switched IPv4 forwarding on {former} (a former underlay) off again");
    }

    // Forwarding is switched on only after the table holds the guard that
    // records ovl did it (and forwards nothing but replies): were it
    // switched on first, a failed `nft` or an agent killed in between would
    // leave the host forwarding with no guard and no record, and `ovl
    // detach` would not switch it off.
    let switch_forwarding_on = !endpoints.is_empty() && !ipv4_forwarding(underlay)?;
    let guarded = recorded.is_some()
        || table
            .as_ref()
            .is_some_and(|t| t.chains.contains(GUARD_CHAIN));
    let guard = switch_forwarding_on || (former.is_none() && guarded && !host_forwards);
    if let Some(device) = recorded.as_deref()
        && guarded
        && !guard
        && host_forwards
    {
        log::info!(
            "the host forwards IPv4 now (net.ipv4.ip_forward is on, as dockerd sets it): \
             ovl's guard on {device} goes, and `ovl detach` leaves its forwarding on"
        );
    }
    // A table of another version (an agent before or after this one: other
    // rules, maybe in the same chains) is replaced whole, as is one that
    // lacks a chain.
    let complete = former.is_none()
        && table.as_ref().is_some_and(|t| {
            CHAINS.iter().all(|c| t.chains.contains(*c))
                && t.chains.contains(GUARD_CHAIN) == guard
                && t.version.as_deref() == Some(version().as_str())
        });
    if !complete {
        if table.is_some() || !endpoints.is_empty() || guard {
            nft(&table_script(
                table.is_some(),
                underlay,
                guard,
                &want,
                &rules,
            ))?;
        }
    } else {
        let mut script = String::new();
        if had != want {
            script.push_str(&element_script(&had, &want));
        }
        let comments: BTreeSet<String> = rules.iter().flat_map(PortRule::comments).collect();
        if table.as_ref().is_some_and(|t| t.published != comments) {
            script.push_str(&published_script(&rules));
        }
        if !script.is_empty() {
            nft(&script)?;
        }
    }
    memory.guarded = guard.then(|| underlay.to_owned());
    if switch_forwarding_on {
        enable_forwarding(underlay)?;
    }

    // Containers that left: their translations and route go, once their
    // element and DNAT rules are gone (above). Deleted first, a client
    // still sending to a published port would have its next packet
    // translated again by the rule still there, and that entry would
    // outlive the container — and reach whoever takes its address next.
    for (addr, mark) in had.endpoints.difference(&want.endpoints) {
        forget_translations(*addr, *mark, had.zone(*mark))?;
        // Gone with the veth, usually: nothing to delete then.
        let _ = ip(&[
            "route",
            "del",
            &format!("{addr}/32"),
            "table",
            &mark.to_string(),
        ]);
    }

    // An address whose holder changed — a container left and another took
    // its address, in one batch or while no agent ran — keeps the leaver's
    // translations under the same (address, mark), and replies to them
    // would reach the newcomer. The holder is the veth its return route
    // leads to: remembered while the agent runs, read back from the
    // kernel's routes after a start. Before the routes are replaced below.
    let mut routes: BTreeMap<u32, BTreeMap<Ipv4Addr, String>> = BTreeMap::new();
    for e in endpoints {
        let mark = egress_mark(e.vni);
        if !had.endpoints.contains(&(e.ip, mark)) {
            continue; // nobody held it with a way out: nothing to inherit
        }
        let same_holder = match memory.endpoints.get(&(e.vni, e.ip)) {
            Some((ifindex, _)) => *ifindex == e.ifindex,
            None => {
                let table = match routes.entry(mark) {
                    std::collections::btree_map::Entry::Occupied(t) => t.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => v.insert(return_routes(mark)?),
                };
                table.get(&e.ip) == Some(&e.ifname)
            }
        };
        if !same_holder {
            log::info!(
                "{} changed hands on VNI {}: forgetting its previous holder's translations",
                e.ip,
                e.vni
            );
            forget_translations(e.ip, mark, had.zone(mark))?;
        }
    }

    // Return routes, neighbours and forwarding on the veths. One veth
    // that cannot take them (a host end a killed connect left down, a
    // veth gone since it was planned) leaves the others theirs, and the
    // rules and firewall below: its error is returned at the end, and it
    // is tried again at the next apply.
    let mut failed: Option<anyhow::Error> = None;
    let mut not_done: BTreeSet<(u32, Ipv4Addr)> = BTreeSet::new();
    let mut batch = String::new();
    let mut batched = Vec::new();
    for e in endpoints {
        let installed = memory.endpoints.get(&(e.vni, e.ip)) == Some(&(e.ifindex, e.mac));
        if installed && !recheck {
            continue;
        }
        if let Err(err) = veth_sysctls(e) {
            failed.get_or_insert(err);
            not_done.insert((e.vni, e.ip));
            continue;
        }
        if installed {
            continue;
        }
        let table = egress_mark(e.vni);
        batch.push_str(&format!(
            "route replace {}/32 dev {} table {table}\n\
             neigh replace {} lladdr {} dev {} nud permanent\n",
            e.ip,
            e.ifname,
            e.ip,
            mac_text(e.mac),
            e.ifname
        ));
        batched.push((e.vni, e.ip));
    }
    // `-force`: every line is tried; which failed is not told apart, so
    // all of this batch's are tried again next time (they replace).
    if !batch.is_empty()
        && let Err(err) = ip_batch(&batch)
    {
        failed.get_or_insert(err);
        not_done.extend(batched);
    }
    memory.endpoints = endpoints
        .iter()
        .filter(|e| !not_done.contains(&(e.vni, e.ip)))
        .map(|e| ((e.vni, e.ip), (e.ifindex, e.mac)))
        .collect();

    let vnis: BTreeSet<u32> = endpoints.iter().map(|e| e.vni).collect();
    if memory.vnis.as_ref() != Some(&vnis) {
        sync_rules(&vnis)?;
        memory.vnis = Some(vnis);
    }
    // A FORWARD policy of DROP (dockerd's) must not drop what the host
    // forwards for ovl.
    if !endpoints.is_empty() {
        host_firewall::ensure_logged(underlay);
    }
    failed.map_or(Ok(()), Err)
}

/// Forwarding (and what goes with it) on the host end of `e`'s veth.
fn veth_sysctls(e: &EgressEndpoint) -> Result<()> {
    set_sysctl(&e.ifname, "forwarding", "1")?;
    // Marked packets from the container are checked against the
    // container's table by rp_filter, where it is on.
    set_sysctl(&e.ifname, "src_valid_mark", "1")?;
    // The host's own connections to a published port through 127.0.0.1
    // (`curl localhost:8080`, which Docker's userland proxy serves) leave
    // through the veth from a loopback address, and their replies come
    // back to one. What the container itself sends to 127/8 is dropped in
    // chain `prerouting`.
    if !e.ports.is_empty() {
        set_sysctl(&e.ifname, "route_localnet", "1")?;
    }
    Ok(())
}

/// [`ensure`], logging a failure once rather than at every resync (the
/// overlay itself forwards whatever happens here). Unless `recheck`, the
/// kernel is left alone when `endpoints` are those of the last success:
/// reading the table forks `nft`, which costs more than the rest of an
/// apply of one changed endpoint (a whole apply rechecks, and repairs).
/// Where nothing leads out and nothing did at the last success, there is
/// nothing to recheck: a node without external egress forks no `nft` on
/// the whole applies that every burst of link events brings.
pub fn ensure_logged(underlay: &str, endpoints: &[EgressEndpoint], recheck: bool) {
    static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);
    {
        let mut asked = LAST_ASKED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if asked
            .as_ref()
            .is_none_or(|(u, e)| u != underlay || e.as_slice() != endpoints)
        {
            *asked = Some((underlay.to_owned(), endpoints.to_vec()));
        }
    }
    let mut done = LAST_DONE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if (!recheck || endpoints.is_empty())
        && done
            .as_ref()
            .is_some_and(|(u, e)| u == underlay && e.as_slice() == endpoints)
    {
        return;
    }
    let outcome = ensure(underlay, endpoints, recheck).map_err(|e| format!("{e:#}"));
    *done = outcome
        .is_ok()
        .then(|| (underlay.to_owned(), endpoints.to_vec()));
    let mut last = LAST_ERROR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match outcome {
        Ok(()) => {
            if last.take().is_some() {
                log::info!("external egress is set up again");
            }
        }
        Err(e) => {
            if last.as_deref() != Some(e.as_str()) {
                log::warn!("external egress cannot be set up: {e}");
            }
            *last = Some(e);
        }
    }
}

/// [`ensure_logged`] again for the last request, looking at the kernel:
/// an operator's `nft flush ruleset` (Debian's `/etc/nftables.conf` starts
/// with one, so `systemctl restart nftables` runs it) deletes the table
/// with no event the agent hears, and until it is back containers' packets
/// leave untranslated and published ports take nothing. Costs one `nft`
/// run where containers lead out, none elsewhere.
pub fn recheck() {
    let asked = LAST_ASKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    if let Some((underlay, endpoints)) = asked {
        ensure_logged(&underlay, &endpoints, true);
    }
}

/// Removes everything [`ensure`] installed (for `ovl detach`): the table,
/// the rules and routes, every translation of ovl's containers, and the
/// underlay's forwarding where ovl had switched it on (the device its
/// guard names). Returns what it did.
pub fn remove() -> Result<Vec<String>> {
    let mut done = Vec::new();
    *LAST_DONE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    *INSTALLED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    *LAST_ASKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    let table = match read_table() {
        Ok(t) => t,
        // No nft here: ovl cannot have installed a table either.
        Err(e) if e.to_string().contains("cannot run nft") => None,
        Err(e) => return Err(e),
    };
    if let Some(table) = &table {
        match (&table.guarded, table.chains.contains(GUARD_CHAIN)) {
            // A device unplugged or unloaded took its forwarding along.
            (Some(underlay), _) if !has_ipv4_conf(underlay) => {
                done.push(format!(
                    "{underlay}, whose IPv4 forwarding ovl had switched on, is gone"
                ));
            }
            (Some(underlay), _) if host_forwarding()? => done.push(format!(
                "left IPv4 forwarding on {underlay} on: the host forwards (net.ipv4.ip_forward)"
            )),
            (Some(underlay), _) => {
                set_sysctl(underlay, "forwarding", "0")?;
                done.push(format!("switched IPv4 forwarding on {underlay} off again"));
            }
            (None, true) => bail!(
                "the nftables chain ip {TABLE} {GUARD_CHAIN} names no interface, so ovl cannot \
                 tell whose IPv4 forwarding it switched on; inspect it with \
                 `nft list table ip {TABLE}`, switch that forwarding off by hand and delete \
                 the table"
            ),
            (None, false) => {}
        }
        nft(&format!("delete table ip {TABLE}\n"))?;
        done.push(format!(
            "removed the nftables table ip {TABLE} ({} masqueraded container(s))",
            table.elements.endpoints.len()
        ));
    }
    let rules = ovl_rules()?;
    let prio = RULE_PRIORITY.to_string();
    for (mark, table) in &rules {
        let (mark, table) = (mark.to_string(), table.to_string());
        ip(&[
            "rule", "del", "priority", &prio, "fwmark", &mark, "table", &table,
        ])?;
    }
    // Every table numbered as ovl's marks, also one whose rule someone
    // else deleted (systemd-networkd deletes rules it did not make).
    let tables: BTreeSet<u32> = rules.values().copied().chain(route_tables()?).collect();
    for table in &tables {
        let _ = ip(&["route", "flush", "table", &table.to_string()]);
    }
    if !tables.is_empty() {
        done.push(format!("removed {} egress routing table(s)", tables.len()));
    }
    if table.is_some() || !tables.is_empty() {
        let mark = format!("{EGRESS_MARK_BASE:#x}/{EGRESS_MARK_MASK:#x}");
        conntrack_delete(&["-m", &mark])?;
    }
    done.extend(host_firewall::remove()?);
    Ok(done)
}

/// The routing tables holding routes that are numbered as ovl's marks.
fn route_tables() -> Result<BTreeSet<u32>> {
    let out = ip(&["-j", "-4", "route", "show", "table", "all"])?;
    let routes: Value = serde_json::from_str(&out).context("parse `ip -j route show table all`")?;
    Ok(parse_route_tables(&routes))
}

fn parse_route_tables(routes: &Value) -> BTreeSet<u32> {
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| match &r["table"] {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .filter(|table| table & EGRESS_MARK_MASK == EGRESS_MARK_BASE)
        .collect()
}

/// The return routes of table `mark`: address → device.
fn return_routes(mark: u32) -> Result<BTreeMap<Ipv4Addr, String>> {
    let out = match ip(&["-j", "-4", "route", "show", "table", &mark.to_string()]) {
        Ok(out) => out,
        Err(e) if format!("{e}").contains("table does not exist") => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let routes: Value = serde_json::from_str(&out).context("parse `ip -j route show`")?;
    Ok(parse_routes(&routes))
}

fn parse_routes(routes: &Value) -> BTreeMap<Ipv4Addr, String> {
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["dst"].as_str()?.parse().ok()?,
                r["dev"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Deletes the conntrack entries (address translations included) of the
/// container `ip` of the network marked `mark`: those it opened (to the
/// outside and to published ports), and those its published ports took
/// (their replies come from it).
fn forget_translations(ip: Ipv4Addr, mark: u32, zone: u16) -> Result<()> {
    let zone = zone.to_string();
    let (ip, mark) = (ip.to_string(), mark.to_string());
    conntrack_delete(&["-s", &ip, "-m", &mark])?;
    conntrack_delete(&["-r", &ip, "-m", &mark])?;
    // Those it opened to published ports through a host address (hairpin)
    // carry the server's mark, and its network's zone.
    conntrack_delete(&["-s", &ip, "--orig-zone", &zone])
}

fn conntrack_delete(filter: &[&str]) -> Result<()> {
    let out = Command::new("conntrack")
        .arg("-D")
        .args(filter)
        .stdin(Stdio::null())
        .output()
        .context("cannot run conntrack (install conntrack-tools: `apt-get install conntrack`)")?;
    let text = String::from_utf8_lossy(&out.stderr);
    // Exit 1 with "0 flow entries have been deleted" is nothing to delete.
    if out.status.success() || text.contains("0 flow entries") {
        return Ok(());
    }
    bail!("conntrack -D {}: {}", filter.join(" "), text.trim())
}

/// Switches IPv4 forwarding on for `underlay` (replies to translated
/// packets arrive there and are forwarded to containers), once the table's
/// guard chain is in place.
fn enable_forwarding(underlay: &str) -> Result<()> {
    set_sysctl(underlay, "forwarding", "1")?;
    log::info!(
        "switched IPv4 forwarding on for {underlay} (replies of external egress are forwarded to containers; nothing else is)"
    );
    Ok(())
}

/// Whether IPv4 forwarding is on for device `ifname` (in this namespace).
pub fn ipv4_forwarding(ifname: &str) -> Result<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    let now = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(now.trim() == "1")
}

/// Whether device `ifname` exists here with IPv4 settings of its own.
fn has_ipv4_conf(ifname: &str) -> bool {
    Path::new(&format!("/proc/sys/net/ipv4/conf/{ifname}")).exists()
}

/// Whether the host forwards IPv4 by its owner's choice:
/// `net.ipv4.ip_forward` (ovl switches only its underlay's forwarding on,
/// never this; dockerd switches this on, on its default `--ip-forward`).
fn host_forwarding() -> Result<bool> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(PATH).with_context(|| format!("read {PATH}"))?;
    Ok(now.trim() == "1")
}

fn set_sysctl(ifname: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).with_context(|| format!("write {value} to {path}"))
}

/// The rules `fwmark M → table M` for `vnis`, and no other of ovl's.
fn sync_rules(vnis: &BTreeSet<u32>) -> Result<()> {
    let want: BTreeSet<u32> = vnis.iter().map(|v| egress_mark(*v)).collect();
    let have = ovl_rules()?;
    let prio = RULE_PRIORITY.to_string();
    for (mark, table) in &have {
        if !want.contains(mark) || mark != table {
            let (m, t) = (mark.to_string(), table.to_string());
            ip(&["rule", "del", "priority", &prio, "fwmark", &m, "table", &t])?;
        }
    }
    for mark in &want {
        if have.get(mark) == Some(mark) {
            continue;
        }
        let m = mark.to_string();
        ip(&["rule", "add", "priority", &prio, "fwmark", &m, "table", &m])?;
    }
    Ok(())
}

/// ovl's rules: mark → table, from `ip -j rule show`.
fn ovl_rules() -> Result<BTreeMap<u32, u32>> {
    let out = ip(&["-j", "-4", "rule", "show"])?;
    let rules: Value = serde_json::from_str(&out).context("parse `ip -j rule show`")?;
    Ok(parse_rules(&rules))
}

fn parse_rules(rules: &Value) -> BTreeMap<u32, u32> {
    let number = |v: &Value| -> Option<u32> {
        match v {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => match s.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            },
            _ => None,
        }
    };
    rules
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["priority"].as_u64() == Some(u64::from(RULE_PRIORITY)))
        .filter_map(|r| Some((number(&r["fwmark"])?, number(&r["table"])?)))
        .filter(|(mark, _)| mark & EGRESS_MARK_MASK == EGRESS_MARK_BASE)
        .collect()
}

/// The table, or `None` when there is none.
fn read_table() -> Result<Option<Table>> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "ip", TABLE])
        .stdin(Stdio::null())
        .output()
        .context("cannot run nft (install nftables: `apt-get install nftables`)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        bail!("nft list table ip {TABLE}: {}", err.trim());
    }
    let json: Value =
        serde_json::from_slice(&out.stdout).context("parse `nft -j list table` output")?;
    Ok(Some(parse_table(&json)))
}

fn parse_table(json: &Value) -> Table {
    let mut table = Table {
        chains: BTreeSet::new(),
        elements: Elements::default(),
        guarded: None,
        published: BTreeSet::new(),
        version: None,
    };
    for item in json["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item["chain"]["name"].as_str() {
            table.chains.insert(name.to_owned());
        }
        if item["rule"]["chain"].as_str() == Some(GUARD_CHAIN) {
            table.guarded = item["rule"]["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| &e["match"])
                .find(|m| m["left"]["meta"]["key"].as_str() == Some("iifname"))
                .and_then(|m| m["right"].as_str())
                .map(str::to_owned);
        }
        if item["rule"]["chain"].as_str() == Some(PUBLISHED_CHAIN)
            && let Some(comment) = item["rule"]["comment"].as_str()
        {
            table.published.insert(comment.to_owned());
        }
        if item["rule"]["chain"].as_str() == Some("zone")
            && let Some(comment) = item["rule"]["comment"].as_str()
            && comment.starts_with(VERSION_PREFIX)
        {
            table.version = Some(comment.to_owned());
        }
        if item["set"]["name"].as_str() == Some("endpoints") {
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                let parts = &e["concat"];
                let ip = parts[0].as_str().and_then(|s| s.parse().ok());
                let mark = parts[1].as_u64().and_then(|m| u32::try_from(m).ok());
                if let (Some(ip), Some(mark)) = (ip, mark) {
                    table.elements.endpoints.insert((ip, mark));
                }
            }
        }
        let pairs = |name: &str| -> Vec<(u64, u64)> {
            if item["map"]["name"].as_str() != Some(name) {
                return Vec::new();
            }
            item["map"]["elem"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| Some((e[0].as_u64()?, e[1].as_u64()?)))
                .collect()
        };
        for (mark, zone) in pairs("zones") {
            if let (Ok(mark), Ok(zone)) = (u32::try_from(mark), u16::try_from(zone)) {
                table.elements.zones.insert(mark, zone);
            }
        }
        for (zone, mark) in pairs("zone_networks") {
            if let (Ok(zone), Ok(mark)) = (u16::try_from(zone), u32::try_from(mark)) {
                table.elements.zone_networks.insert(zone, mark);
            }
        }
    }
    table
}

/// How the comment of the rule of chain `zone` starts, which names the
/// version of the table's fixed part.
const VERSION_PREFIX: &str = "ovl table ";

/// The version of the table's fixed part ([`fixed_part`]): a digest of
/// its text (FNV-1a, stable across builds), so that any change to a set,
/// chain or rule makes another version, with nobody to remember bumping
/// it.
fn version() -> String {
    let digest = fixed_part(VERSION_PREFIX)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("{VERSION_PREFIX}{digest:016x}")
}

/// The whole table, replacing any there is, in one transaction.
fn table_script(
    exists: bool,
    underlay: &str,
    guard: bool,
    elements: &Elements,
    rules: &BTreeSet<PortRule>,
) -> String {
    let mut s = String::new();
    if exists {
        s.push_str(&format!("delete table ip {TABLE}\n"));
    }
    s.push_str(&fixed_part(&version()));
    if guard {
        let ct_theirs = format!("ct mark & {EGRESS_MARK_MASK:#x} != {EGRESS_MARK_BASE:#x}");
        s.push_str(&format!(
            "\tchain {GUARD_CHAIN} {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{underlay}\" {ct_theirs} drop\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    s.push_str(&element_script(&Elements::default(), elements));
    if !rules.is_empty() {
        s.push_str(&published_script(rules));
    }
    s
}

/// The table's sets and chains but the guard, unclosed, with `version` as
/// the comment of chain `zone`'s rule. (The guard is left out of the
/// version: its presence and device are checked on their own.)
fn fixed_part(version: &str) -> String {
    let ours = format!("meta mark & {EGRESS_MARK_MASK:#x} == {EGRESS_MARK_BASE:#x}");
    let ct_ours = format!("ct mark & {EGRESS_MARK_MASK:#x} == {EGRESS_MARK_BASE:#x}");
    format!(
        "table ip {TABLE} {{\n\
         \tset endpoints {{ type ipv4_addr . mark; }}\n\
         \tmap zones {{ typeof meta mark : ct zone; }}\n\
         \tmap zone_networks {{ typeof ct zone : meta mark; }}\n\
         \tset own_replies {{ type mark . mark; }}\n\
         \tchain zone {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tct original zone set meta mark map @zones comment \"{version}\"\n\
         \t}}\n\
         \tchain {FOREIGN_REPLIES_CHAIN} {{\n\
         \t\ttype filter hook prerouting priority mangle - 1; policy accept;\n\
         \t\t{ours} ct direction reply meta mark . ct mark != @own_replies counter drop\n\
         \t}}\n\
         \tchain {INVALID_CHAIN} {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\t{ours} ct state invalid counter drop\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\t{ours} ip daddr 127.0.0.0/8 counter drop\n\
         \t\t{ours} ct direction original ct status ! dnat ct mark set meta mark\n\
         \t\tct direction original {ct_ours} meta mark set ct mark\n\
         \t\tct direction reply {ct_ours} meta mark set ct mark\n\
         \t\tct direction reply ct status dnat meta mark set ct original zone map @zone_networks\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype route hook output priority mangle; policy accept;\n\
         \t\tct direction original {ct_ours} meta mark set ct mark\n\
         \t\tct direction reply {ct_ours} meta mark set ct mark\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr . meta mark @endpoints masquerade\n\
         \t\tip saddr 127.0.0.0/8 {ours} masquerade\n\
         \t}}\n\
         \tchain {PUBLISHED_CHAIN} {{\n\
         \t}}\n\
         \tchain publish {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tfib daddr type local jump {PUBLISHED_CHAIN}\n\
         \t}}\n\
         \tchain publish_local {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tip daddr != 127.0.0.0/8 fib daddr type local jump {PUBLISHED_CHAIN}\n\
         \t\tip daddr 127.0.0.1 jump {PUBLISHED_CHAIN}\n\
         \t}}\n\
         \tchain {HAIRPIN_CHAIN} {{\n\
         \t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n\
         \t\tct status dnat ct original zone != 0 ip daddr . meta mark @endpoints snat to ct original ip daddr\n\
         \t}}\n"
    )
}

/// The entries of map `from` that `to` lacks or holds with another value.
/// A map's changed entries are deleted before its new ones are added (a
/// key cannot be added twice).
fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    from: &BTreeMap<K, V>,
    to: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    from.iter()
        .filter(|(k, v)| to.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// The changes to sets `endpoints` and `own_replies` and maps `zones` and
/// `zone_networks` that take the table from `had` to `want`.
fn element_script(had: &Elements, want: &Elements) -> String {
    let mut s = String::new();
    let mut statement = |verb: &str, name: &str, items: Vec<String>| {
        if !items.is_empty() {
            s.push_str(&format!(
                "{verb} element ip {TABLE} {name} {{ {} }}\n",
                items.join(", ")
            ));
        }
    };
    let endpoints = |a: &Elements, b: &Elements| -> Vec<String> {
        a.endpoints
            .difference(&b.endpoints)
            .map(|(ip, mark)| format!("{ip} . {mark:#x}"))
            .collect()
    };
    let marks = |a: &Elements, b: &Elements| -> Vec<String> {
        a.zones
            .keys()
            .filter(|mark| !b.zones.contains_key(mark))
            .map(|mark| format!("{mark:#x} . {mark:#x}"))
            .collect()
    };
    let zones = |from: &Elements, to: &Elements| -> Vec<String> {
        changed(&from.zones, &to.zones)
            .into_iter()
            .map(|(mark, zone)| format!("{mark:#x} : {zone}"))
            .collect()
    };
    let networks = |from: &Elements, to: &Elements, with_value: bool| -> Vec<String> {
        changed(&from.zone_networks, &to.zone_networks)
            .into_iter()
            .map(|(zone, mark)| {
                if with_value {
                    format!("{zone} : {mark:#x}")
                } else {
                    zone.to_string()
                }
            })
            .collect()
    };
    statement("delete", "endpoints", endpoints(had, want));
    statement("delete", "zones", zones(had, want));
    statement("delete", "own_replies", marks(had, want));
    statement("add", "zones", zones(want, had));
    statement("add", "own_replies", marks(want, had));
    statement("add", "endpoints", endpoints(want, had));
    statement("delete", "zone_networks", networks(had, want, false));
    statement("add", "zone_networks", networks(want, had, true));
    s
}

fn nft(script: &str) -> Result<()> {
    run_with_stdin("nft", &["-f", "-"], script)
        .with_context(|| format!("nft -f - with:\n{script}"))
        .map(|_| ())
}

fn ip_batch(batch: &str) -> Result<()> {
    run_with_stdin("ip", &["-force", "-batch", "-"], batch)
        .with_context(|| format!("ip -force -batch - with:\n{batch}"))
        .map(|_| ())
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_stdin(program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child
        .stdin
        .take()
        .context("child stdin")?
        .write_all(input.as_bytes())
        .with_context(|| format!("write to {program}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {program}"))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovls_rules_are_recognised_by_priority_and_mark() {
        let rules: Value = serde_json::from_str(
            r#"[{"priority":0,"src":"all","table":"local"},
                {"priority":1000,"src":"all","fwmark":"0x6f001000","table":"1862275072"},
                {"priority":1000,"src":"all","fwmark":"0x10","table":"7"},
                {"priority":2000,"src":"all","fwmark":"0x6f001001","table":"1862275073"},
                {"priority":32766,"src":"all","table":"main"}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_rules(&rules),
            BTreeMap::from([(0x6f00_1000, 0x6f00_1000)])
        );
    }

    #[test]
    fn route_tables_numbered_as_ovls_marks_are_found() {
        let json: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
               {"dst":"198.18.0.2","dev":"ovl0a1b2c3d","table":"1862275072","flags":[]},
               {"dst":"198.18.0.3","dev":"ovl4e5f6a7b","table":1862275073,"flags":[]},
               {"dst":"198.18.0.4","dev":"eth1","table":"7","flags":[]},
               {"type":"local","dst":"127.0.0.1","dev":"lo","table":"local","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_route_tables(&json),
            BTreeSet::from([0x6f00_1000, 0x6f00_1001])
        );
    }

    #[test]
    fn return_routes_map_addresses_to_their_veths() {
        let json: Value = serde_json::from_str(
            r#"[{"dst":"198.18.0.2","dev":"ovl0a1b2c3d","scope":"link","flags":[]},
               {"dst":"198.18.0.3","dev":"ovl4e5f6a7b","scope":"link","flags":["linkdown"]},
               {"dst":"default","dev":"eth0","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_routes(&json),
            BTreeMap::from([
                (Ipv4Addr::new(198, 18, 0, 2), "ovl0a1b2c3d".to_owned()),
                (Ipv4Addr::new(198, 18, 0, 3), "ovl4e5f6a7b".to_owned()),
            ])
        );
    }

    #[test]
    fn table_listing_yields_chains_and_endpoints() {
        let json: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
              {"table":{"family":"ip","name":"ovl","handle":1}},
              {"set":{"family":"ip","name":"endpoints","table":"ovl","type":["ipv4_addr","mark"],
                "elem":[{"concat":["198.18.0.2",1862275072]},{"concat":["198.18.1.2",1862275073]}]}},
              {"map":{"family":"ip","name":"zones","table":"ovl","type":"mark","map":"integer",
                "elem":[[1862275072,4096],[1862340608,1]]}},
              {"map":{"family":"ip","name":"zone_networks","table":"ovl","type":"integer","map":"mark",
                "elem":[[4096,1862275072]]}},
              {"chain":{"family":"ip","table":"ovl","name":"prerouting"}},
              {"chain":{"family":"ip","table":"ovl","name":"underlay_guard"}},
              {"rule":{"family":"ip","table":"ovl","chain":"underlay_guard","handle":2,"expr":[
                {"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth0"}},
                {"match":{"op":"!=","left":{"ct":{"key":"mark"}},
                  "right":{"prefix":{"addr":1862270976,"len":16}}}},
                {"drop":null}]}}]}"#,
        )
        .unwrap();
        let t = parse_table(&json);
        assert_eq!(
            t.chains,
            BTreeSet::from(["prerouting".to_owned(), "underlay_guard".to_owned()])
        );
        assert_eq!(
            t.elements.endpoints,
            BTreeSet::from([
                (Ipv4Addr::new(198, 18, 0, 2), 0x6f00_1000),
                (Ipv4Addr::new(198, 18, 1, 2), 0x6f00_1001)
            ])
        );
        assert_eq!(
            t.elements.zones,
            BTreeMap::from([(0x6f00_1000, 4096), (0x6f01_1000, 1)])
        );
        assert_eq!(
            t.elements.zone_networks,
            BTreeMap::from([(4096, 0x6f00_1000)])
        );
        assert_eq!(t.guarded.as_deref(), Some("eth0"));
    }

    #[test]
    fn published_ports_are_dnat_rules_that_mark_their_network() {
        let rule = |ip: [u8; 4], port: &str| PortRule {
            mark: 0x6f00_1000,
            ip: Ipv4Addr::from(ip),
            port: port.parse().unwrap(),
            subnets: vec![
                "198.18.0.0/24".parse().unwrap(),
                "198.18.1.0/24".parse().unwrap(),
            ],
        };
        let rules = BTreeSet::from([
            rule([198, 18, 0, 2], "8080:80"),
            rule([198, 18, 0, 2], "192.0.2.10:5353:53/udp"),
        ]);
        let s = published_script(&rules);
        assert_eq!(
            s,
            "flush chain ip ovl published\n\
             add rule ip ovl published meta mark & 0xff000000 != 0x6f000000 ip saddr { 198.18.0.0/24, 198.18.1.0/24 } tcp dport 8080 return comment \"0x6f001000 198.18.0.2 0.0.0.0:8080->80/tcp untranslated from outside as 198.18.0.0/24,198.18.1.0/24\"\n\
             add rule ip ovl published tcp dport 8080 meta mark set 0x6f001000 ct mark set 0x6f001000 dnat to 198.18.0.2:80 comment \"0x6f001000 198.18.0.2 0.0.0.0:8080->80/tcp\"\n\
             add rule ip ovl published meta mark & 0xff000000 != 0x6f000000 ip saddr { 198.18.0.0/24, 198.18.1.0/24 } ip daddr 192.0.2.10 udp dport 5353 return comment \"0x6f001000 198.18.0.2 192.0.2.10:5353->53/udp untranslated from outside as 198.18.0.0/24,198.18.1.0/24\"\n\
             add rule ip ovl published ip daddr 192.0.2.10 udp dport 5353 meta mark set 0x6f001000 ct mark set 0x6f001000 dnat to 198.18.0.2:53 comment \"0x6f001000 198.18.0.2 192.0.2.10:5353->53/udp\"\n"
        );
        // Many subnets: the comment stays within nftables' limit.
        let many = PortRule {
            subnets: (0..40)
                .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
                .collect(),
            ..rule([198, 18, 0, 2], "8080:80")
        };
        assert_eq!(
            many.spoofed_comment(),
            "0x6f001000 198.18.0.2 0.0.0.0:8080->80/tcp untranslated from outside as its 40 subnets"
        );
        assert!(many.nft()[0].contains("10.39.0.0/16 }"), "{:?}", many.nft());
        let t = table_script(false, "eth0", false, &Elements::default(), &rules);
        assert!(t.contains("\t\tfib daddr type local jump published"), "{t}");
        assert!(t.ends_with(&s), "{t}");
        // What the table lists is what tells the rules are there: both of
        // a port's rules.
        let json: Value = serde_json::from_str(
            r#"{"nftables":[{"chain":{"family":"ip","table":"ovl","name":"published"}},
              {"rule":{"family":"ip","table":"ovl","chain":"published","handle":9,
                "comment":"0x6f001000 198.18.0.2 0.0.0.0:8080->80/tcp untranslated from outside as 198.18.0.0/24,198.18.1.0/24","expr":[]}},
              {"rule":{"family":"ip","table":"ovl","chain":"published","handle":10,
                "comment":"0x6f001000 198.18.0.2 0.0.0.0:8080->80/tcp","expr":[]}},
              {"rule":{"family":"ip","table":"ovl","chain":"published","handle":11,
                "comment":"0x6f001000 198.18.0.2 0.0.0.0:8081->80/tcp","expr":[]}}]}"#,
        )
        .unwrap();
        let listed = parse_table(&json).published;
        let comments = |r: PortRule| r.comments().into_iter().collect::<BTreeSet<_>>();
        assert!(
            comments(rule([198, 18, 0, 2], "8080:80")).is_subset(&listed),
            "{listed:?}"
        );
        assert!(
            !comments(rule([198, 18, 0, 2], "8081:80")).is_subset(&listed),
            "a port without its rule for spoofed sources passes for current"
        );
    }

    #[test]
    fn hairpin_connections_are_translated_both_ways_and_answered_by_the_clients_network() {
        let t = table_script(false, "eth0", false, &Elements::default(), &BTreeSet::new());
        // Containers' packets to a host address reach the published ports;
        // a translated connection keeps the server's mark in its original
        // direction, takes the client's zone's network in its replies, and
        // has its source translated when a container opened it to a
        // container (not where another DNAT of the host's sent it).
        for line in [
            "\t\tfib daddr type local jump published\n",
            "meta mark & 0xff000000 == 0x6f000000 ct direction original ct status ! dnat ct mark set meta mark\n",
            "ct direction reply ct status dnat meta mark set ct original zone map @zone_networks\n",
            // A container's packet conntrack takes for the reply of another
            // network's connection (its address is shared) is dropped.
            "meta mark & 0xff000000 == 0x6f000000 ct direction reply meta mark . ct mark != @own_replies counter drop\n",
            "chain hairpin {\n\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n\
             \t\tct status dnat ct original zone != 0 ip daddr . meta mark @endpoints snat to ct original ip daddr\n",
        ] {
            assert!(t.contains(line), "no {line:?} in {t}");
        }
        // A zone is one network's: a network whose VNI differs by 65536
        // from another's gets the lowest free one, and keeps it.
        let a = (Ipv4Addr::new(198, 18, 0, 2), 0x6f00_1000);
        let b = (Ipv4Addr::new(198, 18, 0, 3), 0x6f01_1000);
        let c = (Ipv4Addr::new(198, 18, 0, 4), 0x6f00_1001);
        let none = Elements::default();
        let ac = Elements::wanted(BTreeSet::from([a, c]), &none);
        let abc = Elements::wanted(BTreeSet::from([a, b, c]), &ac);
        let b_only = Elements::wanted(BTreeSet::from([b]), &abc);
        assert_eq!(
            element_script(&none, &ac),
            "add element ip ovl zones { 0x6f001000 : 4096, 0x6f001001 : 4097 }\n\
             add element ip ovl own_replies { 0x6f001000 . 0x6f001000, 0x6f001001 . 0x6f001001 }\n\
             add element ip ovl endpoints { 198.18.0.2 . 0x6f001000, 198.18.0.4 . 0x6f001001 }\n\
             add element ip ovl zone_networks { 4096 : 0x6f001000, 4097 : 0x6f001001 }\n"
        );
        assert_eq!(
            element_script(&ac, &abc),
            "add element ip ovl zones { 0x6f011000 : 1 }\n\
             add element ip ovl own_replies { 0x6f011000 . 0x6f011000 }\n\
             add element ip ovl endpoints { 198.18.0.3 . 0x6f011000 }\n\
             add element ip ovl zone_networks { 1 : 0x6f011000 }\n"
        );
        assert_eq!(
            element_script(&abc, &b_only),
            "delete element ip ovl endpoints { 198.18.0.2 . 0x6f001000, 198.18.0.4 . 0x6f001001 }\n\
             delete element ip ovl zones { 0x6f001000 : 4096, 0x6f001001 : 4097 }\n\
             delete element ip ovl own_replies { 0x6f001000 . 0x6f001000, 0x6f001001 . 0x6f001001 }\n\
             delete element ip ovl zone_networks { 4096, 4097 }\n"
        );
        // A table of an agent that let two networks share a zone: the
        // first keeps it, the other gets its own.
        let shared = Elements {
            endpoints: BTreeSet::from([a, b]),
            zones: BTreeMap::from([(a.1, 4096), (b.1, 4096)]),
            zone_networks: BTreeMap::new(),
        };
        let apart = Elements::wanted(shared.endpoints.clone(), &shared);
        assert_eq!(
            element_script(&shared, &apart),
            "delete element ip ovl zones { 0x6f011000 : 4096 }\n\
             add element ip ovl zones { 0x6f011000 : 1 }\n\
             add element ip ovl zone_networks { 1 : 0x6f011000, 4096 : 0x6f001000 }\n"
        );
        assert_eq!(apart.zone(b.1), 1);
    }

    #[test]
    fn a_table_carries_the_version_of_its_fixed_part() {
        let v = version();
        assert_eq!(v.len(), VERSION_PREFIX.len() + 16, "{v}");
        let t = table_script(false, "eth0", true, &Elements::default(), &BTreeSet::new());
        assert!(
            t.contains(&format!(
                "ct original zone set meta mark map @zones comment \"{v}\"\n"
            )),
            "{t}"
        );
        // The guard's device is checked on its own, not versioned.
        assert!(!fixed_part(&v).contains(GUARD_CHAIN));
        let listing = |comment: &str| -> Table {
            let json = serde_json::json!({"nftables": [
                {"chain": {"family": "ip", "table": "ovl", "name": "zone"}},
                {"rule": {"family": "ip", "table": "ovl", "chain": "zone", "handle": 3,
                    "comment": comment, "expr": []}},
            ]});
            parse_table(&json)
        };
        assert_eq!(listing(&v).version.as_deref(), Some(v.as_str()));
        assert_eq!(listing("something else").version, None);
    }

    #[test]
    fn scripts_name_ovls_mark_and_elements() {
        let els = Elements::wanted(
            BTreeSet::from([(Ipv4Addr::new(198, 18, 0, 2), 0x6f00_1000)]),
            &Elements::default(),
        );
        let s = table_script(true, "eth0", true, &els, &BTreeSet::new());
        assert!(s.starts_with("delete table ip ovl\n"), "{s}");
        assert!(
            s.contains("iifname \"eth0\" ct mark & 0xff000000 != 0x6f000000 drop"),
            "{s}"
        );
        assert!(
            s.contains("add element ip ovl endpoints { 198.18.0.2 . 0x6f001000 }"),
            "{s}"
        );
        assert!(
            s.contains("add element ip ovl zones { 0x6f001000 : 4096 }")
                && s.contains("ct original zone set meta mark map @zones"),
            "{s}"
        );
        // A network's zone comes with its first container, goes with its last.
        let a = (Ipv4Addr::new(198, 18, 0, 2), 0x6f00_1000);
        let b = (Ipv4Addr::new(198, 18, 0, 2), 0x6f00_1001);
        let c = (Ipv4Addr::new(198, 18, 0, 3), 0x6f00_1001);
        let only_a = Elements::wanted(BTreeSet::from([a]), &Elements::default());
        let abc = Elements::wanted(BTreeSet::from([a, b, c]), &only_a);
        let ac = Elements::wanted(BTreeSet::from([a, c]), &abc);
        let only_c = Elements::wanted(BTreeSet::from([c]), &ac);
        let s = element_script(&only_a, &abc);
        assert_eq!(
            s,
            "add element ip ovl zones { 0x6f001001 : 4097 }\n\
             add element ip ovl own_replies { 0x6f001001 . 0x6f001001 }\n\
             add element ip ovl endpoints { 198.18.0.2 . 0x6f001001, 198.18.0.3 . 0x6f001001 }\n\
             add element ip ovl zone_networks { 4097 : 0x6f001001 }\n"
        );
        let s = element_script(&abc, &ac);
        assert_eq!(
            s,
            "delete element ip ovl endpoints { 198.18.0.2 . 0x6f001001 }\n"
        );
        let s = element_script(&ac, &only_c);
        assert_eq!(
            s,
            "delete element ip ovl endpoints { 198.18.0.2 . 0x6f001000 }\n\
             delete element ip ovl zones { 0x6f001000 : 4096 }\n\
             delete element ip ovl own_replies { 0x6f001000 . 0x6f001000 }\n\
             delete element ip ovl zone_networks { 4096 }\n"
        );
        assert_eq!(zone_of(0x6f01_0000), 1, "never the host's zone 0");
        let s = table_script(false, "eth0", false, &Elements::default(), &BTreeSet::new());
        assert!(!s.contains("delete") && !s.contains(GUARD_CHAIN), "{s}");
    }
}
