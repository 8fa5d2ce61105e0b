//! Encrypted networks (`ovl network create --encrypted`): between hosts an
//! encrypted network's traffic exists on the wire only as WireGuard, which
//! a third-party dissector decodes as such and nothing more; forged and
//! replayed messages are dropped and counted; a flood of handshake
//! initiations is answered with cookies while the network carries on; keys
//! rotate without loss; a node joining later is reached; a dead agent fails
//! closed; ECN crosses the tunnel as RFC 6040 says; WireGuard listens only
//! while the cluster has an encrypted network. Garbage to the WireGuard
//! port, routed subnets, static endpoints, broadcasts and a smaller path
//! MTU never make it leak or stall, and counters count every packet once.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{
    AGENT_METRICS, BackgroundPing, CE, Cluster, ECN_MASK, ECT0, ECT1, HOST_IFACE, Lab, NOT_ECT,
    Netns, TosReceiver, TwoHosts, clear_congestion, iperf3_server, mark_congestion, ping,
    send_udp_with_tos, wait_until,
};
use serde_json::Value;

/// The encrypted network and the plain one beside it.
const SECRET: &str = "secret";
const SECRET_SUBNET: &str = "198.18.0.0/24";
const OPEN: &str = "open";
const OPEN_SUBNET: &str = "198.18.1.0/24";

/// WireGuard's port (ovl's default) and VXLAN's.
const WG_PORT: u16 = 51820;
const VXLAN_PORT: u16 = 4789;

/// `ovl stats --crypto --json` of host `i`.
fn crypto(world: &Cluster, i: usize) -> Result<Value> {
    let out = world.run(i, &["stats", "--crypto", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))
}

/// Host `i`'s WireGuard peer for node `node`, as `ovl stats --crypto` has it.
fn peer(world: &Cluster, i: usize, node: &str) -> Result<Value> {
    crypto(world, i)?["peers"]
        .as_array()
        .context("no peers in the crypto report")?
        .iter()
        .find(|p| p["node"] == node)
        .cloned()
        .with_context(|| format!("host {i} has no peer {node}"))
}

