//! Prometheus metrics of a running agent (`ovl attach --metrics ADDR:PORT`,
//! `GET /metrics`, text format 0.0.4): the kernel's per-VNI and node-wide
//! counters read at scrape time, endpoint counts, store health, agent info.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use ovl_common::DropReason;
use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};

use crate::{
    agent::view::View,
    api::{network_rows, underlay_of},
    http_server::{self, Bounds, OverLimit},
};

/// Conventional port of ovl's metrics (unassigned in Prometheus's list of
/// default exporter ports).
pub const DEFAULT_PORT: u16 = 9474;

/// Prometheus opens one connection per scraping server; more are closed
/// at once. Headers within 5 s; keep-alive between scrapes for 5 minutes.
const BOUNDS: Bounds = Bounds {
    max_connections: 32,
    over_limit: OverLimit::Close,
    header_timeout: Duration::from_secs(5),
    lifetime: Duration::from_secs(300),
};

/// Serves `/metrics` on `listener` until the task is dropped. The port is
/// often reachable from the network: a client that sends nothing, or
/// opens connections without end, must not hold the agent's descriptors
/// (shared with its DNS sockets and store connections).
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<View>) {
    // The bound address, not the one asked for: port 0 takes any free one,
    // which only this line tells.
    match listener.local_addr() {
        Ok(addr) => log::info!("Prometheus metrics on http://{addr}/metrics"),
        Err(e) => log::warn!("metrics server: its address is unknown: {e}"),
    }
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(view);
    http_server::serve(listener, router, BOUNDS, "metrics server").await
}

async fn metrics(State(view): State<Arc<View>>) -> impl IntoResponse {
    match render(&view) {
        Ok(text) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                TextEncoder::new().format_type().to_owned(),
            )],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(axum::http::header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("{e:#}\n"),
        ),
    }
}

