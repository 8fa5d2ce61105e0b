// Test frames for the golden tests and the micro-benchmark, laid out byte by
// byte as the RFCs give them: Ethernet, IPv4, UDP, VXLAN, ICMP echo, ARP.

use std::net::Ipv4Addr;

use ovl_common::wire::{
    ETH_HDR_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_HDR_LEN, UDP_HDR_LEN, VXLAN_FLAG_I, VXLAN_PORT,
};

/// The MAC ovl (like Docker) gives the container with address `ip`.
pub fn container_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

/// An Ethernet II frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HDR_LEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// RFC 1071 one's-complement checksum.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (IHL 5, DF, TTL 64) with a valid header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_ttl(src, dst, protocol, 64, payload)
}

/// An IPv4 packet (IHL 5, DF) with TTL `ttl` and a valid header checksum.
pub fn ipv4_ttl(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total_len = u16::try_from(IPV4_HDR_LEN + payload.len())
        .expect("benchmark packets are far below 64 KiB");
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, ttl, protocol, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let checksum = internet_checksum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// A UDP datagram with checksum 0 (none, allowed over IPv4).
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(UDP_HDR_LEN + payload.len())
        .expect("benchmark datagrams are far below 64 KiB");
    let mut datagram = Vec::with_capacity(UDP_HDR_LEN + payload.len());
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

/// A UDP-in-IPv4-in-Ethernet frame of exactly `frame_len` bytes (no FCS)
/// between two containers: the shape of `iperf3 -u` traffic.
pub fn container_udp_frame(src: Ipv4Addr, dst: Ipv4Addr, frame_len: usize) -> Vec<u8> {
    let headers = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN;
    assert!(
        frame_len >= headers,
        "a {frame_len}-byte frame cannot hold Ethernet, IPv4 and UDP headers"
    );
    let payload: Vec<u8> = (0..frame_len - headers).map(|i| i as u8).collect();
    ethernet(
        container_mac(dst),
        container_mac(src),
        ETH_P_IP,
        &ipv4(src, dst, IPPROTO_UDP, &udp(40000, 5201, &payload)),
    )
}

/// `inner` as it arrives on the underlay from `src_vtep` for `dst_vtep`:
/// outer Ethernet/IPv4/UDP 4789 and the RFC 7348 header with VNI `vni`.
pub fn vxlan_frame(
    src_vtep: Ipv4Addr,
    dst_vtep: Ipv4Addr,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut udp_payload = vxlan_header(vni);
    udp_payload.extend_from_slice(inner);
    ethernet(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(
            src_vtep,
            dst_vtep,
            IPPROTO_UDP,
            &udp(51000, VXLAN_PORT, &udp_payload),
        ),
    )
}

/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;

/// RFC 7348 §5: flags with the I bit, 24 reserved bits, VNI, 8 reserved.
pub fn vxlan_header(vni: u32) -> Vec<u8> {
    let [_, v1, v2, v3] = vni.to_be_bytes();
    vec![VXLAN_FLAG_I, 0, 0, 0, v1, v2, v3, 0]
}

/// An ICMP echo request with `payload_len` bytes of payload.
pub fn icmp_echo(id: u16, seq: u16, payload_len: usize) -> Vec<u8> {
    let mut message = vec![8, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend((0..payload_len).map(|i| i as u8));
    let checksum = internet_checksum(&message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    message
}

fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0, 1, 0x08, 0, 6, 4];
    packet.extend_from_slice(&op.to_be_bytes());
    packet.extend_from_slice(&sha);
    packet.extend_from_slice(&spa.octets());
    packet.extend_from_slice(&tha);
    packet.extend_from_slice(&tpa.octets());
    packet
}

/// A broadcast ARP request from (`sha`, `spa`) for `tpa` (RFC 826).
pub fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    ethernet([0xff; 6], sha, ETH_P_ARP, &arp(1, sha, spa, [0; 6], tpa))
}

/// The unicast reply (`sha`, `spa`) sends to (`tha`, `tpa`).
pub fn arp_reply(sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    ethernet(tha, sha, ETH_P_ARP, &arp(2, sha, spa, tha, tpa))
}

/// Bytes as hex, 16 a line, for assertion messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