/// Waits until every host of `world` sees every other's published key.
fn wait_for_keys(world: &Cluster) -> Result<()> {
    wait_until(Duration::from_secs(15), || {
        for i in 0..world.hosts.len() {
            let keys = world.node_keys(i)?;
            if keys.len() < world.hosts.len() || keys.values().any(Option::is_none) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .context("nodes did not publish their WireGuard keys")
}

/// Both networks and a container on each host on each; returns the
/// containers (host A's, host B's) of each network and their addresses.
struct TwoNetworks {
    secret: [(Netns, Ipv4Addr); 2],
    open: [(Netns, Ipv4Addr); 2],
}

fn two_networks(lab: &Lab, world: &Cluster) -> Result<TwoNetworks> {
    let ns = &world.hosts[0].netns;
    world
        .ovl
        .create_network(ns, SECRET, SECRET_SUBNET, &["--encrypted"])?;
    world.ovl.create_network(ns, OPEN, OPEN_SUBNET, &[])?;
    let s0 = world.container(lab, 0, SECRET, "s0")?;
    let s1 = world.container(lab, 1, SECRET, "s1")?;
    let o0 = world.container(lab, 0, OPEN, "o0")?;
    let o1 = world.container(lab, 1, OPEN, "o1")?;
    wait_for_keys(world)?;
    Ok(TwoNetworks {
        secret: [s0, s1],
        open: [o0, o1],
    })
}

fn vni_of(world: &Cluster, network: &str) -> Result<u64> {
    world.inspect(0, network)?["vni"]
        .as_u64()
        .context("inspect has no vni")
}

/// A capture running in `ns` on `iface` into a pcap in the lab.
struct Capture {
    child: ovl_tests::ChildHandle,
    pcap: String,
}

impl Capture {
    /// Starts `tshark` on `iface` for UDP, stopping by itself after
    /// `seconds` (not by a signal: an interrupted capture loses what is
    /// still in the kernel's ring). Headers only: 200 bytes a frame.
    fn start(lab: &Lab, ns: &Netns, iface: &str, name: &str, seconds: u32) -> Result<Capture> {
        Self::start_filtered(lab, ns, iface, name, seconds, "udp")
    }

    /// [`start`](Self::start) with capture filter `filter` (pcap syntax;
    /// `ip`: every IPv4 frame).
    fn start_filtered(
        lab: &Lab,
        ns: &Netns,
        iface: &str,
        name: &str,
        seconds: u32,
        filter: &str,
    ) -> Result<Capture> {
        let pcap = lab.tempdir().join(format!("{name}.pcap"));
        let pcap = pcap.to_string_lossy().into_owned();
        let duration = format!("duration:{seconds}");
        let child = lab.spawn(
            ns,
            &[
                "tshark", "-i", iface, "-f", filter, "-s", "200", "-a", &duration, "-w", &pcap,
            ],
            &[],
        )?;
        wait_until(Duration::from_secs(15), || {
            Ok(child.stderr()?.contains("Capture started"))
        })
        .with_context(|| format!("tshark did not start:\n{}", child.output_report()))?;
        Ok(Capture { child, pcap })
    }

    /// Waits for the capture to end and decodes it.
    fn finish(self, ns: &Netns, timeout: Duration) -> Result<Vec<Frame>> {
        let status = self.child.wait_timeout(timeout)?;
        ensure!(
            status.success(),
            "tshark exited with {status}:\n{}",
            self.child.output_report()
        );
        decode(ns, &self.pcap)
    }
}

/// One captured frame as tshark decodes it.
#[derive(Debug)]
struct Frame {
    /// `eth:ethertype:ip:udp:wg`, `...:udp:vxlan:eth:ethertype:ip:icmp`...
    protocols: String,
    udp_dst: String,
    /// WireGuard message type (1 initiation, 2 response, 4 transport).
    wg_type: String,
    vni: String,
    /// Every IPv4 address tshark found, outer and inner.
    addrs: Vec<String>,
    /// The outermost IPv4 header's TOS byte and total length.
    tos: u8,
    ip_len: usize,
}

/// Reads `pcap` back: WireGuard decoded on its port, VXLAN on its.
fn decode(ns: &Netns, pcap: &str) -> Result<Vec<Frame>> {
    let wg = format!("udp.port=={WG_PORT},wg");
    let vxlan = format!("udp.port=={VXLAN_PORT},vxlan");
    let out = ns.exec(&[
        "tshark",
        "-r",
        pcap,
        "-d",
        &wg,
        "-d",
        &vxlan,
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "aggregator=,",
        "-e",
        "frame.protocols",
        "-e",
        "udp.dstport",
        "-e",
        "wg.type",
        "-e",
        "vxlan.vni",
        "-e",
        "ip.addr",
        "-e",
        "ip.dsfield",
        "-e",
        "ip.len",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            ensure!(f.len() == 7, "unexpected tshark row {line:?}");
            let outermost = |field: &str| field.split(',').next().unwrap_or_default().to_owned();
            let tos = outermost(f[5]);
            Ok(Frame {
                protocols: f[0].to_owned(),
                udp_dst: f[1].to_owned(),
                wg_type: f[2].to_owned(),
                vni: f[3].to_owned(),
                addrs: f[4].split(',').map(str::to_owned).collect(),
                tos: u8::from_str_radix(tos.trim_start_matches("0x"), 16)
                    .with_context(|| format!("TOS {tos:?} in {line:?}"))?,
                ip_len: outermost(f[6])
                    .parse()
                    .with_context(|| format!("IPv4 length in {line:?}"))?,
            })
        })
        .collect()
}

/// Pings `dst` from `from` until one answer comes back.
fn wait_for_ping(from: &Netns, dst: Ipv4Addr) -> Result<()> {
    wait_until(Duration::from_secs(15), || {
        Ok(ping(from, dst, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| format!("no ping answer from {dst}"))
}

/// Runs iperf3 for `seconds` from `client` to `server` at `server_ip`;
/// returns the bytes the server received.
fn iperf(
    lab: &Lab,
    client: &Netns,
    server: &Netns,
    server_ip: Ipv4Addr,
    args: &[&str],
) -> Result<f64> {
    let srv = iperf3_server(lab, server)?;
    let ip = server_ip.to_string();
    let mut argv = vec!["iperf3", "-c", &ip, "-J"];
    argv.extend_from_slice(args);
    let out = client.exec(&argv)?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    srv.wait_timeout(Duration::from_secs(10))
        .context("iperf3 server did not exit after its one test")?;
    report["end"]["sum_received"]["bytes"]
        .as_f64()
        .with_context(|| format!("no received bytes in {report}"))
}

#[test]
fn encrypted_network_is_only_wireguard_on_the_wire_and_the_plain_one_stays_vxlan() -> Result<()> {
    let lab = Lab::new("crypt-wire")?;
    let world = TwoHosts::start(&lab, "tc")?;
    // Capture from before the engines start (they handshake at once), so
    // the handshake is in it.
    let capture = Capture::start(&lab, &world.router, "h0", "wire", 16)?;
    let nets = two_networks(&lab, &world)?;
    let secret_vni = vni_of(&world, SECRET)?;
    let open_vni = vni_of(&world, OPEN)?;
    let inspect = world.inspect(0, SECRET)?;
    ensure!(inspect["encrypted"] == true, "inspect: {inspect}");
    ensure!(inspect["mtu"] == 1390, "inspect: {inspect}");
    ensure!(world.inspect(0, OPEN)?["encrypted"] == false);

    let [(s0, _), (s1, s1_ip)] = &nets.secret;
    let [(o0, _), (o1, o1_ip)] = &nets.open;
    wait_for_ping(s0, *s1_ip)?;
    wait_for_ping(o0, *o1_ip)?;
    for (from, to) in [(s0, *s1_ip), (o0, *o1_ip)] {
        let r = ping(from, to, 5, &["-i", "0.2", "-W", "2"])?;
        ensure!(r.all_received(), "ping lost packets:\n{}", r.output);
    }
    // Some TCP of each network on the wire too (slow: the capture stays small).
    for (c, s, ip) in [(s0, s1, *s1_ip), (o0, o1, *o1_ip)] {
        let bytes = iperf(&lab, c, s, ip, &["-t", "1", "-b", "5M"])?;
        ensure!(bytes > 0.0, "no TCP bytes arrived at {ip}");
    }
    let frames = capture.finish(&world.router, Duration::from_secs(40))?;

    let wireguard: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.udp_dst == WG_PORT.to_string() || f.protocols.ends_with(":wg"))
        .collect();
    let vxlan: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.protocols.contains(":vxlan"))
        .collect();
    // The encrypted network: WireGuard, decoded as nothing but WireGuard.
    for t in ["1", "2", "4"] {
        ensure!(
            wireguard.iter().any(|f| f.wg_type == t),
            "no WireGuard message of type {t} captured: {wireguard:#?}"
        );
    }
    for f in &wireguard {
        ensure!(
            f.protocols == "eth:ethertype:ip:udp:wg",
            "WireGuard frame decoded further than WireGuard: {f:?}"
        );
    }
    // Not one VXLAN frame, nor one inner address, of the encrypted network.
    let secret_prefix = "198.18.0.";
    for f in &frames {
        ensure!(
            f.vni != secret_vni.to_string(),
            "VXLAN of the encrypted network on the wire: {f:?}"
        );
        ensure!(
            !f.addrs.iter().any(|a| a.starts_with(secret_prefix)),
            "an address of the encrypted network on the wire: {f:?}"
        );
    }
    // The plain network: plain VXLAN with its VNI, ICMP and TCP inside.
    ensure!(
        vxlan.iter().all(|f| f.vni == open_vni.to_string()),
        "VXLAN of another VNI: {vxlan:#?}"
    );
    ensure!(
        vxlan.iter().any(|f| f.protocols.contains(":icmp")),
        "no ICMP in VXLAN"
    );
    ensure!(
        vxlan.iter().any(|f| f.protocols.contains(":tcp")),
        "no TCP in VXLAN"
    );
    ensure!(
        wireguard.len() + vxlan.len() == frames.len(),
        "frames that are neither: {:#?}",
        frames
            .iter()
            .filter(|f| !f.protocols.contains(":vxlan") && !f.protocols.ends_with(":wg"))
            .collect::<Vec<_>>()
    );

    // Full-speed TCP works on both (5 s each), and the encrypting path
    // counted what it carried.
    let secret_bytes = iperf(&lab, s0, s1, *s1_ip, &["-t", "5"])?;
    let open_bytes = iperf(&lab, o0, o1, *o1_ip, &["-t", "5"])?;
    println!(
        "iperf3 5 s: encrypted {:.2} Gbit/s, plain {:.2} Gbit/s",
        secret_bytes * 8.0 / 5e9,
        open_bytes * 8.0 / 5e9
    );
    ensure!(secret_bytes > 1e6 && open_bytes > 1e6);
    let a = crypto(&world, 0)?;
    ensure!(a["counters"]["tx_packets"].as_u64() > Some(1000), "{a}");
    ensure!(a["counters"]["rx_packets"].as_u64() > Some(100), "{a}");
    ensure!(a["counters"]["drops"]["auth_failed"] == 0, "{a}");
    let secret_counters = world.counters(0, SECRET)?;
    ensure!(
        secret_counters.drops() == 0,
        "drops on the encrypted network: {secret_counters:?}"
    );
    world.stop()
}

/// Crafted messages of each kind.
const N: u64 = 5;

/// Sends, from the router on host A's link, messages that claim to come
/// from host B's WireGuard: `N` replays of a captured transport message,
/// `N` with a live session's header but random ciphertext, `N` random
/// handshake initiations and `N` transport messages for a session no one
/// has. Built with scapy from the capture, sent on the raw link; UDP
/// checksums are computed afresh (the capture holds the sender's partial
/// checksum of an offloading veth), the WireGuard bytes are the captured
/// ones.
fn send_forgeries(world: &Cluster, pcap: &str) -> Result<()> {
    let script = format!(
        "import os, struct\n\
         from scapy.all import rdpcap, sendp, Raw, UDP, IP\n\
         def transport(p):\n\
         \x20   b = bytes(p[UDP].payload) if UDP in p else b''\n\
         \x20   return b[:1] == b'\\x04' and len(b) > 32\n\
         pkts = [p for p in rdpcap('{pcap}') if transport(p)]\n\
         assert pkts, 'no transport message captured'\n\
         tmpl = pkts[0]\n\
         def with_payload(data):\n\
         \x20   f = tmpl.copy()\n\
         \x20   f[UDP].remove_payload()\n\
         \x20   f = f / Raw(data)\n\
         \x20   del f[IP].len, f[IP].chksum, f[UDP].len, f[UDP].chksum\n\
         \x20   return f\n\
         head = bytes(tmpl[UDP].payload)\n\
         sendp(with_payload(head), iface='h0', count={N}, verbose=False)\n\
         for i in range({N}):\n\
         \x20   counter = struct.pack('<Q', (1 << 40) + i)\n\
         \x20   sendp(with_payload(head[:8] + counter + os.urandom(len(head) - 16)), iface='h0', verbose=False)\n\
         for i in range({N}):\n\
         \x20   sendp(with_payload(b'\\x01\\x00\\x00\\x00' + os.urandom(144)), iface='h0', verbose=False)\n\
         for i in range({N}):\n\
         \x20   sendp(with_payload(b'\\x04\\x00\\x00\\x00\\xff\\xff\\xff\\xff' + os.urandom(72)), iface='h0', verbose=False)\n"
    );
    // Debian's python3-scapy lives in the system interpreter.
    world.router.exec(&["/usr/bin/python3", "-c", &script])?;
    Ok(())
}

#[test]
fn forged_and_replayed_messages_are_dropped_counted_and_reach_no_container() -> Result<()> {
    let lab = Lab::new("crypt-forge")?;
    let world = Cluster::start_with_env(&lab, "tc", &[("OVL_METRICS", AGENT_METRICS)])?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, s0_ip), (s1, _)] = &nets.secret;
    wait_for_ping(s1, *s0_ip)?;

    // A few transport messages from B to A, for the forger to work from.
    let pcap = lab.tempdir().join("b-to-a.pcap");
    let pcap = pcap.to_string_lossy().into_owned();
    let filter = format!(
        "udp dst port {WG_PORT} and dst host {}",
        world.hosts[0].addr
    );
    let tshark = lab.spawn(
        &world.router,
        &[
            "tshark",
            "-i",
            "h0",
            "-f",
            &filter,
            "-c",
            "3",
            "-a",
            "duration:20",
            "-w",
            &pcap,
        ],
        &[],
    )?;
    wait_until(Duration::from_secs(15), || {
        Ok(tshark.stderr()?.contains("Capture started"))
    })?;
    let r = ping(s1, *s0_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    tshark.wait_timeout(Duration::from_secs(30))?;

    // Quiet now: nothing legitimate reaches host A's containers meanwhile.
    let before = crypto(&world, 0)?["counters"].clone();
    let delivered_before = world.counters(0, SECRET)?;
    send_forgeries(&world, &pcap)?;
    let drops = |c: &Value, r: &str| c["drops"][r].as_u64().unwrap_or(0);
    wait_until(Duration::from_secs(5), || {
        let now = crypto(&world, 0)?["counters"].clone();
        Ok(drops(&now, "unknown_session") >= drops(&before, "unknown_session") + N)
    })?;
    let after = crypto(&world, 0)?["counters"].clone();
    for (reason, want) in [
        ("replayed", N),
        ("auth_failed", 2 * N),
        ("unknown_session", N),
        ("unknown_key", 0),
        ("spoofed", 0),
    ] {
        let got = drops(&after, reason) - drops(&before, reason);
        ensure!(
            got == want,
            "{reason}: counted {got}, sent {want}\nbefore {before}\nafter {after}"
        );
    }
    ensure!(
        after["rx_packets"] == before["rx_packets"],
        "forged messages were opened: before {before}, after {after}"
    );
    let delivered_after = world.counters(0, SECRET)?;
    ensure!(
        delivered_after.rx_packets == delivered_before.rx_packets,
        "something reached a container: {delivered_before:?} -> {delivered_after:?}"
    );
    // The same counts in the Prometheus metrics, which promtool accepts.
    let text = world.scrape(0)?;
    let file = lab.tempdir().join("metrics.txt");
    std::fs::write(&file, &text)?;
    let check = ovl_tests::run_unchecked(&[
        "sh",
        "-c",
        &format!("promtool check metrics < {}", file.display()),
    ])?;
    ensure!(
        check.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for (reason, n) in [
        ("replayed", drops(&after, "replayed")),
        ("auth_failed", drops(&after, "auth_failed")),
        ("unknown_session", drops(&after, "unknown_session")),
    ] {
        let line = format!("ovl_crypto_drops_total{{reason=\"{reason}\"}} {n}");
        ensure!(text.contains(&line), "no `{line}` in the metrics:\n{text}");
    }
    ensure!(
        text.contains("ovl_crypto_packets_total{direction=\"rx\"}"),
        "{text}"
    );

    // The real session is unharmed.
    let r = ping(s0, nets.secret[1].1, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    world.stop()
}

/// Handshake messages a node's key checks per second before it wants
/// cookies (ovl's `HANDSHAKES_PER_SECOND`).
const HANDSHAKES_PER_SECOND: u64 = 100;

/// A script that sends `count` handshake initiations to `to`'s WireGuard
/// from one UDP socket, random but for a mac1 valid for the responder's
/// public key `key` (base64): only a Diffie-Hellman could tell them false.
/// It then prints how many cookie replies (type 3, 64 bytes) came back
/// within 3 s.
fn initiation_flood(to: Ipv4Addr, key: &str, count: u64) -> String {
    format!(
        "import base64, hashlib, os, socket, struct, time\n\
         key = base64.b64decode('{key}')\n\
         mac1_key = hashlib.blake2s(b'mac1----' + key).digest()\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range({count}):\n\
         \x20   body = struct.pack('<I', 1) + os.urandom(112)\n\
         \x20   mac1 = hashlib.blake2s(body, key=mac1_key, digest_size=16).digest()\n\
         \x20   s.sendto(body + mac1 + bytes(16), ('{to}', {WG_PORT}))\n\
         s.settimeout(0.2)\n\
         cookies = 0\n\
         end = time.time() + 3\n\
         while time.time() < end:\n\
         \x20   try:\n\
         \x20       m = s.recv(2048)\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         \x20   if m[0] == 3 and len(m) == 64:\n\
         \x20       cookies += 1\n\
         print('cookies', cookies, flush=True)\n"
    )
}

#[test]
fn a_flood_of_handshake_initiations_gets_cookies_and_the_encrypted_network_carries_on() -> Result<()>
{
    let lab = Lab::new("crypt-flood")?;
    let world = Cluster::start_with_env(&lab, "tc", &[("OVL_METRICS", AGENT_METRICS)])?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, s0_ip), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s1, *s0_ip)?;
    let key = world.node_keys(0)?[Cluster::NODES[0]]
        .clone()
        .context("host A published no key")?;

    // Far more than a second's budget, sent within well under a second
    // (so at most one reset of the budget falls inside).
    const FLOOD: u64 = 400;
    let drops = |c: &Value, r: &str| c["drops"][r].as_u64().unwrap_or(0);
    let before = crypto(&world, 0)?["counters"].clone();
    let out = world.router.exec(&[
        "/usr/bin/python3",
        "-c",
        &initiation_flood(world.hosts[0].addr, &key, FLOOD),
    ])?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let cookies: u64 = out
        .trim()
        .strip_prefix("cookies ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("the flood printed: {out}"))?;
    let after = crypto(&world, 0)?["counters"].clone();
    let under_load = drops(&after, "under_load") - drops(&before, "under_load");
    let auth_failed = drops(&after, "auth_failed") - drops(&before, "auth_failed");
    // Each initiation either went on to a Diffie-Hellman, which found it
    // false, or was answered with a cookie, and every cookie arrived.
    ensure!(
        auth_failed + under_load == FLOOD && cookies == under_load,
        "{FLOOD} initiations: {auth_failed} auth_failed, {under_load} under_load, \
         {cookies} cookie replies received\nbefore {before}\nafter {after}"
    );
    eprintln!(
        "{FLOOD} initiations: {auth_failed} reached a Diffie-Hellman, {under_load} got a cookie"
    );
    ensure!(
        auth_failed <= 2 * HANDSHAKES_PER_SECOND,
        "{auth_failed} initiations reached a Diffie-Hellman, more than two seconds' budget"
    );
    ensure!(
        after["rx_packets"] == before["rx_packets"],
        "flood messages were opened: before {before}, after {after}"
    );
    // The same count in the Prometheus metrics.
    let text = world.scrape(0)?;
    let line = format!(
        "ovl_crypto_drops_total{{reason=\"under_load\"}} {}",
        drops(&after, "under_load")
    );
    ensure!(text.contains(&line), "no `{line}` in the metrics:\n{text}");

    // The live session carries on at once...
    let r = ping(s0, *s1_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    // ...and handshakes are answered again once the second is over: a
    // rotation on host A makes host B handshake with its new key.
    let handshakes = after["handshakes_received"].as_u64().unwrap_or(0);
    let out = world.run(0, &["node", "rotate-key"])?;
    ensure!(out.contains("now has WireGuard key"), "{out}");
    wait_until(Duration::from_secs(15), || {
        Ok(crypto(&world, 0)?["counters"]["handshakes_received"].as_u64() > Some(handshakes))
    })
    .context("host A answered no handshake after the flood")?;
    let r = ping(s0, *s1_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    world.stop()
}

#[test]
fn key_rotation_manual_and_scheduled_loses_no_packet_of_a_100_per_second_ping() -> Result<()> {
    let lab = Lab::new("crypt-rotate")?;
    // Scheduled rotation every 10 s on both nodes, on top of a manual one.
    let world = Cluster::start_with_env(&lab, "tc", &[("OVL_KEY_ROTATION", "10")])?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let keys_before = world.node_keys(0)?;

    let pinger = BackgroundPing::start(&lab, s0, *s1_ip, 1500, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(3));
    let out = world.run(0, &["node", "rotate-key"])?;
    ensure!(out.contains("now has WireGuard key"), "{out}");
    let r = pinger.finish()?;
    ensure!(
        r.transmitted >= 1400 && r.all_received(),
        "lost packets during rotations: {} sent, {} received\n{}",
        r.transmitted,
        r.received,
        r.output
    );
    let a = crypto(&world, 0)?;
    let b = crypto(&world, 1)?;
    ensure!(a["counters"]["rotations"].as_u64() >= Some(2), "{a}");
    ensure!(b["counters"]["rotations"].as_u64() >= Some(1), "{b}");
    let keys_after = world.node_keys(0)?;
    for node in Cluster::NODES.iter().take(2) {
        ensure!(
            keys_before[*node] != keys_after[*node],
            "{node} still publishes its first key"
        );
    }
    ensure!(
        keys_after["host-a"].as_deref() == a["public_key"].as_str(),
        "published {:?}, agent holds {}",
        keys_after["host-a"],
        a["public_key"]
    );
    world.stop()
}

#[test]
fn a_host_joining_later_reaches_the_first_two_on_the_encrypted_network() -> Result<()> {
    let lab = Lab::new("crypt-join")?;
    let (router, hosts) = lab.routed_hosts(3)?;
    let ovl = ovl_tests::Ovl::new(&lab)?;
    let mut agents = Vec::new();
    for (host, node) in hosts.iter().zip(Cluster::NODES).take(2) {
        agents.push(ovl.attach(&lab, host, node, "tc")?);
    }
    let mut world = Cluster {
        ovl,
        router,
        hosts,
        agents,
    };
    world.ovl.create_network(
        &world.hosts[0].netns,
        SECRET,
        SECRET_SUBNET,
        &["--encrypted"],
    )?;
    let (a, _) = world.container(&lab, 0, SECRET, "s0")?;
    let (b, b_ip) = world.container(&lab, 1, SECRET, "s1")?;
    wait_for_ping(&a, b_ip)?;

    let late = world
        .ovl
        .attach(&lab, &world.hosts[2], Cluster::NODES[2], "tc")?;
    world.agents.push(late);
    let (c, c_ip) = world.container(&lab, 2, SECRET, "s2")?;
    wait_for_keys(&world)?;
    let a_ip = world.inspect(0, SECRET)?["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .find(|e| e["location"]["node"] == "host-a")
        .and_then(|e| e["ip"].as_str()?.parse::<Ipv4Addr>().ok())
        .context("host-a's endpoint")?;
    wait_for_ping(&c, a_ip)?;
    wait_for_ping(&c, b_ip)?;
    wait_for_ping(&a, c_ip)?;
    wait_for_ping(&b, c_ip)?;
    // A and B were not restarted: they learnt C from the store.
    for i in 0..2 {
        let r = crypto(&world, i)?;
        let peers: Vec<&str> = r["peers"]
            .as_array()
            .context("peers")?
            .iter()
            .filter_map(|p| p["node"].as_str())
            .collect();
        ensure!(peers.contains(&"host-c"), "host {i} peers: {peers:?}");
    }
    world.stop()
}

#[test]
fn an_encrypted_network_follows_its_host_to_a_new_underlay_address() -> Result<()> {
    let lab = Lab::new("crypt-move")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let ([(a, a_ip), (b, b_ip)], [(_, open_a), (open_b, _)]) = (nets.secret, nets.open);
    wait_for_ping(&b, a_ip)?;

    // Host A's address moves under its running agent.
    let new = Ipv4Addr::new(192, 0, 2, 20);
    world.hosts[0].move_address(new)?;

    // The encrypted network carries on between the new address and B, as
    // WireGuard: B's peer for host-a is at the new address, with a
    // handshake since the move, and A's agent reports its restarted path.
    wait_for_ping(&open_b, open_a)?;
    wait_for_ping(&b, a_ip)
        .and_then(|()| wait_for_ping(&a, b_ip))
        .with_context(|| {
            format!(
                "the encrypted network did not carry on after the move:\n{}",
                world.agents[0].output_report()
            )
        })?;
    let peer_a = peer(&world, 1, "host-a")?;
    ensure!(
        peer_a["endpoint"] == format!("{new}:{WG_PORT}")
            && peer_a["last_handshake_seconds"].as_f64().is_some(),
        "B's peer host-a after the move: {peer_a}"
    );
    let peer_b = peer(&world, 0, "host-b")?;
    ensure!(
        peer_b["last_handshake_seconds"].as_f64().is_some(),
        "A's peer host-b after the move: {peer_b}"
    );
    world.stop()
}

#[test]
fn killed_agent_fails_closed_dropping_and_counting_and_sending_nothing_in_clear() -> Result<()> {
    let lab = Lab::new("crypt-kill")?;
    let mut world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let secret_vni = vni_of(&world, SECRET)?;
    let open_vni = vni_of(&world, OPEN)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    let [(o0, o0_ip), (_, o1_ip)] = &nets.open;
    wait_for_ping(s0, *s1_ip)?;
    wait_for_ping(o0, *o1_ip)?;

    // What the checks below look for is there while the agent runs.
    ensure!(
        wireguard_on_host(&world, 0)? == (true, true),
        "host A's WireGuard (socket, device) before the kill: {:?}",
        wireguard_on_host(&world, 0)?
    );
    let agent = world.agents.remove(0);
    agent.kill()?;
    agent.wait_exit(Duration::from_secs(10))?;
    // The kernel released what the agent held before its exit could be
    // waited for: the WireGuard socket is closed, and the crypto device
    // (not persistent, opened close-on-exec so no other process holds
    // it) went with its last descriptor. Nothing to wait for.
    let (socket, device) = wireguard_on_host(&world, 0)?;
    ensure!(
        !socket && !device,
        "after the agent was killed: WireGuard socket {socket}, crypto device {device}"
    );

    let before = world.counters(0, SECRET)?;
    let capture = Capture::start(&lab, &world.router, "h0", "dead", 6)?;
    let r = ping(s0, *s1_ip, N as u32, &["-i", "0.2", "-W", "1"])?;
    ensure!(
        r.received == 0,
        "encrypted network answered without an agent:\n{}",
        r.output
    );
    // The plain network's data path outlives the agent, as always.
    let r = ping(o0, *o1_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    let frames = capture.finish(&world.router, Duration::from_secs(30))?;
    let after = world.counters(0, SECRET)?;
    let no_key = after.no_key - before.no_key;
    ensure!(
        no_key == N,
        "no_key counted {no_key}, {N} echo requests sent"
    );
    // The capture saw the plain network's 3 echo requests and 3 replies,
    // as VXLAN with its VNI: it held what crossed the wire, so finding
    // nothing of the encrypted network in it below means something.
    let open_icmp = |src: Ipv4Addr, dst: Ipv4Addr| {
        let inner = [src.to_string(), dst.to_string()];
        frames
            .iter()
            .filter(|f| {
                f.protocols.contains(":vxlan:")
                    && f.protocols.contains(":icmp")
                    && f.vni == open_vni.to_string()
                    && f.addrs.get(2..) == Some(&inner[..])
            })
            .count()
    };
    let (requests, replies) = (open_icmp(*o0_ip, *o1_ip), open_icmp(*o1_ip, *o0_ip));
    ensure!(
        requests == 3 && replies == 3,
        "captured {requests} echo requests and {replies} replies of the plain network \
         (3 each sent) in VXLAN {open_vni}: {frames:#?}"
    );
    for f in &frames {
        ensure!(
            f.vni != secret_vni.to_string() && !f.addrs.iter().any(|a| a.starts_with("198.18.0.")),
            "encrypted network's traffic in clear: {f:?}"
        );
        ensure!(
            !(f.protocols.ends_with(":wg")
                && f.addrs.first().map(String::as_str) == Some("192.0.2.10")),
            "host A sent WireGuard without an agent: {f:?}"
        );
    }

    // A new agent takes over, with the same key: traffic flows again.
    let key_before = world.node_keys(1)?["host-a"].clone();
    let agent = world
        .ovl
        .attach(&lab, &world.hosts[0], Cluster::NODES[0], "tc")?;
    world.agents.insert(0, agent);
    wait_for_ping(s0, *s1_ip)?;
    ensure!(
        world.node_keys(1)?["host-a"] == key_before,
        "key changed across a restart"
    );
    world.stop()
}

/// Host `i`'s WireGuard engine as the kernel shows it: (a UDP socket
/// listens on the WireGuard port, the crypto device exists).
fn wireguard_on_host(world: &Cluster, i: usize) -> Result<(bool, bool)> {
    let ns = &world.hosts[i].netns;
    let port = format!("sport = :{WG_PORT}");
    let sockets = ns.exec(&["ss", "-Hnul", &port])?;
    let links = ns.exec(&["ip", "-o", "link", "show"])?;
    Ok((
        !String::from_utf8_lossy(&sockets.stdout).trim().is_empty(),
        String::from_utf8_lossy(&links.stdout).contains("ovlwg"),
    ))
}

/// Waits until both hosts' engines are `running` (socket and device) or
/// stopped (neither).
fn wait_for_wireguard(world: &Cluster, running: bool) -> Result<()> {
    wait_until(Duration::from_secs(10), || {
        for i in 0..world.hosts.len() {
            if wireguard_on_host(world, i)? != (running, running) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .with_context(|| {
        let seen: Vec<_> = (0..world.hosts.len())
            .map(|i| wireguard_on_host(world, i))
            .collect();
        format!("WireGuard should be running: {running}; (socket, device) per host: {seen:?}")
    })
}

#[test]
fn wireguard_listens_only_while_the_cluster_has_an_encrypted_network() -> Result<()> {
    let lab = Lab::new("crypt-demand")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let ns = &world.hosts[0].netns;
    world.ovl.create_network(ns, OPEN, OPEN_SUBNET, &[])?;
    let (o0, _) = world.container(&lab, 0, OPEN, "o0")?;
    let (_, o1_ip) = world.container(&lab, 1, OPEN, "o1")?;
    wait_for_ping(&o0, o1_ip)?;
    // Keys are published from the start, so peers know them before the
    // first encrypted network; nothing listens yet.
    wait_for_keys(&world)?;
    let key = world.node_keys(1)?["host-a"].clone();
    wait_for_wireguard(&world, false)?;
    let report = crypto(&world, 0)?;
    ensure!(report["device"].is_null(), "{report}");
    ensure!(
        report["public_key"].as_str() == key.as_deref(),
        "the report's key is not the published one: {report}"
    );
    let text = world.run(0, &["stats", "--crypto"])?;
    ensure!(
        text.contains("device:      none (no encrypted network"),
        "{text}"
    );

    // The first encrypted network starts it on every host.
    world
        .ovl
        .create_network(ns, SECRET, SECRET_SUBNET, &["--encrypted"])?;
    wait_for_wireguard(&world, true)?;
    let (s0, _) = world.container(&lab, 0, SECRET, "s0")?;
    let (s1, s1_ip) = world.container(&lab, 1, SECRET, "s1")?;
    wait_for_ping(&s0, s1_ip)?;
    let sealed = crypto(&world, 0)?["counters"]["tx_packets"]
        .as_u64()
        .context("no tx_packets")?;
    ensure!(sealed > 0, "the encrypted network's pings were not sealed");

    // The last one's removal stops it on every host; the plain network
    // carries on, the counters stay.
    world.run(0, &["disconnect", SECRET, s0.name()])?;
    world.run(1, &["disconnect", SECRET, s1.name()])?;
    world.run(0, &["network", "rm", SECRET])?;
    wait_for_wireguard(&world, false)?;
    let report = crypto(&world, 0)?;
    ensure!(report["device"].is_null(), "{report}");
    ensure!(
        report["counters"]["tx_packets"].as_u64() == Some(sealed),
        "counters did not outlive the engine: {report}"
    );
    wait_for_ping(&o0, o1_ip)?;

    // And the next one starts it again, with the same key.
    world
        .ovl
        .create_network(ns, SECRET, SECRET_SUBNET, &["--encrypted"])?;
    let (s0, _) = world.container(&lab, 0, SECRET, "s0b")?;
    let (_, s1_ip) = world.container(&lab, 1, SECRET, "s1b")?;
    wait_for_ping(&s0, s1_ip)?;
    wait_for_wireguard(&world, true)?;
    ensure!(
        world.node_keys(1)?["host-a"] == key,
        "the key changed across the engine's runs"
    );
    world.stop()
}

/// Datagrams per ECN case, and the containers' UDP port for them.
const ECN_N: u64 = 20;
const ECN_PORT: u16 = 9000;

/// Length of the IPv4 packet of the WireGuard message that carries the
/// VXLAN of a container's UDP datagram of `payload` bytes: outer IPv4 and
/// UDP, WireGuard's 16-byte header and 16-byte tag around the VXLAN
/// packet (IPv4, UDP, VXLAN, Ethernet, IPv4, UDP, payload), padded to a
/// multiple of 16 bytes as WireGuard pads (payloads far below the MTU).
fn wireguard_ip_len(payload: usize) -> usize {
    let vxlan = 20 + 8 + 8 + 14 + 20 + 8 + payload;
    20 + 8 + 16 + vxlan.next_multiple_of(16) + 16
}

#[test]
fn wireguard_messages_show_their_packets_ecn_field_no_dscp_and_lengths_in_16_byte_steps()
-> Result<()> {
    let lab = Lab::new("crypt-ecn")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let receiver = TosReceiver::start(&lab, s1, *s1_ip, ECN_PORT)?;

    // Expedited Forwarding (DSCP 46) on every flow: the containers keep
    // it, the wire never shows it. A size per flow tells their messages
    // apart on the wire; none makes a VXLAN packet of a multiple of 16
    // bytes, which WireGuard's padding rounds up to.
    const EF: u8 = 46 << 2;
    let flows = [
        ("ect0", EF | ECT0, 100),
        ("notect", EF | NOT_ECT, 300),
        ("ect1", EF | ECT1, 500),
    ];
    // Long enough for three python senders on a loaded machine (8 s once
    // ended before the last flow's last two datagrams).
    let capture = Capture::start(&lab, &world.router, "h0", "ecn", 15)?;
    for (tag, tos, size) in flows {
        send_udp_with_tos(s0, *s1_ip, ECN_PORT, tos, tag, ECN_N, size)?;
    }
    let frames = capture.finish(&world.router, Duration::from_secs(30))?;

    let host_a = world.hosts[0].addr.to_string();
    let sealed: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.wg_type == "4" && f.addrs.first() == Some(&host_a))
        .collect();
    for f in frames.iter().filter(|f| f.protocols.ends_with(":wg")) {
        ensure!(
            f.tos & !ECN_MASK == 0,
            "a WireGuard message shows a DSCP: {f:?}"
        );
    }
    // Every packet sealed padded: the wire tells lengths in 16-byte steps.
    for f in &sealed {
        ensure!(
            (f.ip_len - 20 - 8 - 32) % 16 == 0,
            "a WireGuard message carries a packet of a length that is no multiple of 16: {f:?}"
        );
    }
    for (tag, tos, size) in flows {
        let len = wireguard_ip_len(size);
        let ecn: Vec<u8> = sealed
            .iter()
            .filter(|f| f.ip_len == len)
            .map(|f| f.tos)
            .collect();
        ensure!(
            ecn.len() as u64 == ECN_N && ecn.iter().all(|t| *t == tos & ECN_MASK),
            "{tag}: {ECN_N} datagrams with TOS {tos:#04x} sent; their WireGuard messages \
             ({len} bytes) had TOS {ecn:?}; host A sent (length, TOS) {:?}",
            sealed.iter().map(|f| (f.ip_len, f.tos)).collect::<Vec<_>>()
        );
    }
    // The containers' own packets arrive as they were sent, DSCP and all.
    wait_until(Duration::from_secs(5), || {
        Ok(receiver.received()?.len() as u64 >= 3 * ECN_N)
    })
    .with_context(|| format!("received {:?}", receiver.received()))?;
    for (tag, tos, _) in flows {
        let got = receiver.tagged(tag)?;
        ensure!(
            got.len() as u64 == ECN_N && got.iter().all(|r| r.tos == tos),
            "{tag}: sent {ECN_N} with TOS {tos:#04x}, received {got:?}"
        );
    }
    world.stop()
}

#[test]
fn padding_never_makes_a_message_larger_than_the_receiving_hosts_underlay_takes() -> Result<()> {
    let lab = Lab::new("crypt-pad-mtu")?;
    let world = TwoHosts::start(&lab, "tc")?;
    // Host A on a jumbo underlay, host B on a 1450-byte one (a common
    // cloud MTU), the router's ends matching: an encrypted network gets
    // MTU 1450 - 110 = 1340, its largest VXLAN packet is 1390 bytes, no
    // multiple of 16, and its message fills B's underlay exactly.
    const JUMBO: u32 = 9000;
    const NARROW: u32 = 1450;
    for (i, mtu) in [(0, JUMBO), (1, NARROW)] {
        let mtu = mtu.to_string();
        world.hosts[i]
            .netns
            .ip(&["link", "set", HOST_IFACE, "mtu", &mtu])?;
        world
            .router
            .ip(&["link", "set", &format!("h{i}"), "mtu", &mtu])?;
    }
    let state_file = lab.tempdir().join("store/state.json");
    let stored_mtus = || -> Result<Vec<Option<u64>>> {
        let text = std::fs::read_to_string(&state_file)
            .with_context(|| format!("read {}", state_file.display()))?;
        let state: Value = serde_json::from_str(&text)?;
        Ok((0..2)
            .map(|i| state["nodes"][TwoHosts::NODES[i]]["underlay_mtu"].as_u64())
            .collect())
    };
    wait_until(Duration::from_secs(10), || {
        Ok(stored_mtus()? == [Some(JUMBO.into()), Some(NARROW.into())])
    })
    .with_context(|| format!("the store has underlay MTUs {:?}", stored_mtus()))?;
    let nets = two_networks(&lab, &world)?;
    let mtu = world.inspect(0, SECRET)?["mtu"].clone();
    ensure!(mtu == NARROW - 110, "the encrypted network has MTU {mtu}");
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;

    // Full-size pings from A to B: every one answered, each request one
    // WireGuard message of exactly B's MTU on the wire (padded no further
    // than B takes, so never dropped nor fragmented on the way).
    const PINGS: usize = 5;
    let capture = Capture::start(&lab, &world.router, "h0", "pad-mtu", 6)?;
    let size = (NARROW - 110 - 28).to_string();
    let r = ping(
        s0,
        *s1_ip,
        PINGS as u32,
        &["-M", "do", "-s", &size, "-i", "0.2", "-W", "2"],
    )?;
    let frames = capture.finish(&world.router, Duration::from_secs(30))?;
    ensure!(r.all_received(), "full-size pings lost:\n{}", r.output);
    let host_a = world.hosts[0].addr.to_string();
    let sealed: Vec<usize> = frames
        .iter()
        .filter(|f| f.wg_type == "4" && f.addrs.first() == Some(&host_a))
        .map(|f| f.ip_len)
        .collect();
    ensure!(
        sealed.iter().all(|len| *len <= NARROW as usize)
            && sealed.iter().filter(|len| **len == NARROW as usize).count() == PINGS,
        "{PINGS} full-size pings to a host on a {NARROW}-byte underlay left host A as \
         messages of IPv4 lengths {sealed:?}"
    );
    world.stop()
}

#[test]
fn a_congestion_mark_on_wireguard_reaches_the_container_or_drops_what_cannot_carry_it() -> Result<()>
{
    let lab = Lab::new("crypt-ce")?;
    let world = Cluster::start_with_env(&lab, "tc", &[("OVL_METRICS", AGENT_METRICS)])?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, s0_ip), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s1, *s0_ip)?;
    wait_for_ping(s0, *s1_ip)?;
    let receiver = TosReceiver::start(&lab, s0, *s0_ip, ECN_PORT)?;
    let congestion = |c: &Value| c["drops"]["congestion"].as_u64().unwrap_or(0);
    let counters = |i| -> Result<Value> { Ok(crypto(&world, i)?["counters"].clone()) };

    // The router between the hosts is congested on the way from B to A:
    // it marks B's WireGuard messages CE.
    let (a, b) = (world.hosts[0].addr, world.hosts[1].addr);
    mark_congestion(&world.router, b, a, WG_PORT)?;
    let before = counters(0)?;
    let network_before = world.counters(0, SECRET)?;

    // ECN-capable packets reach the container marked.
    for (tag, tos) in [("ect0", ECT0), ("ect1", ECT1)] {
        send_udp_with_tos(s1, *s0_ip, ECN_PORT, tos, tag, ECN_N, 200)?;
    }
    wait_until(Duration::from_secs(5), || {
        Ok(receiver.received()?.len() as u64 >= 2 * ECN_N)
    })
    .with_context(|| format!("received {:?}", receiver.received()))?;
    for tag in ["ect0", "ect1"] {
        let got = receiver.tagged(tag)?;
        ensure!(
            got.len() as u64 == ECN_N && got.iter().all(|r| r.tos == CE),
            "{tag}: sent {ECN_N} across a congested underlay, received {got:?}"
        );
    }
    ensure!(
        congestion(&counters(0)?) == congestion(&before),
        "ECN-capable packets counted as congestion drops: {}",
        counters(0)?
    );

    // Packets that are not ECN-capable cannot carry the mark: dropped,
    // each counted once as `congestion` by host A's agent, none delivered.
    send_udp_with_tos(s1, *s0_ip, ECN_PORT, NOT_ECT, "notect", ECN_N, 200)?;
    wait_until(Duration::from_secs(5), || {
        Ok(congestion(&counters(0)?) >= congestion(&before) + ECN_N)
    })
    .with_context(|| format!("congestion drops: before {before}, now {:?}", counters(0)))?;
    let after = counters(0)?;
    ensure!(
        congestion(&after) - congestion(&before) == ECN_N,
        "{ECN_N} sent: before {before}, after {after}"
    );
    let delivered = receiver.tagged("notect")?;
    ensure!(delivered.is_empty(), "delivered {delivered:?}");
    // The agent dropped them before the data path saw them; what it
    // passed on (the marked ECN-capable packets) the data path delivered.
    let network_after = world.counters(0, SECRET)?;
    ensure!(
        network_after.drops() == network_before.drops(),
        "the data path dropped: {network_before:?} -> {network_after:?}"
    );
    let text = world.scrape(0)?;
    let line = format!(
        "ovl_crypto_drops_total{{reason=\"congestion\"}} {}",
        congestion(&after)
    );
    ensure!(text.contains(&line), "no `{line}` in the metrics:\n{text}");

    // Once the underlay is no longer congested they pass again, unmarked.
    clear_congestion(&world.router)?;
    send_udp_with_tos(s1, *s0_ip, ECN_PORT, NOT_ECT, "clear", ECN_N, 200)?;
    wait_until(Duration::from_secs(5), || {
        Ok(receiver.tagged("clear")?.len() as u64 >= ECN_N)
    })
    .with_context(|| format!("received {:?}", receiver.received()))?;
    ensure!(
        receiver.tagged("clear")?.iter().all(|r| r.tos == NOT_ECT),
        "{:?}",
        receiver.tagged("clear")
    );
    ensure!(congestion(&counters(0)?) == congestion(&after));
    world.stop()
}

#[test]
fn bad_cli_input_for_encryption_is_refused_clearly() -> Result<()> {
    let lab = Lab::new("crypt-cli")?;
    let world = TwoHosts::start(&lab, "tc")?;
    // No agent for this node: rotation names what to do.
    let out = world
        .ovl
        .run_unchecked(&world.hosts[0].netns, "nobody", &["node", "rotate-key"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("ovl attach"), "{err}");
    let out = world.ovl.run_unchecked(
        &world.hosts[0].netns,
        "host-a",
        &["stats", "--crypto", "--underlay"],
    )?;
    ensure!(!out.status.success(), "conflicting flags accepted");
    // A network cannot be both given a too-small MTU and encrypted quietly:
    // the MTU is the user's, the warning the agent's; but the flag is kept.
    world.ovl.create_network(
        &world.hosts[0].netns,
        SECRET,
        SECRET_SUBNET,
        &["--encrypted", "--mtu", "1300"],
    )?;
    let net = world.inspect(0, SECRET)?;
    ensure!(net["encrypted"] == true && net["mtu"] == 1300, "{net}");
    if net["vni"].is_null() {
        bail!("no VNI: {net}");
    }
    world.stop()
}

/// Datagrams to a node's WireGuard port that are no WireGuard message it
/// can use, each named after what it is, and the drop reason it counts
/// as: too short for any message, an unknown type, a handshake message of
/// the wrong size, messages for a session index no one gave out, one far
/// beyond any underlay (IPv4 fragments), and an empty datagram.
const GARBAGE: [(&str, &str, &str); 10] = [
    ("one byte", "b'\\x04'", "malformed"),
    ("data header only", "b'\\x04\\x00\\x00\\x00'", "malformed"),
    ("unknown type", "b'\\x05' + bytes(63)", "malformed"),
    (
        "short initiation",
        "b'\\x01\\x00\\x00\\x00' + os.urandom(96)",
        "malformed",
    ),
    (
        "jumbo initiation",
        "b'\\x01\\x00\\x00\\x00' + os.urandom(8996)",
        "malformed",
    ),
    (
        "response, no session",
        "b'\\x02\\x00\\x00\\x00' + os.urandom(4) + b'\\xff' * 4 + os.urandom(80)",
        "unknown_session",
    ),
    (
        "cookie reply, no session",
        "b'\\x03\\x00\\x00\\x00' + b'\\xff' * 4 + os.urandom(56)",
        "unknown_session",
    ),
    (
        "data, no session",
        "b'\\x04\\x00\\x00\\x00' + b'\\xff' * 4 + os.urandom(64)",
        "unknown_session",
    ),
    (
        "data of 65000 bytes",
        "b'\\x04\\x00\\x00\\x00' + b'\\xff' * 4 + os.urandom(64992)",
        "unknown_session",
    ),
    ("empty", "b''", "malformed"),
];

#[test]
fn garbage_datagrams_to_the_wireguard_port_are_dropped_and_counted_each() -> Result<()> {
    let lab = Lab::new("crypt-garbage")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let drops = |c: &Value, r: &str| c["drops"][r].as_u64().unwrap_or(0);
    let to = world.hosts[0].addr;
    for (what, payload, reason) in GARBAGE {
        let before = crypto(&world, 0)?["counters"].clone();
        let script = format!(
            "import os, socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.sendto({payload}, ('{to}', {WG_PORT}))\n"
        );
        world.router.exec(&["/usr/bin/python3", "-c", &script])?;
        let counted = wait_until(Duration::from_secs(3), || {
            let now = crypto(&world, 0)?["counters"].clone();
            Ok(drops(&now, reason) > drops(&before, reason))
        });
        let after = crypto(&world, 0)?["counters"].clone();
        ensure!(
            counted.is_ok()
                && after["drops"]
                    .as_object()
                    .context("drops")?
                    .iter()
                    .all(|(r, n)| n.as_u64() == Some(drops(&before, r) + u64::from(r == reason))),
            "{what}: one {reason} drop expected\nbefore {before}\nafter {after}"
        );
        ensure!(
            after["rx_packets"] == before["rx_packets"],
            "{what} was opened"
        );
    }
    // The engine carries on.
    let r = ping(s0, *s1_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    world.stop()
}

#[test]
fn opened_vxlan_the_data_path_does_not_take_never_reaches_the_hosts_stack() -> Result<()> {
    let lab = Lab::new("crypt-stack")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(_, s0_ip), (s1, _)] = &nets.secret;
    wait_for_ping(s1, *s0_ip)?;
    let pin_a = world.ovl.pin_dir("host-a");

    // Everything on host A's link: an ICMP error about an opened packet
    // would quote it in clear.
    let capture = Capture::start_filtered(&lab, &world.router, "h0", "stack", 12, "ip")?;

    // The cluster moves to another VXLAN port while host B's agent is
    // frozen: B's data path still encapsulates for the old port, and
    // its pings wait in its crypto device until the agent seals them —
    // then host A, on the new port already, opens them.
    const PINGS: u32 = 5;
    world.agents[1].frozen(|| {
        let r = ping(s1, *s0_ip, PINGS, &["-i", "0.2", "-W", "1"])?;
        ensure!(
            r.received == 0,
            "answered while B's agent was frozen: {}",
            r.output
        );
        world.run(0, &["cluster", "set", "--vxlan-port", "8472"])?;
        wait_until(Duration::from_secs(10), || {
            Ok(ovl_tests::dump_node_config(&pin_a)?.udp_port == 8472)
        })
    })?;
    wait_until(Duration::from_secs(10), || {
        Ok(ovl_tests::dump_node_config(&world.ovl.pin_dir("host-b"))?.udp_port == 8472)
    })?;
    wait_for_ping(s1, *s0_ip)?;
    let frames = capture.finish(&world.router, Duration::from_secs(30))?;
    ensure!(
        frames.iter().any(|f| f.protocols.ends_with(":wg")),
        "the capture holds no WireGuard: {frames:#?}"
    );
    let leaked: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.addrs.iter().any(|a| a.starts_with("198.18.0.")))
        .collect();
    ensure!(
        leaked.is_empty(),
        "host A sent the encrypted network's packets in clear: {leaked:#?}"
    );
    // Dropped and counted by host A's data path instead, each of them.
    let underlay = world.ovl.underlay(&world.hosts[0].netns, "host-a")?;
    ensure!(
        underlay["drops"]["unsupported"] == PINGS,
        "host A's underlay counters: {underlay}"
    );
    world.stop()
}

/// The VXLAN packet of a default ping (56 bytes of data): outer IPv4, UDP,
/// VXLAN, inner Ethernet, IPv4 and ICMP header.
const PING_VXLAN_LEN: u64 = 20 + 8 + 8 + 14 + 20 + 8 + 56;

#[test]
fn every_packet_is_counted_once_each_way_through_rotations_on_both_nodes() -> Result<()> {
    let lab = Lab::new("crypt-count")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let counters = |i| -> Result<Value> { Ok(crypto(&world, i)?["counters"].clone()) };
    let (a0, b0) = (counters(0)?, counters(1)?);

    let pinger = BackgroundPing::start(&lab, s0, *s1_ip, 400, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(1));
    world.run(0, &["node", "rotate-key"])?;
    std::thread::sleep(Duration::from_secs(1));
    world.run(1, &["node", "rotate-key"])?;
    let r = pinger.finish()?;
    ensure!(r.all_received(), "lost pings: {}", r.output);
    let n = u64::from(r.transmitted);
    let (a1, b1) = (counters(0)?, counters(1)?);
    let delta = |after: &Value, before: &Value, k: &str| {
        after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0)
    };
    for (what, got, want) in [
        ("A sealed", delta(&a1, &a0, "tx_packets"), n),
        ("B opened", delta(&b1, &b0, "rx_packets"), n),
        ("B sealed", delta(&b1, &b0, "tx_packets"), n),
        ("A opened", delta(&a1, &a0, "rx_packets"), n),
        (
            "A sealed bytes",
            delta(&a1, &a0, "tx_bytes"),
            n * PING_VXLAN_LEN,
        ),
        (
            "B opened bytes",
            delta(&b1, &b0, "rx_bytes"),
            n * PING_VXLAN_LEN,
        ),
    ] {
        ensure!(
            got == want,
            "{what}: {got}, {n} pings each way\nA before {a0}\nA after {a1}\nB before {b0}\nB after {b1}"
        );
    }
    for c in [&a1, &b1] {
        let dropped: u64 = c["drops"]
            .as_object()
            .context("drops")?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        ensure!(dropped == 0, "drops: {c}");
    }
    world.stop()
}

#[test]
fn a_peer_back_with_a_new_key_at_a_new_address_is_reached_and_its_old_one_forgotten() -> Result<()>
{
    let lab = Lab::new("crypt-reborn")?;
    let mut world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, s0_ip), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let old_key = world.node_keys(0)?["host-b"].clone();

    // Host B's agent dies, its key with its state; it comes back at
    // another address with a new key pair.
    world.kill_agent(1)?;
    std::fs::remove_dir_all(lab.tempdir().join("state-host-b/keys"))?;
    let new = Ipv4Addr::new(198, 51, 100, 20);
    world.hosts[1] = world.hosts[1].move_address(new)?;
    world.restart_agent(&lab, 1, &[])?;
    wait_until(Duration::from_secs(15), || {
        let keys = world.node_keys(0)?;
        Ok(keys["host-b"].is_some() && keys["host-b"] != old_key)
    })
    .context("host B published no new key")?;
    wait_for_ping(s0, *s1_ip)
        .and_then(|()| wait_for_ping(s1, *s0_ip))
        .with_context(|| format!("A: {:?}\nB: {:?}", crypto(&world, 0), crypto(&world, 1)))?;
    let new_key = world.node_keys(0)?["host-b"].clone();
    let p = peer(&world, 0, "host-b")?;
    ensure!(
        p["endpoint"] == format!("{new}:{WG_PORT}")
            && p["public_key"].as_str() == new_key.as_deref()
            && p["last_handshake_seconds"].as_f64().is_some(),
        "A's peer host-b: {p}"
    );
    let peers = crypto(&world, 0)?["peers"].clone();
    ensure!(
        peers.as_array().map(Vec::len) == Some(1),
        "A's peers: {peers}"
    );
    world.stop()
}

/// The names of `pid`'s threads.
fn thread_names(pid: u32) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = task?.path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_owned());
        }
    }
    Ok(names)
}

#[test]
fn a_stopped_engine_leaves_no_thread_socket_or_device_and_a_stopped_agent_nothing() -> Result<()> {
    let lab = Lab::new("crypt-leftover")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    let pid = world.agents[0].pid();
    let crypto_threads = || -> Result<Vec<String>> {
        Ok(thread_names(pid)?
            .into_iter()
            .filter(|t| t.starts_with("ovl-crypto"))
            .collect())
    };
    ensure!(crypto_threads()?.len() == 3, "{:?}", thread_names(pid));
    // Stopped by the last encrypted network's removal and started by the
    // next one, a few times over: each run's threads go with it.
    for _ in 0..3 {
        world.run(0, &["disconnect", SECRET, s0.name()])?;
        world.run(1, &["disconnect", SECRET, s1.name()])?;
        world.run(0, &["network", "rm", SECRET])?;
        wait_for_wireguard(&world, false)?;
        ensure!(crypto_threads()?.is_empty(), "{:?}", thread_names(pid));
        world.ovl.create_network(
            &world.hosts[0].netns,
            SECRET,
            SECRET_SUBNET,
            &["--encrypted"],
        )?;
        wait_for_wireguard(&world, true)?;
        world
            .ovl
            .connect(&world.hosts[0], "host-a", SECRET, s0, &[])?;
        let s1_ip = world
            .ovl
            .connect(&world.hosts[1], "host-b", SECRET, s1, &[])?;
        wait_for_ping(s0, s1_ip)?;
        ensure!(crypto_threads()?.len() == 3, "{:?}", thread_names(pid));
    }
    // The agent's end takes the engine with it.
    let host = world.hosts[0].netns.clone();
    world.stop()?;
    let links = host.exec(&["ip", "-o", "link", "show"])?;
    let sockets = host.exec(&["ss", "-Hanu"])?;
    let (links, sockets) = (
        String::from_utf8_lossy(&links.stdout),
        String::from_utf8_lossy(&sockets.stdout),
    );
    ensure!(
        !links.contains("ovlwg"),
        "a crypto device outlived its agent:\n{links}"
    );
    ensure!(
        !sockets.contains(&format!(":{WG_PORT} ")),
        "a WireGuard socket outlived its agent:\n{sockets}"
    );
    Ok(())
}

#[test]
fn a_router_reporting_a_smaller_path_mtu_fragments_wireguard_and_full_size_packets_cross()
-> Result<()> {
    let lab = Lab::new("crypt-pmtu")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (s1, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    // The router's way to host B takes 1400 bytes at most and says so
    // (ICMP fragmentation needed) to senders that set DF.
    world.router.ip(&[
        "route",
        "change",
        "198.51.100.0/24",
        "dev",
        "h1",
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        "198.51.100.1",
        "mtu",
        "lock",
        "1400",
    ])?;
    let size = (1390 - 28).to_string();
    wait_until(Duration::from_secs(15), || {
        Ok(ping(s0, *s1_ip, 1, &["-M", "do", "-s", &size, "-W", "1"])?.all_received())
    })
    .context("no full-size ping crossed")?;
    let r = ping(
        s0,
        *s1_ip,
        5,
        &["-M", "do", "-s", &size, "-i", "0.2", "-W", "2"],
    )?;
    ensure!(r.all_received(), "{}", r.output);
    let bytes = iperf(&lab, s0, s1, *s1_ip, &["-t", "2"])?;
    ensure!(bytes > 1e6, "TCP across the smaller path: {bytes} bytes");
    // Host A's stack learnt the path MTU from the router's report (its
    // WireGuard socket's), and fragments what exceeds it.
    let route =
        world.hosts[0]
            .netns
            .exec(&["ip", "route", "get", &world.hosts[1].addr.to_string()])?;
    let route = String::from_utf8_lossy(&route.stdout);
    ensure!(route.contains("mtu 1400"), "host A's route to B: {route}");
    let a = crypto(&world, 0)?;
    ensure!(a["counters"]["drops"]["io_error"] == 0, "{a}");
    world.stop()
}

#[test]
fn routed_subnets_and_static_endpoints_of_an_encrypted_network_never_go_out_in_clear() -> Result<()>
{
    let lab = Lab::new("crypt-routed")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let ns = &world.hosts[0].netns;
    world.ovl.create_network(
        ns,
        SECRET,
        SECRET_SUBNET,
        &["--subnet", "198.18.2.0/24", "--encrypted"],
    )?;
    let c0 = lab.container("r0")?;
    let c0_ip = world
        .ovl
        .connect(&world.hosts[0], "host-a", SECRET, &c0, &[])?;
    let c1 = lab.container("r1")?;
    let c1_ip = world.ovl.connect(
        &world.hosts[1],
        "host-b",
        SECRET,
        &c1,
        &["--subnet", "198.18.2.0/24"],
    )?;
    world.run(
        0,
        &[
            "endpoint",
            "add",
            SECRET,
            "198.18.0.50",
            "--vtep",
            "203.0.113.10",
        ],
    )?;
    wait_for_keys(&world)?;
    // From before the first packet: the handshake's too.
    let capture = Capture::start_filtered(&lab, &world.router, "h0", "routed", 10, "ip")?;
    // Between the network's two subnets, routed by the gateways.
    wait_for_ping(&c0, c1_ip)?;
    wait_for_ping(&c1, c0_ip)?;
    let before = world.counters(0, SECRET)?;
    // A static endpoint's VTEP runs no ovl and publishes no key.
    let r = ping(&c0, "198.18.0.50".parse()?, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.received == 0, "{}", r.output);
    let r = ping(
        &c0,
        "198.18.0.255".parse()?,
        3,
        &["-b", "-i", "0.2", "-W", "1"],
    )?;
    // A broadcast goes nowhere (proxy ARP, nothing flooded).
    ensure!(r.received == 0, "{}", r.output);
    let frames = capture.finish(&world.router, Duration::from_secs(30))?;
    let after = world.counters(0, SECRET)?;
    for f in &frames {
        ensure!(
            !f.addrs.iter().any(|a| a.starts_with("198.18.")),
            "in clear: {f:?}"
        );
    }
    // Dropped and counted: the static endpoint's pings no_key, the
    // broadcasts unsupported (ovl floods nothing).
    ensure!(
        after.no_key - before.no_key == 3
            && after.unsupported - before.unsupported == 3
            && after.no_endpoint == before.no_endpoint,
        "{before:?}\n{after:?}"
    );
    ensure!(
        frames.iter().any(|f| f.protocols.ends_with(":wg")),
        "the capture holds no WireGuard: {frames:#?}"
    );
    world.stop()
}

#[test]
fn packets_waiting_for_a_peer_that_is_removed_are_counted_dropped() -> Result<()> {
    let lab = Lab::new("crypt-unsent")?;
    let mut world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    // Host B dies, and host A's agent restarts after it: A's new engine
    // has no session with B, and what its containers send waits for a
    // handshake that never completes.
    world.kill_agent(1)?;
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(crypto(&world, 0)?["device"].is_string())
    })?;
    let before = crypto(&world, 0)?["counters"].clone();
    let r = ping(s0, *s1_ip, N as u32, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.received == 0, "{}", r.output);
    // The dead node is removed: what waited for it is given up.
    world.run(0, &["node", "rm", "host-b"])?;
    wait_until(Duration::from_secs(10), || {
        Ok(crypto(&world, 0)?["peers"]
            .as_array()
            .is_some_and(Vec::is_empty))
    })
    .context("host A kept its peer host-b")?;
    let after = crypto(&world, 0)?["counters"].clone();
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    let no_key = after["drops"]["no_key"].as_u64().unwrap_or(0)
        - before["drops"]["no_key"].as_u64().unwrap_or(0);
    ensure!(
        delta("tx_packets") == 0 && no_key == N,
        "{N} pings waited for host B, then it was removed: sealed {}, dropped no_key {no_key}\n\
         before {before}\nafter {after}",
        delta("tx_packets")
    );
    world.stop()
}

#[test]
fn a_wireguard_port_taken_on_a_node_is_what_its_crypto_report_says() -> Result<()> {
    let lab = Lab::new("crypt-taken")?;
    let world = TwoHosts::start(&lab, "tc")?;
    // Something else holds host B's WireGuard port.
    let b = world.hosts[1].addr;
    let squatter = lab.spawn(
        &world.hosts[1].netns,
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "import socket, time\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('{b}', {WG_PORT}))\n\
                 print('bound', flush=True)\n\
                 time.sleep(120)\n"
            ),
        ],
        &[],
    )?;
    wait_until(Duration::from_secs(10), || {
        Ok(squatter.stdout()?.contains("bound"))
    })?;
    world.ovl.create_network(
        &world.hosts[0].netns,
        SECRET,
        SECRET_SUBNET,
        &["--encrypted"],
    )?;
    wait_until(Duration::from_secs(10), || {
        Ok(world.agents[1]
            .log()?
            .contains("encrypted networks cannot be served"))
    })
    .context("host B's agent did not try to start WireGuard")?;
    // The report says why there is no device, and what to do; not that
    // there is no encrypted network.
    let text = world.run(1, &["stats", "--crypto"])?;
    ensure!(
        !text.contains("no encrypted network")
            && text.contains(&format!("{b}:{WG_PORT}"))
            && text.contains("--wireguard-port"),
        "host B's crypto report while its port is taken:\n{text}"
    );
    let report = crypto(&world, 1)?;
    ensure!(
        report["device"].is_null()
            && report["problem"]
                .as_str()
                .is_some_and(|p| p.contains("--wireguard-port")),
        "{report}"
    );
    // Host A's engine, whose port is free, runs, and says nothing of a
    // problem.
    wait_until(Duration::from_secs(10), || {
        Ok(crypto(&world, 0)?["device"].is_string())
    })?;
    let a = crypto(&world, 0)?;
    ensure!(a.get("problem").is_none(), "{a}");
    world.stop()
}