fn register<C: Collector + Clone + 'static>(reg: &Registry, c: C) -> Result<C> {
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    register(reg, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    register(reg, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

/// The metrics of the agent behind `view`, in Prometheus text format. The
/// kernel counters are absolute: each scrape builds them afresh.
pub fn render(view: &View) -> Result<String> {
    let reg = Registry::new();
    let net = ["network", "vni"];
    let tx_p = counter(
        &reg,
        "ovl_network_tx_packets_total",
        "Frames encapsulated towards a remote VTEP.",
        &net,
    )?;
    let tx_b = counter(
        &reg,
        "ovl_network_tx_bytes_total",
        "Bytes (inner Ethernet frames) encapsulated towards a remote VTEP.",
        &net,
    )?;
    let rx_p = counter(
        &reg,
        "ovl_network_rx_packets_total",
        "Frames decapsulated and delivered to a local container.",
        &net,
    )?;
    let rx_b = counter(
        &reg,
        "ovl_network_rx_bytes_total",
        "Bytes (inner Ethernet frames) decapsulated and delivered to a local container.",
        &net,
    )?;
    let local = counter(
        &reg,
        "ovl_network_local_packets_total",
        "Frames switched between two containers of this node.",
        &net,
    )?;
    let arp = counter(
        &reg,
        "ovl_network_arp_replies_total",
        "ARP requests answered by proxy.",
        &net,
    )?;
    let egress = counter(
        &reg,
        "ovl_network_egress_packets_total",
        "Frames handed to the host's stack for an address outside the network (external egress).",
        &net,
    )?;
    let drops = counter(
        &reg,
        "ovl_network_drops_total",
        "Frames of the network dropped, by reason.",
        &["network", "vni", "reason"],
    )?;
    let eps = gauge(
        &reg,
        "ovl_network_endpoints",
        "Endpoints of the network in this node's maps, by location (local: a container on this node; remote: behind another VTEP).",
        &["network", "vni", "location"],
    )?;
    let dns_q = counter(
        &reg,
        "ovl_dns_queries_total",
        "DNS questions of the network's containers to ovl's resolver, by outcome (answered from ovl's names, forwarded upstream, failed with SERVFAIL/NOTIMP, rate_limited and dropped, malformed).",
        &["network", "vni", "outcome"],
    )?;
    let dns_ns = register(
        &reg,
        IntGauge::new(
            "ovl_dns_namespaces",
            "Container namespaces ovl's resolver listens in on this node.",
        )?,
    )?;
    let u_pkts = register(
        &reg,
        IntCounter::new(
            "ovl_underlay_packets_total",
            "Frames the underlay decap hook saw.",
        )?,
    )?;
    let u_pass = register(
        &reg,
        IntCounter::new(
            "ovl_underlay_passed_total",
            "Underlay frames that were not ovl's VXLAN and went on to the host stack.",
        )?,
    )?;
    let u_pmtu = register(
        &reg,
        IntCounter::new(
            "ovl_underlay_path_mtu_reports_total",
            "ICMP fragmentation-needed reports about ovl's VXLAN that set a remote VTEP's path MTU.",
        )?,
    )?;
    let u_drops = counter(
        &reg,
        "ovl_underlay_drops_total",
        "Underlay frames dropped that belong to no network (malformed VXLAN, unknown VNI), by reason.",
        &["reason"],
    )?;
    let underlay_up = register(
        &reg,
        IntGauge::new(
            "ovl_underlay_up",
            "Whether decapsulation is hooked on the underlay interface (1), or the interface is gone, unreadable or could not be hooked (0): then nothing crosses between this node and the others.",
        )?,
    )?;
    let store_up = register(
        &reg,
        IntGauge::new(
            "ovl_store_up",
            "Whether the last request to the store succeeded (1) or not (0).",
        )?,
    )?;
    let fail_overs = register(
        &reg,
        IntCounter::new(
            "ovl_store_failovers_total",
            "Times the agent left an etcd member that failed a request (unreachable, its connection broken, no leader) for the next member its store URL names.",
        )?,
    )?;
    let looked_up = register(
        &reg,
        IntCounter::new(
            "ovl_store_commits_looked_up_total",
            "Times a change of the agent's (a Docker or CNI attach, a dead node's freeing) met an etcd member that failed after the change was sent, and was looked up in etcd's history before being sent again.",
        )?,
    )?;
    let collected = register(
        &reg,
        IntCounter::new(
            "ovl_endpoints_collected_total",
            "Local endpoints freed because their container's namespace was gone without a disconnect, or the attach that registered them died before making their veth.",
        )?,
    )?;
    let conflicts = register(
        &reg,
        IntGauge::new(
            "ovl_address_conflicts",
            "Local endpoints whose address (or the MAC they were given) another endpoint took while this node was away; they cannot be reached until reconnected.",
        )?,
    )?;
    let info = gauge(
        &reg,
        "ovl_agent_info",
        "The running agent: version, node, underlay interface and decap mode.",
        &["version", "node", "underlay", "decap_mode"],
    )?;

    // Only the networks served here (with an endpoint, so counters, on
    // this node): every network of the cluster on every node would be a
    // series per network and node, nearly all zero.
    let rows = network_rows(view, None, true).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let served: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.vni).collect();
    for row in &rows {
        let vni = row.vni.to_string();
        let l = [row.network.as_str(), vni.as_str()];
        tx_p.with_label_values(&l).inc_by(row.tx_packets);
        tx_b.with_label_values(&l).inc_by(row.tx_bytes);
        rx_p.with_label_values(&l).inc_by(row.rx_packets);
        rx_b.with_label_values(&l).inc_by(row.rx_bytes);
        local.with_label_values(&l).inc_by(row.local_packets);
        arp.with_label_values(&l).inc_by(row.arp_replies);
        egress.with_label_values(&l).inc_by(row.egress_packets);
        for reason in DropReason::ALL {
            let n = row.drops.get(reason.name()).copied().unwrap_or(0);
            drops
                .with_label_values(&[row.network.as_str(), vni.as_str(), reason.name()])
                .inc_by(n);
        }
        let d = &row.dns;
        for (outcome, n) in [
            ("answered", d.answered),
            ("forwarded", d.forwarded),
            ("failed", d.failed),
            ("rate_limited", d.rate_limited),
            ("malformed", d.malformed),
        ] {
            dns_q
                .with_label_values(&[row.network.as_str(), vni.as_str(), outcome])
                .inc_by(n);
        }
    }
    dns_ns.set(view.dns.namespaces() as i64);
    let live = view.live();
    for n in live.networks.values().filter(|n| served.contains(&n.vni)) {
        let vni = n.vni.to_string();
        eps.with_label_values(&[n.name.as_str(), vni.as_str(), "local"])
            .set(n.local_endpoints as i64);
        eps.with_label_values(&[n.name.as_str(), vni.as_str(), "remote"])
            .set(n.remote_endpoints as i64);
    }
    let underlay = underlay_of(view)?;
    u_pkts.inc_by(underlay.underlay_packets);
    u_pass.inc_by(underlay.underlay_passed);
    u_pmtu.inc_by(underlay.path_mtu_reports);
    for reason in DropReason::ALL {
        let n = underlay.drops.get(reason.name()).copied().unwrap_or(0);
        u_drops.with_label_values(&[reason.name()]).inc_by(n);
    }
    underlay_up.set(i64::from(live.underlay_problem.is_none()));
    store_up.set(i64::from(live.store_reachable));
    fail_overs.inc_by(crate::store::etcd_fail_overs());
    looked_up.inc_by(crate::store::etcd_commits_looked_up());
    conflicts.set(live.address_conflicts as i64);
    collected.inc_by(live.collected_endpoints);

    // Absent until the agent has synced once: 0 would read "just synced"
    // through a whole outage that began before the agent started (alert
    // on `absent(ovl_store_last_sync_age_seconds)` too).
    if let Some(age) = view.sync_age() {
        register(
            &reg,
            Gauge::new(
                "ovl_store_last_sync_age_seconds",
                "Seconds since the agent last knew its view of the store current; absent until it has been once.",
            )?,
        )?
        .set(age);
    }
    let id = &view.identity;
    info.with_label_values(&[
        id.version.as_str(),
        id.node.as_str(),
        id.iface.as_str(),
        live.mode.as_str(),
    ])
    .set(1);

    crate::crypto::metrics::export(&reg)?;

    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&reg.gather(), &mut out)
        .context("encode metrics")?;
    String::from_utf8(out).context("metrics are UTF-8")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (view, _kicks) = View::unattached();
        tokio::spawn(serve(listener, view));
        addr
    }

    /// Reads until the server closes the connection; what it sent.
    async fn until_closed(c: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut got)).await;
        got
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_is_disconnected() {
        let addr = server().await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let t0 = Instant::now();
        until_closed(&mut slow).await;
        let took = t0.elapsed();
        assert!(
            took >= BOUNDS.header_timeout - Duration::from_millis(500)
                && took < BOUNDS.header_timeout + Duration::from_secs(3),
            "closed after {took:?}"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_the_rest_served() {
        let addr = server().await;
        let mut held = Vec::new();
        for _ in 0..BOUNDS.max_connections {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order: the server has taken every slot once the
        // next connection is closed without an answer.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        assert!(until_closed(&mut extra).await.is_empty());
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // A slot freed is served again: a request gets an HTTP answer (500
        // here: there are no pinned maps to read).
        drop(held.pop());
        let mut c = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut first = [0u8; 12];
                if c.read_exact(&mut first).await.is_ok() {
                    break (c, first);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no slot came free");
        assert_eq!(&c.1, b"HTTP/1.1 500");
        drop(c.0.shutdown().await);
    }
}
