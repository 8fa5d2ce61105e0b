// The golden tests' and the micro-benchmark's world: ovl's programs loaded
// in a throwaway network namespace, maps filled as an agent would fill them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ovl_common::{
    Endpoint, Iface, NetworkInfo, NodeConfig, SubnetInfo, VtepInfo, maps::vtep_flags,
};
use ovl_tests::{Lab, Netns};
use ovl_userspace::datapath::Datapath;
use ovl_userspace::{netlink, netns};

use super::frames::container_mac;

/// The network's VXLAN network identifier.
pub const VNI: u32 = 4096;
/// Overlay MTU over a 1500-byte underlay.
pub const OVERLAY_MTU: u32 = 1450;
/// This node's VTEP address.
pub const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The peer VTEP, one routed hop away.
pub const REMOTE_VTEP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The stand-in underlay device's MAC.
pub const UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
/// The underlay gateway's MAC (a permanent neighbour entry).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// A local container on the test-run device (ifindex 1, `lo`).
pub const LOCAL_CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A container behind [`REMOTE_VTEP`].
pub const REMOTE_CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// A second local container, on a made-up ifindex.
pub const NEIGHBOUR_CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// The made-up host-side ifindex of [`NEIGHBOUR_CONTAINER`].
const NEIGHBOUR_IFINDEX: u32 = 77;
/// The network's first subnet (of [`LOCAL_CONTAINER`] and the others
/// above) and its gateway.
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Its gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The network's second subnet.
pub const OTHER_SUBNET: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
/// Its gateway.
pub const OTHER_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Prefix length of both subnets.
const SUBNET_PREFIX: u8 = 24;
/// A local container in the second subnet (behind the made-up ifindex
/// too: the tests only look at where frames are redirected).
pub const OTHER_SUBNET_CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
/// A container in the second subnet behind [`REMOTE_VTEP`].
pub const OTHER_SUBNET_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 6);
/// The device BPF_PROG_TEST_RUN runs TC programs on: `lo`.
pub const TEST_RUN_IFINDEX: u32 = 1;
/// The stand-in underlay device.
pub const UNDERLAY_IFACE: &str = "ul0";
/// The stand-in for the agent's crypto device ([`Fixture::add_crypto_device`]).
pub const CRYPTO_IFACE: &str = "cr0";

/// Loaded programs with one network (VNI [`VNI`]) whose endpoints are two
/// local containers and one remote, inside a namespace with a routed
/// underlay. Field order is drop order: programs, then the thread's return
/// to its namespace, then the lab.
pub struct Fixture {
    pub datapath: Datapath,
    _inside: netns::Entered,
    netns: Netns,
    pin_dir: PathBuf,
    /// The network's `network_flags` and the remote VTEP's `vtep_flags`,
    /// as last written.
    network_flags: u32,
    remote_vtep_flags: u32,
    _lab: Lab,
}