#[test]
fn clear_vxlan_of_the_encrypted_network_from_a_real_vtep_is_dropped_unencrypted() -> Result<()> {
    let lab = Lab::new("crypt-clear")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, s0_ip), (_, s1_ip)] = &nets.secret;
    let [(o0, o0_ip), (_, o1_ip)] = &nets.open;
    wait_for_ping(s0, *s1_ip)?;
    wait_for_ping(o0, *o1_ip)?;
    let secret_vni = vni_of(&world, SECRET)?;
    let before = world.counters(0, SECRET)?;
    let open_before = world.counters(0, OPEN)?;
    // Host B's own VTEP address, a VTEP of the encrypted network: echo
    // requests to host A's container in clear VXLAN, as anyone on the
    // path could forge them.
    let inner = format!(
        "Ether(src='{}', dst='{}') / IP(src='{s1_ip}', dst='{s0_ip}') / ICMP()",
        ovl_tests::mac_for(*s1_ip),
        ovl_tests::mac_for(*s0_ip)
    );
    world.send_vxlan_to_host_a(world.hosts[1].addr, 0, secret_vni, &inner, N)?;
    wait_until(Duration::from_secs(5), || {
        Ok(world.counters(0, SECRET)?.unencrypted >= before.unencrypted + N)
    })?;
    let after = world.counters(0, SECRET)?;
    ensure!(
        after.unencrypted - before.unencrypted == N && after.rx_packets == before.rx_packets,
        "{N} clear frames: before {before:?}, after {after:?}"
    );
    // The plain network beside it takes the same from the same VTEP.
    let inner = format!(
        "Ether(src='{}', dst='{}') / IP(src='{o1_ip}', dst='{o0_ip}') / ICMP()",
        ovl_tests::mac_for(*o1_ip),
        ovl_tests::mac_for(*o0_ip)
    );
    world.send_vxlan_to_host_a(world.hosts[1].addr, 0, vni_of(&world, OPEN)?, &inner, N)?;
    wait_until(Duration::from_secs(5), || {
        Ok(world.counters(0, OPEN)?.rx_packets >= open_before.rx_packets + N)
    })?;
    ensure!(world.counters(0, OPEN)?.drops() == open_before.drops());
    world.stop()
}

