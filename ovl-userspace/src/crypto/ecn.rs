//! ECN across the WireGuard tunnel (RFC 6040, normal mode, as kernel
//! WireGuard does it): what the outer header of a sealed message carries,
//! and what an outer mark makes of the VXLAN packet opened from it.
//!
//! Sealing copies only the ECN field of the VXLAN packet out (kernel
//! WireGuard's `ip_tunnel_ecn_encap(0, ...)`): the outer DSCP stays 0, so
//! the wire tells nothing of the inner packet's class. Opening applies
//! RFC 6040 §4.2's table (`INET_ECN_decapsulate`): a congestion mark (CE)
//! on the outer header goes onto an ECN-capable VXLAN packet, and one over
//! a packet that is not ECN-capable drops it, as the congested router
//! would have; the data path's decap then carries the mark on to the
//! container's packet.

use ovl_common::wire::{ECN_CE, ECN_ECT0, ECN_ECT1, ECN_MASK, ECN_NOT_ECT, checksum_replace16};

/// An ECN codepoint (RFC 3168 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ecn {
    NotEct = ECN_NOT_ECT as isize,
    Ect1 = ECN_ECT1 as isize,
    Ect0 = ECN_ECT0 as isize,
    Ce = ECN_CE as isize,
}

impl Ecn {
    /// The ECN field of TOS byte `tos`.
    pub const fn of_tos(tos: u8) -> Ecn {
        match tos & ECN_MASK {
            ECN_NOT_ECT => Ecn::NotEct,
            ECN_ECT1 => Ecn::Ect1,
            ECN_ECT0 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// The field's two bits.
    pub const fn bits(self) -> u8 {
        self as u8
    }
}

/// An outer congestion mark over a packet that is not ECN-capable: RFC
/// 6040 §4.2 drops it (its sender could never hear of the mark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Congestion;

/// Offsets in an IPv4 header (RFC 791).
const IP_TOS: usize = 1;
const IP_CHECK: usize = 10;
const IPV4_MIN_HDR: usize = 20;

/// The TOS byte of the outer header of the WireGuard message that carries
/// IPv4 packet `packet`: its ECN field and nothing else (RFC 6040 §4.1,
/// normal mode, with DSCP 0 as kernel WireGuard sends).
pub fn sealed_tos(packet: &[u8]) -> u8 {
    packet.get(IP_TOS).map_or(0, |tos| tos & ECN_MASK)
}

/// The ECN field of a packet that arrived with ECN `inner` inside an outer
/// header with ECN `outer`: RFC 6040 §4.2, Figure 4, row by row.
pub const fn decapsulate(outer: Ecn, inner: Ecn) -> Result<Ecn, Congestion> {
    match (inner, outer) {
        // Not-ECT inside: an ECT outer is the (!!!) "should not happen"
        // of the table, forwarded as Not-ECT; CE over it is dropped.
        (Ecn::NotEct, Ecn::Ce) => Err(Congestion),
        (Ecn::NotEct, _) => Ok(Ecn::NotEct),
        // CE stays CE whatever the outer says.
        (Ecn::Ce, _) => Ok(Ecn::Ce),
        // ECN-capable inside: CE outside marks it.
        (_, Ecn::Ce) => Ok(Ecn::Ce),
        // ECT(1) outside an ECT(0) packet: the underlay's ECT(1) wins.
        (Ecn::Ect0, Ecn::Ect1) => Ok(Ecn::Ect1),
        // Otherwise the inner field stands (ECT(0) outside ECT(1) is
        // (!) in the table: kept as ECT(1)).
        (inner, _) => Ok(inner),
    }
}

/// Applies the outer ECN `outer` to the IPv4 packet `packet` just opened
/// (RFC 6040 §4.2): rewrites its ECN field when the table changes it,
/// with its header checksum updated incrementally (RFC 1624), or says the
/// packet is to be dropped. A packet too short for an IPv4 header is left
/// to the checks after this one.
pub fn carry_outer_mark(outer: Ecn, packet: &mut [u8]) -> Result<(), Congestion> {
    if outer == Ecn::NotEct || packet.len() < IPV4_MIN_HDR {
        return Ok(());
    }
    let tos = packet[IP_TOS];
    let inner = Ecn::of_tos(tos);
    let ecn = decapsulate(outer, inner)?;
    if ecn != inner {
        let new_tos = (tos & !ECN_MASK) | ecn.bits();
        let old_word = u16::from_be_bytes([packet[0], tos]);
        let new_word = u16::from_be_bytes([packet[0], new_tos]);
        let check = u16::from_be_bytes([packet[IP_CHECK], packet[IP_CHECK + 1]]);
        packet[IP_TOS] = new_tos;
        packet[IP_CHECK..IP_CHECK + 2]
            .copy_from_slice(&checksum_replace16(check, old_word, new_word).to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ecn::*;

    /// RFC 6040 §4.2, Figure 4: rows are the arriving inner header,
    /// columns the arriving outer header (Not-ECT, ECT(0), ECT(1), CE);
    /// `None` is a drop.
    const FIGURE_4: [(Ecn, [Option<Ecn>; 4]); 4] = [
        (NotEct, [Some(NotEct), Some(NotEct), Some(NotEct), None]),
        (Ect0, [Some(Ect0), Some(Ect0), Some(Ect1), Some(Ce)]),
        (Ect1, [Some(Ect1), Some(Ect1), Some(Ect1), Some(Ce)]),
        (Ce, [Some(Ce), Some(Ce), Some(Ce), Some(Ce)]),
    ];
    const OUTER: [Ecn; 4] = [NotEct, Ect0, Ect1, Ce];

    #[test]
    fn decapsulation_follows_rfc_6040_figure_4() {
        for (inner, row) in FIGURE_4 {
            for (outer, want) in OUTER.into_iter().zip(row) {
                assert_eq!(
                    decapsulate(outer, inner).ok(),
                    want,
                    "inner {inner:?}, outer {outer:?}"
                );
            }
        }
    }

    #[test]
    fn sealing_copies_the_ecn_field_and_never_the_dscp() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        for (tos, want) in [
            (0x00, 0),
            (0x02, 2),
            (0x01, 1),
            (0x03, 3),
            (0xb8, 0),
            (0xba, 2),
        ] {
            p[IP_TOS] = tos;
            assert_eq!(sealed_tos(&p), want, "tos {tos:#x}");
        }
        assert_eq!(sealed_tos(&[]), 0);
    }

    /// An IPv4 header with TOS `tos` and a valid checksum.
    fn header(tos: u8) -> Vec<u8> {
        let mut h = vec![
            0x45, tos, 0, 60, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 10, 198, 51, 100, 10,
        ];
        let sum = crate::crypto::offload::ones_sum(&h);
        h[IP_CHECK..IP_CHECK + 2].copy_from_slice(&(!sum).to_be_bytes());
        h
    }

    #[test]
    fn an_outer_mark_rewrites_the_ecn_field_and_keeps_the_checksum_valid() {
        for (inner_tos, outer, want) in [
            (0xb8 | 0b10, Ce, Ok(0xb8 | 0b11)),
            (0b01, Ce, Ok(0b11)),
            (0x28 | 0b10, Ect1, Ok(0x28 | 0b01)),
            (0b10, NotEct, Ok(0b10)),
            (0b11, Ce, Ok(0b11)),
            (0xb8, Ce, Err(Congestion)),
            (0x00, Ect0, Ok(0x00)),
        ] {
            let mut p = header(inner_tos);
            let got = carry_outer_mark(outer, &mut p).map(|()| p[IP_TOS]);
            assert_eq!(got, want, "inner {inner_tos:#x}, outer {outer:?}");
            assert_eq!(
                crate::crypto::offload::ones_sum(&p),
                0xffff,
                "checksum after {inner_tos:#x} under {outer:?}"
            );
        }
    }
}