impl Fixture {
    /// Builds the namespace, moves this thread into it and loads ovl's
    /// kernel programs there.
    pub fn new(tag: &str) -> Result<Fixture> {
        let lab = Lab::new(tag)?;
        let ns = lab.netns("bed")?;
        // A veth pair stands in for the underlay NIC: the FIB lookups of
        // encapsulation need a real device, route and neighbour.
        ns.ip(&[
            "link",
            "add",
            UNDERLAY_IFACE,
            "address",
            &mac_text(UNDERLAY_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "ul0p",
        ])?;
        ns.ip(&["addr", "add", "192.0.2.10/24", "dev", UNDERLAY_IFACE])?;
        ns.ip(&["link", "set", "ul0p", "up"])?;
        ns.ip(&["link", "set", UNDERLAY_IFACE, "up"])?;
        ns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1"])?;
        ns.ip(&[
            "neigh",
            "replace",
            "192.0.2.1",
            "lladdr",
            &mac_text(GATEWAY_MAC),
            "dev",
            UNDERLAY_IFACE,
            "nud",
            "permanent",
        ])?;
        let pin_dir = lab.bpffs()?.join("node");
        std::fs::create_dir(&pin_dir)
            .with_context(|| format!("cannot create {}", pin_dir.display()))?;
        let inside = netns::enter(ns.name())?;
        let underlay_ifindex = netlink::ifindex(UNDERLAY_IFACE)
            .with_context(|| format!("ifindex of {UNDERLAY_IFACE}"))?;

        let mut datapath = Datapath::load(&pin_dir)?;
        datapath.set_config(NodeConfig {
            vtep: LOCAL_VTEP.octets(),
            underlay_ifindex,
            underlay_mtu: 1500,
            udp_port: 0,
            _pad: 0,
        })?;
        write_network(&mut datapath, 0, vtep_flags::ALLOWED)?;
        datapath.sync_subnets(&BTreeMap::from([
            (
                (VNI, SUBNET.octets(), SUBNET_PREFIX),
                SubnetInfo {
                    gateway: GATEWAY.octets(),
                },
            ),
            (
                (VNI, OTHER_SUBNET.octets(), SUBNET_PREFIX),
                SubnetInfo {
                    gateway: OTHER_GATEWAY.octets(),
                },
            ),
        ]))?;
        let local = |ip: Ipv4Addr, ifindex| Endpoint {
            mac: container_mac(ip),
            _pad: [0; 2],
            ifindex,
            vtep: [0; 4],
        };
        datapath.sync_endpoints(&BTreeMap::from([
            (
                (VNI, LOCAL_CONTAINER.octets()),
                local(LOCAL_CONTAINER, TEST_RUN_IFINDEX),
            ),
            (
                (VNI, NEIGHBOUR_CONTAINER.octets()),
                local(NEIGHBOUR_CONTAINER, NEIGHBOUR_IFINDEX),
            ),
            (
                (VNI, OTHER_SUBNET_CONTAINER.octets()),
                local(OTHER_SUBNET_CONTAINER, NEIGHBOUR_IFINDEX),
            ),
            (
                (VNI, OTHER_SUBNET_REMOTE.octets()),
                Endpoint {
                    mac: container_mac(OTHER_SUBNET_REMOTE),
                    _pad: [0; 2],
                    ifindex: 0,
                    vtep: REMOTE_VTEP.octets(),
                },
            ),
            (
                (VNI, REMOTE_CONTAINER.octets()),
                Endpoint {
                    mac: container_mac(REMOTE_CONTAINER),
                    _pad: [0; 2],
                    ifindex: 0,
                    vtep: REMOTE_VTEP.octets(),
                },
            ),
        ]))?;
        Ok(Fixture {
            datapath,
            _inside: inside,
            netns: ns,
            pin_dir,
            network_flags: 0,
            remote_vtep_flags: vtep_flags::ALLOWED,
            _lab: lab,
        })
    }

    /// Gives the network the `network_flags` `flags`, rewriting every map
    /// entry that carries them, as the agent does.
    #[allow(dead_code, reason = "the micro-benchmark keeps the network as it is")]
    pub fn set_network_flags(&mut self, flags: u32) -> Result<()> {
        self.network_flags = flags;
        write_network(&mut self.datapath, flags, self.remote_vtep_flags)
    }

    /// Gives the remote VTEP the `vtep_flags` `flags` (e.g. KEYED once its
    /// node published a key), as the agent's sync of `OVL_VTEPS` does.
    #[allow(dead_code, reason = "the micro-benchmark keeps the VTEP as it is")]
    pub fn set_remote_vtep_flags(&mut self, flags: u32) -> Result<()> {
        self.remote_vtep_flags = flags;
        write_network(&mut self.datapath, self.network_flags, flags)
    }

    /// Adds a device standing in for the agent's crypto device (one end
    /// of a veth pair) and hooks it as the agent does; returns its ifindex.
    #[allow(dead_code, reason = "the micro-benchmark encrypts nothing")]
    pub fn add_crypto_device(&mut self) -> Result<u32> {
        self.netns.ip(&[
            "link",
            "add",
            CRYPTO_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "cr0p",
        ])?;
        self.netns.ip(&["link", "set", "cr0p", "up"])?;
        self.netns.ip(&["link", "set", CRYPTO_IFACE, "up"])?;
        let ifindex =
            netlink::ifindex(CRYPTO_IFACE).with_context(|| format!("ifindex of {CRYPTO_IFACE}"))?;
        self.datapath.hook_crypto(CRYPTO_IFACE, ifindex)?;
        Ok(ifindex)
    }

    /// Where the maps are pinned (for reading counters and caches).
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Gives the underlay gateway's neighbour entry a new MAC, as its
    /// gratuitous ARP would.
    #[allow(dead_code, reason = "the micro-benchmark changes no neighbour")]
    pub fn set_gateway_mac(&self, mac: [u8; 6]) -> Result<()> {
        self.netns.ip(&[
            "neigh",
            "replace",
            "192.0.2.1",
            "lladdr",
            &mac_text(mac),
            "dev",
            UNDERLAY_IFACE,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Sets the MTU of the route to the remote VTEP's subnet, locked (the
    /// FIB applies a route's MTU to forwarded packets only when locked).
    #[allow(dead_code, reason = "the micro-benchmark changes no route")]
    pub fn set_route_mtu(&self, mtu: u32) -> Result<()> {
        self.netns.ip(&[
            "route",
            "replace",
            "198.51.100.0/24",
            "via",
            "192.0.2.1",
            "mtu",
            "lock",
            &mtu.to_string(),
        ])?;
        Ok(())
    }

    /// Gives the node's config the underlay MTU `mtu`, as the agent does
    /// when the underlay's MTU changes under it.
    #[allow(dead_code, reason = "the micro-benchmark keeps the MTU as it is")]
    pub fn set_underlay_mtu(&mut self, mtu: u32) -> Result<()> {
        let underlay_ifindex = self.underlay_ifindex()?;
        self.datapath.set_config(NodeConfig {
            vtep: LOCAL_VTEP.octets(),
            underlay_ifindex,
            underlay_mtu: mtu,
            udp_port: 0,
            _pad: 0,
        })
    }

    /// Index of the stand-in underlay device.
    #[allow(dead_code, reason = "the micro-benchmark does not look")]
    pub fn underlay_ifindex(&self) -> Result<u32> {
        netlink::ifindex(UNDERLAY_IFACE).with_context(|| format!("ifindex of {UNDERLAY_IFACE}"))
    }

    /// Turns IPv4 forwarding on or off in the namespace: with it on,
    /// encapsulation resolves the next hop with `bpf_fib_lookup`; with it
    /// off the helper refuses and ovl hands the packet to the kernel's
    /// routing (`bpf_redirect_neigh`).
    pub fn set_forwarding(&self, on: bool) -> Result<()> {
        let value = if on { "1" } else { "0" };
        self.netns.sysctl("net.ipv4.conf.all.forwarding", value)?;
        self.netns
            .sysctl(&format!("net.ipv4.conf.{UNDERLAY_IFACE}.forwarding"), value)
    }
}

/// Writes the network (MTU [`OVERLAY_MTU`], `flags`) and the entries
/// derived from it: the remote VTEP's (with `remote_vtep_flags`) and the two
/// local containers' interfaces.
fn write_network(datapath: &mut Datapath, flags: u32, remote_vtep_flags: u32) -> Result<()> {
    let networks = std::collections::BTreeMap::from([(VNI, "golden".to_owned())]);
    let stats_slot = datapath.sync_stats(&networks, &networks)?[&VNI];
    let network = NetworkInfo {
        mtu: OVERLAY_MTU,
        flags,
        stats_slot,
    };
    datapath.sync_networks(&BTreeMap::from([(VNI, network)]))?;
    datapath.sync_vteps(&BTreeMap::from([(
        (VNI, REMOTE_VTEP.octets()),
        VtepInfo {
            flags: remote_vtep_flags,
            network,
        },
    )]))?;
    datapath.sync_ifaces(&BTreeMap::from([
        (TEST_RUN_IFINDEX, iface(LOCAL_CONTAINER, &network)),
        (NEIGHBOUR_IFINDEX, iface(NEIGHBOUR_CONTAINER, &network)),
    ]))?;
    Ok(())
}

/// The interface entry of a local container in the first subnet of
/// `network`.
fn iface(ip: Ipv4Addr, network: &NetworkInfo) -> Iface {
    Iface {
        vni: VNI,
        addr: ip.octets(),
        gateway: GATEWAY.octets(),
        mac: container_mac(ip),
        _pad: [0; 2],
        network_flags: network.flags,
        stats_slot: network.stats_slot,
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|octet| format!("{octet:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A `__sk_buff` test-run context whose `ifindex` is `ifindex` (the
/// field sits at byte 40 of the 192-byte UAPI struct).
pub fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// [`skb_ctx`] of a GSO super-packet of `segs` segments of `size` bytes
/// (`gso_segs` at byte 164, `gso_size` at 176).
pub fn skb_ctx_gso(ifindex: u32, segs: u32, size: u32) -> Vec<u8> {
    let mut ctx = skb_ctx(ifindex);
    ctx[164..168].copy_from_slice(&segs.to_ne_bytes());
    ctx[176..180].copy_from_slice(&size.to_ne_bytes());
    ctx
}