#[test]
fn a_restarted_agent_handshakes_with_its_peers_at_once_so_their_traffic_does_not_stall()
-> Result<()> {
    let lab = Lab::new("crypt-restart")?;
    let mut world = TwoHosts::start(&lab, "tc")?;
    let nets = two_networks(&lab, &world)?;
    let [(s0, _), (_, s1_ip)] = &nets.secret;
    wait_for_ping(s0, *s1_ip)?;
    // Host B's agent restarts (an upgrade, say): same key, same address.
    // Host A still holds a live session with B's earlier engine, which B
    // no longer has: what A seals with it B cannot open.
    world.terminate_agent(1)?;
    world.restart_agent(&lab, 1, &[])?;
    // B handshakes with A by itself, without any traffic of its own...
    wait_until(Duration::from_secs(10), || {
        Ok(peer(&world, 1, "host-a")?["last_handshake_seconds"].is_f64())
    })
    .with_context(|| format!("B: {:?}", crypto(&world, 1)))?;
    // ...so A's next packet goes on the new session and is answered.
    let r = ping(s0, *s1_ip, 1, &["-W", "2"])?;
    ensure!(
        r.all_received(),
        "{}\nA: {}\nB: {}",
        r.output,
        crypto(&world, 0)?,
        crypto(&world, 1)?
    );
    world.stop()
}
