// The reference overlay: Docker's overlay data path (Linux bridge + kernel
// vxlan device with static FDB and proxy ARP), the interop peer and baseline.

use std::fmt;
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::lab::Lab;
use crate::netns::Netns;
use crate::topology::{Host, cidr, create_veth};

/// The IANA-assigned VXLAN UDP port (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;

/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) header bytes.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Overlay MTU over a 1500-byte underlay, as Docker configures it.
pub const OVERLAY_MTU: u32 = crate::topology::UNDERLAY_MTU - VXLAN_OVERHEAD;

/// The bridge joining containers and the vxlan device on a reference host.
pub const REF_BRIDGE: &str = "br-ovl";

/// The kernel vxlan device of the reference overlay.
pub const REF_VXLAN: &str = "vx-ref";

/// The interface name inside every container namespace.
pub const CONTAINER_IFACE: &str = "eth0";

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six octets in wire order.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The MAC Docker gives a container: `02:42` (locally administered,
/// unicast) followed by the four octets of its IPv4 address, so every
/// overlay IP maps to a MAC without a lookup.
pub fn mac_for(ip: Ipv4Addr) -> MacAddr {
    let [a, b, c, d] = ip.octets();
    MacAddr([0x02, 0x42, a, b, c, d])
}

/// One host's share of the reference overlay: bridge [`REF_BRIDGE`] with
/// vxlan device [`REF_VXLAN`] (learning off, proxy ARP on) inside the host
/// namespace. Remote containers are made known statically, as Docker's
/// control plane does, through [`add_remote`](Self::add_remote).
#[derive(Debug)]
pub struct RefOverlayNode {
    host: Host,
    vni: u32,
    containers: u32,
}

impl RefOverlayNode {
    /// Creates the bridge and the vxlan device for `vni` on `host`, with the
    /// host's underlay address as the local VTEP.
    pub fn install(host: &Host, vni: u32) -> Result<RefOverlayNode> {
        let netns = &host.netns;
        let mtu = OVERLAY_MTU.to_string();
        netns.ip(&["link", "add", REF_BRIDGE, "type", "bridge"])?;
        netns.ip(&["link", "set", REF_BRIDGE, "up"])?;
        netns.ip(&[
            "link",
            "add",
            REF_VXLAN,
            "type",
            "vxlan",
            "id",
            &vni.to_string(),
            "dstport",
            &VXLAN_PORT.to_string(),
            "local",
            &host.addr.to_string(),
            "dev",
            &host.iface,
            // Docker programs every peer itself; learning from received
            // frames would hide missing control-plane entries.
            "nolearning",
            // Answer ARP for remote containers from the static neighbour
            // table instead of flooding it to every VTEP.
            "proxy",
        ])?;
        netns.ip(&[
            "link", "set", REF_VXLAN, "mtu", &mtu, "master", REF_BRIDGE, "up",
        ])?;
        Ok(RefOverlayNode {
            host: host.clone(),
            vni,
            containers: 0,
        })
    }

    /// The host this node runs on.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The VXLAN network identifier of this overlay.
    pub fn vni(&self) -> u32 {
        self.vni
    }

    /// The local VTEP address (the host's underlay address).
    pub fn vtep(&self) -> Ipv4Addr {
        self.host.addr
    }

    /// Creates a container namespace attached to the overlay: its
    /// [`CONTAINER_IFACE`] has MAC [`mac_for`]`(ip)`, MTU [`OVERLAY_MTU`] and
    /// `ip/prefix_len`; the host end of its veth is a port of the bridge.
    pub fn add_container(&mut self, lab: &Lab, ip: Ipv4Addr, prefix_len: u8) -> Result<Netns> {
        let [a, b, c, d] = ip.octets();
        let container = lab.container(&format!("{a}-{b}-{c}-{d}"))?;
        let host_port = format!("ve{}", self.containers);
        self.containers += 1;
        let mtu = OVERLAY_MTU.to_string();

        create_veth(&container, CONTAINER_IFACE, &self.host.netns, &host_port)?;
        self.host.netns.ip(&[
            "link", "set", &host_port, "mtu", &mtu, "master", REF_BRIDGE, "up",
        ])?;
        container.ip(&[
            "link",
            "set",
            CONTAINER_IFACE,
            "address",
            &mac_for(ip).to_string(),
            "mtu",
            &mtu,
            "up",
        ])?;
        container.ip(&["addr", "add", &cidr(ip, prefix_len), "dev", CONTAINER_IFACE])?;
        Ok(container)
    }

    /// Makes a container on another host reachable: a permanent vxlan FDB
    /// entry sending `mac` to `remote_vtep`, and a permanent neighbour entry
    /// `ip → mac` on the vxlan device for its proxy ARP to answer from.
    pub fn add_remote(&self, ip: Ipv4Addr, mac: MacAddr, remote_vtep: Ipv4Addr) -> Result<()> {
        let netns = &self.host.netns;
        let mac = mac.to_string();
        crate::cmd::run(&[
            "bridge",
            "-n",
            netns.name(),
            "fdb",
            "add",
            &mac,
            "dev",
            REF_VXLAN,
            "dst",
            &remote_vtep.to_string(),
            "self",
            "permanent",
        ])?;
        netns.ip(&[
            "neigh",
            "add",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            REF_VXLAN,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_mac_embeds_the_ip_like_docker() {
        let mac = mac_for(Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(mac.octets(), [0x02, 0x42, 198, 18, 0, 2]);
        assert_eq!(mac.to_string(), "02:42:c6:12:00:02");
    }

    #[test]
    fn overlay_mtu_leaves_room_for_vxlan_headers() {
        assert_eq!(OVERLAY_MTU, 1450);
    }
}
