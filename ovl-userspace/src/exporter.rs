//! Prometheus metrics of a running agent (`ovl attach --metrics ADDR:PORT`,
//! `GET /metrics`, text format 0.0.4): the kernel's per-VNI and node-wide
//! counters read at scrape time, endpoint counts, store health, agent info.

use std::sync::Arc;

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
};

/// Conventional port of ovl's metrics (unassigned in Prometheus's list of
/// default exporter ports).
pub const DEFAULT_PORT: u16 = 9474;

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<View>) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(view);
    if let Err(e) = axum::serve(listener, router).await {
        log::error!("metrics server stopped: {e}");
    }
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
    let store_up = register(
        &reg,
        IntGauge::new(
            "ovl_store_up",
            "Whether the last request to the store succeeded (1) or not (0).",
        )?,
    )?;
    let sync_age = register(
        &reg,
        Gauge::new(
            "ovl_store_last_sync_age_seconds",
            "Seconds since the agent last knew its view of the store current.",
        )?,
    )?;
    let collected = register(
        &reg,
        IntCounter::new(
            "ovl_endpoints_collected_total",
            "Local endpoints freed because their container's namespace was gone without a disconnect.",
        )?,
    )?;
    let conflicts = register(
        &reg,
        IntGauge::new(
            "ovl_address_conflicts",
            "Local endpoints whose address another endpoint took while this node was away; they cannot be reached until reconnected.",
        )?,
    )?;
    let info = gauge(
        &reg,
        "ovl_agent_info",
        "The running agent: version, node, underlay interface and decap mode.",
        &["version", "node", "underlay", "decap_mode"],
    )?;

    for row in network_rows(view, None).map_err(|e| anyhow::anyhow!("{e:?}"))? {
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
    for n in live.networks.values() {
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
    store_up.set(i64::from(live.store_reachable));
    conflicts.set(live.address_conflicts as i64);
    collected.inc_by(live.collected_endpoints);

    if let Some(age) = view.sync_age() {
        sync_age.set(age);
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
