//! ovl as a CNI plugin: podman (CNI backend) on two hosts whose containers
//! talk through ovl, the spec's operations called directly as a runtime
//! calls them, a chain with the reference `tuning` plugin, and every bad
//! input answered with the spec's error result and nothing left behind.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    CniPlugin, Host, Lab, Netns, Ovl, Podman, REFERENCE_PLUGIN_DIR, TwoHosts, ping, wait_until,
};
use serde_json::{Value, json};

const NETWORK: &str = "uber-net";
const SUBNET: &str = "198.18.0.0/24";
const NODE: &str = "host-a";
const IMAGE: &str = "localhost/busybox:ovl";

/// `ovl cni install` into a directory of the lab; returns the plugin.
fn install_plugin(lab: &Lab, ovl: &Ovl, host: &Netns) -> Result<PathBuf> {
    let dir = lab.tempdir().join("cni-bin");
    let dir_text = dir.display().to_string();
    ovl.run(host, NODE, &["cni", "install", "--dir", &dir_text])?;
    let plugin = dir.join("ovl");
    ensure!(
        plugin.is_file(),
        "ovl cni install left no {}",
        plugin.display()
    );
    Ok(plugin)
}

/// `ovl cni conflist NETWORK` run on `host` as `node`.
fn conflist(ovl: &Ovl, host: &Netns, node: &str) -> Result<Value> {
    let text = ovl.run(host, node, &["cni", "conflist", NETWORK])?;
    serde_json::from_str(&text).with_context(|| format!("conflist is not JSON: {text}"))
}

/// The request configuration a runtime derives from a conflist's first
/// plugin: the plugin object plus `name` and the chosen `cniVersion`.
fn request(conflist: &Value, version: &str) -> Value {
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = json!(version);
    conf
}

fn with(conf: &Value, key: &str, value: Value) -> Value {
    let mut c = conf.clone();
    c[key] = value;
    c
}

/// One host with an agent, network uber-net and the installed plugin.
struct OneHost {
    ovl: Ovl,
    host: Host,
    agent: Option<ovl_tests::Agent>,
    plugin: CniPlugin,
    conflist: Value,
}

impl OneHost {
    fn start(lab: &Lab, with_agent: bool) -> Result<OneHost> {
        let ovl = Ovl::new(lab)?;
        let (_router, mut hosts) = lab.routed_hosts(1)?;
        let host = hosts.remove(0);
        let agent = if with_agent {
            Some(ovl.attach(lab, &host, NODE, "auto")?)
        } else {
            None
        };
        ovl.create_network(&host.netns, NETWORK, SUBNET, &[])?;
        let plugin_path = install_plugin(lab, &ovl, &host.netns)?;
        let conflist = conflist(&ovl, &host.netns, NODE)?;
        Ok(OneHost {
            plugin: CniPlugin::new(&plugin_path, &host.netns),
            ovl,
            host,
            agent,
            conflist,
        })
    }

    fn conf(&self, version: &str) -> Value {
        request(&self.conflist, version)
    }

    /// The endpoints of `network` in the store.
    fn endpoints(&self, network: &str) -> Result<Vec<Value>> {
        let net = self.ovl.inspect(&self.host.netns, network)?;
        Ok(net["endpoints"].as_array().cloned().unwrap_or_default())
    }

    /// Link names in the host's namespace.
    fn host_links(&self) -> Result<Vec<String>> {
        link_names(&self.host.netns)
    }
}

fn link_names(ns: &Netns) -> Result<Vec<String>> {
    let out = ns.ip(&["-o", "link", "show"])?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn netns_path(ns: &Netns) -> String {
    format!("/run/netns/{}", ns.name())
}

/// Checks an ADD result against the spec's shape (section 5) and against
/// what exists: the container interface, its address and MAC, the host veth.
fn assert_spec_result(res: &Value, version: &str, sandbox: &str, ifname: &str) -> Result<()> {
    let obj = res.as_object().context("result is not an object")?;
    for key in obj.keys() {
        ensure!(
            ["cniVersion", "interfaces", "ips", "routes", "dns"].contains(&key.as_str()),
            "unexpected key {key} in {res}"
        );
    }
    ensure!(res["cniVersion"] == version, "cniVersion in {res}");
    let ifaces = res["interfaces"].as_array().context("interfaces")?;
    ensure!(ifaces.len() == 2, "host and container interface in {res}");
    for i in ifaces {
        ensure!(i["name"].is_string(), "interface name in {i}");
        let mac = i["mac"].as_str().context("mac")?;
        ensure!(mac.len() == 17 && mac.split(':').count() == 6, "mac {mac}");
        // `mtu` came with spec 1.1.0.
        let mtu = if version == "1.1.0" {
            json!(1450)
        } else {
            Value::Null
        };
        ensure!(i["mtu"] == mtu, "mtu in {i}");
    }
    ensure!(
        ifaces[0].get("sandbox").is_none(),
        "host veth has no sandbox"
    );
    ensure!(
        ifaces[1]["sandbox"] == sandbox,
        "container sandbox in {res}"
    );
    ensure!(ifaces[1]["name"] == ifname, "container ifname in {res}");
    let ips = res["ips"].as_array().context("ips")?;
    ensure!(ips.len() == 1, "one address in {res}");
    let idx = ips[0]["interface"].as_u64().context("ips[0].interface")? as usize;
    ensure!(idx == 1 && idx < ifaces.len(), "interface index in {res}");
    let addr = ips[0]["address"].as_str().context("address")?;
    ensure!(addr.ends_with("/24"), "CIDR address {addr}");
    let legacy = version.starts_with("0.");
    ensure!(
        ips[0].get("version").is_some() == legacy,
        "ips[].version only before 1.0.0: {res}"
    );
    let routes = res["routes"].as_array().context("routes")?;
    ensure!(
        routes.iter().any(|r| r["dst"] == SUBNET),
        "route to the subnet in {res}"
    );
    Ok(())
}

#[test]
fn add_check_del_gc_status_and_version_follow_the_spec() -> Result<()> {
    let lab = Lab::new("cni-spec")?;
    let mut w = OneHost::start(&lab, true)?;
    let c1 = lab.container("c1")?;
    let sandbox = netns_path(&c1);

    // VERSION: every version ovl speaks, under the one asked about.
    let v = w
        .plugin
        .call("VERSION", &[], r#"{"cniVersion":"1.0.0"}"#)?
        .ok()?;
    ensure!(v["cniVersion"] == "1.0.0", "{v}");
    ensure!(
        v["supportedVersions"] == json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "{v}"
    );

    // ADD: a result of the spec's shape describing what now exists; the
    // configuration's dns, when it has one, is the result's.
    let conf = with(
        &w.conf("1.1.0"),
        "dns",
        json!({"nameservers": ["198.18.0.1"], "search": ["ovl"]}),
    );
    let env = CniPlugin::attachment_env("ctr-1", &sandbox, "eth0");
    let res = w.plugin.call("ADD", &env, &conf.to_string())?.ok()?;
    assert_spec_result(&res, "1.1.0", &sandbox, "eth0")?;
    ensure!(res["ips"][0]["address"] == "198.18.0.2/24", "{res}");
    ensure!(
        res["dns"] == json!({"nameservers": ["198.18.0.1"], "search": ["ovl"]}),
        "{res}"
    );
    let mac = res["interfaces"][1]["mac"].as_str().context("mac")?;
    let shown =
        String::from_utf8_lossy(&c1.ip(&["-o", "addr", "show", "eth0"])?.stdout).into_owned();
    ensure!(
        shown.contains("198.18.0.2/24"),
        "eth0 in the container: {shown}"
    );
    let link =
        String::from_utf8_lossy(&c1.ip(&["-o", "link", "show", "eth0"])?.stdout).into_owned();
    ensure!(link.contains(mac) && link.contains("mtu 1450"), "{link}");
    let host_if = res["interfaces"][0]["name"].as_str().context("host if")?;
    let host_link =
        String::from_utf8_lossy(&w.host.netns.ip(&["-o", "link", "show", host_if])?.stdout)
            .into_owned();
    let host_mac = res["interfaces"][0]["mac"].as_str().context("host mac")?;
    ensure!(host_link.contains(host_mac), "{host_link}");
    let eps = w.endpoints(NETWORK)?;
    ensure!(
        eps.len() == 1 && eps[0]["owner"] == "cni:ctr-1/eth0" && eps[0]["name"] == "ctr-1",
        "{eps:?}"
    );
    // The interface works: a container `ovl connect`ed on the same host
    // answers through the agent's data path.
    let peer = lab.container("peer")?;
    let peer_ip = w.ovl.connect(&w.host, NODE, NETWORK, &peer, &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(ovl_tests::ping(&c1, peer_ip, 1, &["-W", "1"])?.all_received())
    })?;

    // CHECK passes right after ADD, and fails once the interface is gone.
    let check_conf = with(&conf, "prevResult", res.clone());
    let ok = w.plugin.call("CHECK", &env, &check_conf.to_string())?;
    ensure!(ok.status.success() && ok.stdout.trim().is_empty(), "{ok:?}");
    // With the host end down the container is cut off (NO-CARRIER), and
    // CHECK says so; a changed MTU is named as a number.
    w.host.netns.ip(&["link", "set", host_if, "down"])?;
    ensure!(
        !ovl_tests::ping(&c1, peer_ip, 1, &["-W", "1"])?.all_received(),
        "the container still reaches {peer_ip} with {host_if} down"
    );
    let down = w.plugin.call("CHECK", &env, &check_conf.to_string())?;
    ensure!(down.error_code()? == 110, "{down:?}");
    let details = down.json()?["details"].as_str().unwrap_or("").to_owned();
    ensure!(
        details.contains(host_if) && details.contains("down"),
        "{down:?}"
    );
    w.host.netns.ip(&["link", "set", host_if, "up"])?;
    c1.ip(&["link", "set", "eth0", "mtu", "1400"])?;
    let mtu = w.plugin.call("CHECK", &env, &check_conf.to_string())?;
    ensure!(mtu.error_code()? == 110, "{mtu:?}");
    let details = mtu.json()?["details"].as_str().unwrap_or("").to_owned();
    ensure!(
        details.contains("MTU 1400") && !details.contains("Some("),
        "{mtu:?}"
    );
    c1.ip(&["link", "set", "eth0", "mtu", "1450"])?;
    let again = w.plugin.call("CHECK", &env, &check_conf.to_string())?;
    ensure!(again.status.success(), "{again:?}");
    c1.ip(&["link", "del", "eth0"])?;
    let bad = w.plugin.call("CHECK", &env, &check_conf.to_string())?;
    ensure!(bad.error_code()? == 110, "{bad:?}");
    ensure!(
        bad.json()?["details"]
            .as_str()
            .unwrap_or("")
            .contains("eth0"),
        "{bad:?}"
    );

    // DEL twice: both succeed; the address and the veth are gone.
    for _ in 0..2 {
        let out = w.plugin.call("DEL", &env, &check_conf.to_string())?;
        ensure!(
            out.status.success() && out.stdout.trim().is_empty(),
            "{out:?}"
        );
    }
    let no_netns = vec![("CNI_CONTAINERID", "ctr-1"), ("CNI_IFNAME", "eth0")];
    w.plugin.call("DEL", &no_netns, &conf.to_string())?.ok()?;
    let left: Vec<Value> = w
        .endpoints(NETWORK)?
        .into_iter()
        .filter(|e| e["owner"].is_string())
        .collect();
    ensure!(left.is_empty(), "DEL left {left:?}");
    ensure!(!w.host_links()?.contains(&host_if.to_owned()), "veth left");

    // An older spec version gets its own layout; an address asked for in
    // CNI_ARGS (the `IP=` convention) is the one given, and the endpoint is
    // named after the pod.
    let c2 = lab.container("c2")?;
    let s2 = netns_path(&c2);
    let mut env2 = CniPlugin::attachment_env("ctr-2", &s2, "net1");
    env2.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;IP=198.18.0.50;K8S_POD_NAME=postgres-0",
    ));
    let legacy = w
        .plugin
        .call("ADD", &env2, &w.conf("0.4.0").to_string())?
        .ok()?;
    assert_spec_result(&legacy, "0.4.0", &s2, "net1")?;
    ensure!(legacy["ips"][0]["address"] == "198.18.0.50/24", "{legacy}");
    // A configuration without dns gets ovl's resolver in the result, with
    // the host's options but its own ndots.
    let options: Vec<&str> = legacy["dns"]["options"]
        .as_array()
        .context("no dns options")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        legacy["dns"]["nameservers"] == json!(["127.0.0.11"])
            && options.last() == Some(&"ndots:0")
            && options.iter().filter(|o| o.starts_with("ndots:")).count() == 1,
        "{legacy}"
    );

    // A pod of the same name (`postgres-0` of another Kubernetes namespace,
    // another host's podman `db`) is attached all the same, named by its
    // short container ID: names are unique per ovl network.
    let c3 = lab.container("c3")?;
    let s3 = netns_path(&c3);
    let mut env3 = CniPlugin::attachment_env("ctr-leak", &s3, "eth0");
    env3.push(("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=postgres-0"));
    let leaked = w.plugin.call("ADD", &env3, &conf.to_string())?.ok()?;
    let eps = w.endpoints(NETWORK)?;
    let name_of = |owner: &str| {
        eps.iter()
            .find(|e| e["owner"] == owner)
            .map(|e| e["name"].clone())
    };
    ensure!(
        name_of("cni:ctr-2/net1") == Some(json!("postgres-0"))
            && name_of("cni:ctr-leak/eth0") == Some(json!("ctr-leak")),
        "{eps:?}"
    );

    // GC releases the attachment the runtime no longer lists, and only it.
    let leaked_if = leaked["interfaces"][0]["name"]
        .as_str()
        .context("if")?
        .to_owned();
    let gc = with(
        &conf,
        "cni.dev/valid-attachments",
        json!([{"containerID": "ctr-2", "ifname": "net1"}]),
    );
    let out = w
        .plugin
        .call("GC", &[("CNI_PATH", REFERENCE_PLUGIN_DIR)], &gc.to_string())?;
    ensure!(out.status.success(), "{out:?}");
    let owners: Vec<String> = w
        .endpoints(NETWORK)?
        .iter()
        .map(|e| e["owner"].as_str().unwrap_or("-").to_owned())
        .collect();
    ensure!(
        owners.len() == 2,
        "GC kept ctr-2 and the ovl connect one: {owners:?}"
    );
    ensure!(owners.contains(&"cni:ctr-2/net1".to_owned()), "{owners:?}");
    ensure!(!w.host_links()?.contains(&leaked_if), "GC left the veth");

    // STATUS: ready while the agent runs; 50 once it stopped (its pinned
    // data path still forwards for the containers it knew).
    let status = w.conf("1.1.0");
    w.plugin.call("STATUS", &[], &status.to_string())?.ok()?;
    let too_old = w.plugin.call("STATUS", &[], &w.conf("1.0.0").to_string())?;
    ensure!(too_old.error_code()? == 1, "{too_old:?}");
    w.agent.take().context("agent")?.stop()?;
    let down = w.plugin.call("STATUS", &[], &status.to_string())?;
    ensure!(down.error_code()? == 50, "{down:?}");
    ensure!(
        down.json()?["details"]
            .as_str()
            .unwrap_or("")
            .contains("no ovl agent"),
        "{down:?}"
    );
    Ok(())
}

#[test]
fn tuning_chained_after_ovl_gets_its_result_and_passes_it_on() -> Result<()> {
    let lab = Lab::new("cni-chain")?;
    let w = OneHost::start(&lab, true)?;
    let c = lab.container("c")?;
    let sandbox = netns_path(&c);
    let env = CniPlugin::attachment_env("ctr-chain", &sandbox, "eth0");
    let tuning = CniPlugin::new(
        &Path::new(REFERENCE_PLUGIN_DIR).join("tuning"),
        &w.host.netns,
    );
    // Debian's reference plugins speak up to 1.0.0.
    let ovl_conf = w.conf("1.0.0");
    let tuning_conf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "tuning",
        "sysctl": {"net.ipv4.conf.eth0.log_martians": "1"},
    });

    let first = w.plugin.call("ADD", &env, &ovl_conf.to_string())?.ok()?;
    let chained = with(&tuning_conf, "prevResult", first.clone());
    let last = tuning.call("ADD", &env, &chained.to_string())?.ok()?;
    // tuning parsed ovl's result with the reference library and passed it
    // on unchanged (the library writes an empty `dns` where ovl omits it):
    // ovl's result is what the spec's types describe.
    let mut passed_on = last.clone();
    if passed_on["dns"] == json!({}) {
        passed_on.as_object_mut().context("result")?.remove("dns");
    }
    ensure!(
        passed_on == first,
        "tuning changed the result:\n{first}\n{last}"
    );
    let set = c.exec(&["sysctl", "-n", "net.ipv4.conf.eth0.log_martians"])?;
    ensure!(
        String::from_utf8_lossy(&set.stdout).trim() == "1",
        "tuning did not reach ovl's interface"
    );

    // CHECK and DEL of the chain, in the runtime's order.
    let ovl_check = with(&ovl_conf, "prevResult", last.clone());
    let out = w.plugin.call("CHECK", &env, &ovl_check.to_string())?;
    ensure!(out.status.success(), "{out:?}");
    let out = tuning.call(
        "CHECK",
        &env,
        &with(&tuning_conf, "prevResult", last.clone()).to_string(),
    )?;
    ensure!(out.status.success(), "{out:?}");
    let out = tuning.call(
        "DEL",
        &env,
        &with(&tuning_conf, "prevResult", last.clone()).to_string(),
    )?;
    ensure!(out.status.success(), "{out:?}");
    w.plugin.call("DEL", &env, &ovl_check.to_string())?.ok()?;
    ensure!(w.endpoints(NETWORK)?.is_empty(), "DEL left an endpoint");
    Ok(())
}

#[test]
fn bad_input_gets_spec_errors_and_leaves_nothing_behind() -> Result<()> {
    let lab = Lab::new("cni-bad")?;
    let w = OneHost::start(&lab, true)?;
    // A /29 has five addresses for containers: fill them.
    w.ovl
        .create_network(&w.host.netns, "tiny", "198.18.9.0/29", &[])?;
    for last in 2..=6 {
        let ip = format!("198.18.9.{last}");
        w.ovl.run(
            &w.host.netns,
            NODE,
            &["endpoint", "add", "tiny", &ip, "--vtep", "192.0.2.99"],
        )?;
    }
    let c = lab.container("c")?;
    let sandbox = netns_path(&c);
    let state_file = lab.tempdir().join("store/state.json");
    let state_before = std::fs::read(&state_file)?;
    let host_before = w.host_links()?;
    let container_before = link_names(&c)?;

    let conf = w.conf("1.0.0");
    // A node whose agent does not run: its socket answers nothing.
    let no_agent_socket = lab.tempdir().join("no-agent.sock");
    let no_agent = with(&conf, "apiSocket", json!(no_agent_socket));
    let env = CniPlugin::attachment_env("ctr-bad", &sandbox, "eth0");
    let without = |name: &str| -> Vec<(&str, &str)> {
        env.iter().copied().filter(|(k, _)| *k != name).collect()
    };
    let gone_netns = format!("/run/netns/{}-gone", lab.prefix());
    let elsewhere = CniPlugin::attachment_env("ctr-bad", &gone_netns, "eth0");
    /// (what, command, environment, stdin, code)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, String, u64);
    let cases: Vec<Case> = vec![
        (
            "bad JSON",
            "ADD",
            env.clone(),
            "{\"cniVersion\": ".into(),
            6,
        ),
        (
            "unknown cniVersion",
            "ADD",
            env.clone(),
            with(&conf, "cniVersion", json!("9.9.9")).to_string(),
            1,
        ),
        (
            "missing CNI_NETNS",
            "ADD",
            without("CNI_NETNS"),
            conf.to_string(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            "ADD",
            without("CNI_CONTAINERID"),
            conf.to_string(),
            4,
        ),
        ("netns path missing", "ADD", elsewhere, conf.to_string(), 3),
        (
            "network missing",
            "ADD",
            env.clone(),
            with(&conf, "network", json!("no-such-net")).to_string(),
            7,
        ),
        (
            "exhausted subnet",
            "ADD",
            env.clone(),
            with(&conf, "network", json!("tiny")).to_string(),
            100,
        ),
        (
            "store unreachable",
            "ADD",
            env.clone(),
            with(&conf, "store", json!("etcd://127.0.0.1:9")).to_string(),
            11,
        ),
        (
            "misspelt key",
            "ADD",
            env.clone(),
            with(&conf, "stroe", json!("etcd://127.0.0.1:2379")).to_string(),
            2,
        ),
        (
            "ipam section",
            "ADD",
            env.clone(),
            with(&conf, "ipam", json!({"type": "host-local"})).to_string(),
            2,
        ),
        ("unknown command", "FROB", env.clone(), conf.to_string(), 4),
        (
            "CHECK before 0.4.0",
            "CHECK",
            env.clone(),
            with(&conf, "cniVersion", json!("0.3.1")).to_string(),
            1,
        ),
        ("GC before 1.1.0", "GC", vec![], conf.to_string(), 1),
        (
            "malformed prevResult",
            "ADD",
            env.clone(),
            with(&conf, "prevResult", json!({"ips": 3})).to_string(),
            6,
        ),
        ("no agent", "ADD", env.clone(), no_agent.to_string(), 11),
    ];
    for (what, command, vars, stdin, code) in &cases {
        let out = w.plugin.call(command, vars, stdin)?;
        let got = out.error_code().with_context(|| what.to_string())?;
        ensure!(got == *code, "{what}: code {got}, expected {code}: {out:?}");
        let err = out.json()?;
        for key in err.as_object().context("error object")?.keys() {
            ensure!(
                ["cniVersion", "code", "msg", "details"].contains(&key.as_str()),
                "{what}: unexpected key {key}"
            );
        }
        ensure!(err["cniVersion"].is_string(), "{what}: {err}");
        ensure!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty())
                && err["details"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {err}"
        );
        if *what == "no agent" {
            let details = err["details"].as_str().unwrap_or("");
            ensure!(
                details.contains("`ovl attach")
                    && details.contains(&no_agent_socket.display().to_string()),
                "{what}: {err}"
            );
        }
    }
    ensure!(
        std::fs::read(&state_file)? == state_before,
        "the store changed"
    );
    ensure!(w.host_links()? == host_before, "links left on the host");
    ensure!(
        link_names(&c)? == container_before,
        "links left in the container"
    );

    // An interface of that name in the container already: refused (101)
    // before anything is registered. (A veth pair: this kernel has no
    // dummy driver.)
    c.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    let out = w.plugin.call("ADD", &env, &conf.to_string())?;
    ensure!(out.error_code()? == 101, "{out:?}");
    ensure!(
        std::fs::read(&state_file)? == state_before,
        "the store changed"
    );
    ensure!(w.host_links()? == host_before, "links left on the host");

    // No agent and no pinned data path on this node: STATUS says 51.
    let empty_pins = lab.tempdir().join("no-pins");
    std::fs::create_dir_all(&empty_pins)?;
    let unattached = with(
        &with(&w.conf("1.1.0"), "apiSocket", json!(no_agent_socket)),
        "pinRoot",
        json!(empty_pins),
    );
    let status = w.plugin.call("STATUS", &[], &unattached.to_string())?;
    ensure!(status.error_code()? == 51, "{status:?}");

    // ADD twice for one attachment: the second is refused, the first stays.
    let c2 = lab.container("c2")?;
    let s2 = netns_path(&c2);
    let env2 = CniPlugin::attachment_env("ctr-twice", &s2, "eth0");
    w.plugin.call("ADD", &env2, &conf.to_string())?.ok()?;
    let state_once = std::fs::read(&state_file)?;
    let links_once = w.host_links()?;
    let out = w.plugin.call("ADD", &env2, &conf.to_string())?;
    ensure!(out.error_code()? == 101, "{out:?}");
    ensure!(
        std::fs::read(&state_file)? == state_once,
        "the store changed"
    );
    ensure!(w.host_links()? == links_once, "links changed on the host");

    // The same container under another interface name (ovl gives a
    // container one address per network): 103. An address that is taken,
    // asked for through the `ips` capability: 102. Nothing changes.
    let env3 = CniPlugin::attachment_env("ctr-twice", &s2, "net1");
    let out = w.plugin.call("ADD", &env3, &conf.to_string())?;
    ensure!(out.error_code()? == 103, "{out:?}");
    let c3 = lab.container("c3")?;
    let s3 = netns_path(&c3);
    let env4 = CniPlugin::attachment_env("ctr-taken", &s3, "eth0");
    let taken = with(&conf, "runtimeConfig", json!({"ips": ["198.18.0.2/24"]}));
    let out = w.plugin.call("ADD", &env4, &taken.to_string())?;
    ensure!(out.error_code()? == 102, "{out:?}");
    ensure!(
        std::fs::read(&state_file)? == state_once,
        "the store changed"
    );
    ensure!(w.host_links()? == links_once, "links changed on the host");
    ensure!(link_names(&c3)? == ["lo"], "links left in the container");
    Ok(())
}

/// The address podman reports for `container` on uber-net.
fn podman_ip(podman: &Podman, container: &str) -> Result<Ipv4Addr> {
    let text = podman.podman(&[
        "inspect",
        "--format",
        "{{(index .NetworkSettings.Networks \"uber-net\").IPAddress}}",
        container,
    ])?;
    text.parse()
        .with_context(|| format!("podman reports address {text:?} for {container}"))
}

/// Sends `text` over TCP from `from` to `to_ip` and checks `to` received it.
fn tcp_exchange(
    from: (&Podman, &str),
    to: (&Podman, &str),
    to_ip: Ipv4Addr,
    text: &str,
) -> Result<()> {
    let (server, server_name) = to;
    server.podman(&[
        "exec",
        "-d",
        server_name,
        "sh",
        "-c",
        "nc -l -p 7000 > /tmp/got",
    ])?;
    let (client, client_name) = from;
    // The listener's stdin is at EOF, so it half-closes at once; busybox nc
    // exits 0 on the server's FIN if that comes before a pipe's data (a
    // delayed `echo` under load sent nothing). A file is always readable,
    // so the text goes out in nc's first poll round.
    let send = format!("echo {text} > /tmp/said && nc -w 3 {to_ip} 7000 < /tmp/said");
    // The listener starts asynchronously: retry while it is not there yet.
    let mut said = String::new();
    wait_until(Duration::from_secs(20), || {
        let out = client.run_unchecked(&["exec", client_name, "sh", "-c", &send])?;
        said = format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.status.success())
    })
    .with_context(|| format!("{client_name} never reached {to_ip}:7000 ({said})"))?;
    // Bounds, not timings: podman exec takes seconds on a loaded machine.
    let mut got = String::new();
    wait_until(Duration::from_secs(15), || {
        got = server.exec(server_name, &["cat", "/tmp/got"])?;
        Ok(got.trim() == text)
    })
    .with_context(|| {
        format!("{server_name} received {got:?} instead of {text:?}; the client said {said}")
    })
}

#[test]
fn podman_containers_on_two_hosts_talk_through_ovl() -> Result<()> {
    let lab = Lab::new("cni-podman")?;
    let cluster = TwoHosts::start(&lab, "auto")?;
    cluster.run(0, &["network", "create", NETWORK, "--subnet", SUBNET])?;
    let plugin_dir = install_plugin(&lab, &cluster.ovl, &cluster.hosts[0].netns)?
        .parent()
        .context("plugin dir")?
        .to_owned();
    let mut podmans = Vec::new();
    for (i, host) in cluster.hosts.iter().enumerate() {
        let podman = Podman::new(&lab, &host.netns, &plugin_dir)?;
        // Each host's list names its own node; tuning after ovl shows the
        // chain works under a real runtime.
        let mut list = conflist(&cluster.ovl, &host.netns, TwoHosts::NODES[i])?;
        list["plugins"]
            .as_array_mut()
            .context("plugins")?
            .push(json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.log_martians": "1"}}));
        // The list as `ovl cni conflist` wrote it: podman 4.3's libcni
        // takes its cniVersion (1.0.0) and the reference tuning plugin too.
        podman.add_network(NETWORK, &list.to_string())?;
        podman.import_busybox(IMAGE)?;
        podmans.push(podman);
    }
    let (pa, pb) = (&podmans[0], &podmans[1]);
    let a = pa.run("web-a", NETWORK, IMAGE, &["sleep", "600"])?;
    let _b = pb.run("web-b", NETWORK, IMAGE, &["sleep", "600"])?;
    let ip_a = podman_ip(pa, "web-a")?;
    let ip_b = podman_ip(pb, "web-b")?;
    ensure!(ip_a != ip_b, "both got {ip_a}");
    let owner_a = format!("cni:{}/eth0", a.id);
    let net = cluster.inspect(0, NETWORK)?;
    let ep_a = net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .find(|e| e["owner"] == owner_a.as_str())
        .with_context(|| format!("no endpoint owned by {owner_a}: {net}"))?
        .clone();
    // Named after the container (podman passes K8S_POD_NAME).
    ensure!(
        ep_a["ip"] == ip_a.to_string()
            && ep_a["location"]["node"] == "host-a"
            && ep_a["name"] == "web-a",
        "{ep_a}"
    );
    let sysctl = pa.exec(
        "web-a",
        &["sysctl", "-n", "net.ipv4.conf.eth0.log_martians"],
    )?;
    ensure!(sysctl.trim() == "1", "tuning did not run after ovl");
    // The result named ovl's resolver: podman wrote it into the
    // container's resolv.conf, and containers find each other by name
    // across hosts.
    let resolv = pa.exec("web-a", &["cat", "/etc/resolv.conf"])?;
    ensure!(
        resolv.lines().next() == Some("nameserver 127.0.0.11"),
        "web-a's resolv.conf:\n{resolv}"
    );
    let mut answer = String::new();
    wait_until(Duration::from_secs(5), || {
        let out = pa.run_unchecked(&["exec", "web-a", "nslookup", "web-b"])?;
        answer = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(answer.contains(&format!("Address: {ip_b}")))
    })
    .with_context(|| format!("web-b never resolved in web-a:\n{answer}"))?;

    let before = [cluster.counters(0, NETWORK)?, cluster.counters(1, NETWORK)?];
    for (p, name, dst) in [(pa, "web-a", ip_b), (pb, "web-b", ip_a)] {
        let dst = dst.to_string();
        wait_until(Duration::from_secs(10), || {
            Ok(
                p.run_unchecked(&["exec", name, "ping", "-c", "1", "-W", "1", &dst])?
                    .status
                    .success(),
            )
        })?;
        p.exec(name, &["ping", "-c", "3", "-W", "2", &dst])?;
    }
    tcp_exchange((pa, "web-a"), (pb, "web-b"), ip_b, "hello-from-a")?;
    tcp_exchange((pb, "web-b"), (pa, "web-a"), ip_a, "hello-from-b")?;
    for (i, b) in before.iter().enumerate() {
        let after = cluster.counters(i, NETWORK)?;
        ensure!(
            after.tx_packets >= b.tx_packets + 8 && after.rx_packets >= b.rx_packets + 8,
            "host {i}: counters did not move with the traffic: {b:?} -> {after:?}"
        );
    }

    // `podman rm` frees the address: gone from the store, the veth gone,
    // and the next container gets it again.
    let host_if = ep_a["location"]["host_ifname"]
        .as_str()
        .context("host_ifname")?
        .to_owned();
    pa.rm("web-a")?;
    let net = cluster.inspect(0, NETWORK)?;
    ensure!(
        !net["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .any(|e| e["ip"] == ip_a.to_string()),
        "podman rm left {ip_a} held: {net}"
    );
    ensure!(
        !link_names(&cluster.hosts[0].netns)?.contains(&host_if),
        "podman rm left {host_if}"
    );
    pa.run("web-a2", NETWORK, IMAGE, &["sleep", "600"])?;
    ensure!(
        podman_ip(pa, "web-a2")? == ip_a,
        "the freed address was not reused"
    );
    drop(podmans);
    cluster.stop()
}

#[test]
fn a_conflist_written_without_node_flags_names_this_host_and_keeps_the_store_options() -> Result<()>
{
    let ovl = ovl_tests::ovl_binary()?;
    let ovl = ovl.display().to_string();
    let out = ovl_tests::run_unchecked(&[
        "env",
        "-u",
        "OVL_NODE",
        "-u",
        "OVL_API_SOCKET",
        "-u",
        "OVL_PIN_ROOT",
        "-u",
        "OVL_STORE",
        &ovl,
        "--store",
        "etcd://192.0.2.1:2379",
        "--etcd-cacert",
        "ca.pem",
        "--etcd-user",
        "bob",
        "--etcd-password-file",
        "pw",
        "--pin-root",
        "bpf/ovl",
        "cni",
        "conflist",
        NETWORK,
    ])?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let hostname = hostname.trim();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // A host name that is no valid node name must be refused, not
        // written into the conflist.
        ensure!(
            stderr.contains("node name") && stderr.contains(hostname),
            "conflist failed: {stderr}"
        );
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let list: Value = serde_json::from_str(&text).with_context(|| format!("conflist: {text}"))?;
    let plugin = &list["plugins"][0];
    ensure!(plugin["node"] == hostname, "node of {plugin}");
    let socket = plugin["apiSocket"].as_str().unwrap_or_default();
    ensure!(
        socket.starts_with('/') && socket.contains(hostname),
        "apiSocket of {plugin}"
    );
    // The plugin runs in the runtime's directory: every path is absolute,
    // and the etcd options travel in the store URL.
    let cwd = std::env::current_dir()?;
    let pin_root = cwd.join("bpf/ovl").display().to_string();
    ensure!(
        plugin["pinRoot"] == pin_root.as_str(),
        "pinRoot of {plugin}"
    );
    let store = plugin["store"].as_str().unwrap_or_default();
    let encoded = |p: &str| cwd.join(p).display().to_string().replace('/', "%2F");
    for option in [
        format!("cacert={}", encoded("ca.pem")),
        "user=bob".to_owned(),
        format!("password-file={}", encoded("pw")),
    ] {
        ensure!(
            store.starts_with("etcd://192.0.2.1:2379?") && store.contains(&option),
            "no {option} in the conflist's store {store}"
        );
    }
    Ok(())
}

/// A podman on host A of `cluster` with ovl installed and the network's
/// conflist as `ovl cni conflist` writes it (its capabilities declared),
/// at a spec version podman 4.3 speaks, and busybox imported.
fn podman_on_host_a(lab: &Lab, cluster: &TwoHosts) -> Result<Podman> {
    let host_a = &cluster.hosts[0].netns;
    let plugin_dir = install_plugin(lab, &cluster.ovl, host_a)?
        .parent()
        .context("plugin dir")?
        .to_owned();
    let podman = Podman::new(lab, host_a, &plugin_dir)?;
    let mut list = conflist(&cluster.ovl, host_a, TwoHosts::NODES[0])?;
    list["cniVersion"] = json!("1.0.0");
    podman.add_network(NETWORK, &list.to_string())?;
    podman.import_busybox(IMAGE)?;
    Ok(podman)
}

#[test]
fn podman_run_p_publishes_through_the_port_mappings_capability() -> Result<()> {
    let lab = Lab::new("cni-ports")?;
    let cluster = TwoHosts::start(&lab, "auto")?;
    cluster.run(0, &["network", "create", NETWORK, "--subnet", SUBNET])?;
    let host_a = &cluster.hosts[0].netns;
    // The conflist declares the capability, so podman passes `-p` on.
    let podman = podman_on_host_a(&lab, &cluster)?;
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        NETWORK,
        "-p",
        "8080:80",
        IMAGE,
        "sleep",
        "600",
    ])?;
    podman.exec(
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello from podman > /www/index.html && httpd -p 80 -h /www",
        ],
    )?;
    // From host B, at host A's address.
    let fetch = "import urllib.request\n\
                 print(urllib.request.urlopen('http://192.0.2.10:8080/index.html', timeout=3).read().decode())";
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        let out = cluster.hosts[1]
            .netns
            .exec_unchecked(&["/usr/bin/python3", "-c", fetch])?;
        got = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(got.contains("hello from podman"))
    })
    .with_context(|| format!("192.0.2.10:8080 answered {got:?}"))?;

    // podman rm takes the port away with the endpoint.
    podman.rm("web")?;
    let mut rules = String::new();
    wait_until(Duration::from_secs(5), || {
        let out = host_a.exec(&["nft", "list", "chain", "ip", "ovl", "published"])?;
        rules = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(!rules.contains("dport 8080"))
    })
    .with_context(|| format!("the rule outlived the container:\n{rules}"))?;
    drop(podman);
    cluster.stop()
}

/// STATUS asks what ADD would: when every free address of the network is
/// held back (`--address-grace`; here the addresses of a node removed with
/// `ovl node rm`), STATUS says 50 as ADD answers 11 — it does not promise
/// an address ADD then refuses. A network with room stays ready.
#[test]
fn status_counts_held_back_addresses_as_add_does() -> Result<()> {
    let lab = Lab::new("cni-held")?;
    let mut w = OneHost::start(&lab, true)?;
    let net = "cni-held-net";
    w.ovl
        .create_network(&w.host.netns, net, "198.18.12.0/29", &[])?;
    // A node with no agent takes all five addresses and is removed.
    for i in 0..5 {
        let c = lab.container(&format!("gone{i}"))?;
        w.ovl
            .run(&w.host.netns, "host-gone", &["connect", net, c.name()])?;
    }
    let removed = w
        .ovl
        .run(&w.host.netns, "-", &["node", "rm", "host-gone"])?;
    ensure!(removed.contains("held back"), "{removed}");

    let conf = with(&w.conf("1.1.0"), "network", json!(net)).to_string();
    let status = w.plugin.call("STATUS", &[], &conf)?;
    ensure!(status.error_code()? == 50, "STATUS: {status:?}");
    let details = status.json()?["details"].as_str().unwrap_or("").to_owned();
    ensure!(details.contains("held back"), "STATUS: {details}");
    let c = lab.container("late")?;
    let sandbox = netns_path(&c);
    let env = CniPlugin::attachment_env("ctr-late", &sandbox, "eth0");
    let add = w.plugin.call("ADD", &env, &conf)?;
    ensure!(add.error_code()? == 11, "ADD: {add:?}");
    w.plugin
        .call("STATUS", &[], &w.conf("1.1.0").to_string())?
        .ok()?;
    w.agent.take().context("agent")?.stop()
}

/// `podman run --mac-address` reaches ovl through the `mac` capability the
/// conflist declares: the container's interface has that MAC, ovl's
/// endpoint records it, a container on the other host reaches it (its ARP
/// answered with that MAC, decapsulated frames addressed to it), and a
/// second container asking for the same MAC is refused, naming why.
#[test]
fn podman_run_mac_address_goes_through_the_mac_capability() -> Result<()> {
    let lab = Lab::new("cni-mac")?;
    let cluster = TwoHosts::start(&lab, "auto")?;
    cluster.run(0, &["network", "create", NETWORK, "--subnet", SUBNET])?;
    let podman = podman_on_host_a(&lab, &cluster)?;
    let mac = "0a:00:5e:00:00:07";
    let run = |name: &str| {
        podman.run_unchecked(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--mac-address",
            mac,
            IMAGE,
            "sleep",
            "600",
        ])
    };
    let out = run("m1")?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let own = podman.exec("m1", &["cat", "/sys/class/net/eth0/address"])?;
    ensure!(own.trim() == mac, "m1's eth0 has MAC {own:?}");
    let ip = podman_ip(&podman, "m1")?;
    let net: Value = serde_json::from_str(&cluster.run(0, &["network", "inspect", NETWORK])?)?;
    let recorded = net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .any(|e| e["ip"] == ip.to_string() && e["mac"] == mac);
    ensure!(recorded, "ovl does not record {mac} for {ip}: {net}");
    let (b1, _) = cluster.container(&lab, 1, NETWORK, "b1")?;
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&b1, ip, 1, &["-W", "1"])?.all_received())
    })?;
    let neigh = b1.ip(&["neigh", "show", &ip.to_string()])?;
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    ensure!(neigh.contains(mac), "b1 resolved {ip} as {neigh}");

    let out = run("m2")?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && err.contains(&format!("MAC {mac} is already used")),
        "a second container with {mac}: {err}"
    );
    let _ = podman.run_unchecked(&["rm", "-f", "m2"]);
    podman.rm("m1")?;
    drop(podman);
    cluster.stop()
}

/// Removes the endpoints `owner` holds from the file store by hand, as an
/// operator editing `state.json` (or restoring a backup from before the
/// attachment) would: under the store's lock, as a new revision.
fn forget_in_store(lab: &Lab, owner: &str) -> Result<()> {
    let dir = lab.tempdir().join("store");
    let edit = "import json, os, sys\n\
                p = sys.argv[1] + '/state.json'\n\
                s = json.load(open(p))\n\
                s['endpoints'] = [e for e in s['endpoints'] if e.get('owner') != sys.argv[2]]\n\
                s['revision'] += 1\n\
                json.dump(s, open(p + '.edit', 'w'))\n\
                os.rename(p + '.edit', p)\n";
    let dir_text = dir.display().to_string();
    let lock = dir.join("state.lock").display().to_string();
    ovl_tests::run(&["flock", &lock, "python3", "-c", edit, &dir_text, owner])?;
    Ok(())
}

/// The CNI spec: "Plugins should generally complete a DEL action without
/// error even if some resources are missing", and release everything they
/// can. An attachment whose endpoint record the store lost (restored from a
/// backup, edited by hand) still has its veth; DEL removes both ends — and
/// only ovl's: a look-alike veth (named as ovl names host ends, with ovl's
/// MAC scheme) and another attachment's interface are left alone.
#[test]
fn del_removes_an_ovl_interface_the_store_lost_and_nothing_else() -> Result<()> {
    let lab = Lab::new("cni-lost")?;
    let w = OneHost::start(&lab, true)?;
    let conf = w.conf("1.0.0");

    // Another attachment, recorded (`ovl connect`), made first: the
    // address the lost record held is free, and a new attachment would
    // clash with the veth still named after it.
    let c3 = lab.container("c3")?;
    let before = w.host_links()?;
    w.ovl.connect(&w.host, NODE, NETWORK, &c3, &[])?;
    let c3_host_if: Vec<String> = w
        .host_links()?
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    ensure!(c3_host_if.len() == 1, "{c3_host_if:?}");

    let c1 = lab.container("c1")?;
    let s1 = netns_path(&c1);
    let env1 = CniPlugin::attachment_env("ctr-lost", &s1, "eth0");
    let res = w.plugin.call("ADD", &env1, &conf.to_string())?.ok()?;
    let host_if = res["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_owned();
    forget_in_store(&lab, "cni:ctr-lost/eth0")?;
    ensure!(
        !w.endpoints(NETWORK)?
            .iter()
            .any(|e| e["owner"] == "cni:ctr-lost/eth0"),
        "the record is still there"
    );
    ensure!(
        w.host_links()?.contains(&host_if),
        "the veth went too early"
    );

    // A look-alike: a veth whose host end is named as ovl names them and
    // whose container end carries an address of the network with ovl's MAC
    // for it, but is not the network's host end for that address.
    let c2 = lab.container("c2")?;
    let fake = "ovl0badc0de";
    w.host.netns.ip(&[
        "link",
        "add",
        fake,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        c2.name(),
    ])?;
    c2.ip(&["link", "set", "eth0", "address", "02:42:c6:12:00:63"])?;
    c2.ip(&["addr", "add", "198.18.0.99/24", "dev", "eth0"])?;

    let del = |env: &[(&str, &str)]| -> Result<()> {
        let out = w.plugin.call("DEL", env, &conf.to_string())?;
        ensure!(
            out.status.success() && out.stdout.trim().is_empty(),
            "{out:?}"
        );
        Ok(())
    };
    del(&env1)?;
    ensure!(
        !w.host_links()?.contains(&host_if),
        "DEL left the host end {host_if} of an attachment the store lost"
    );
    ensure!(
        !link_names(&c1)?.contains(&"eth0".to_owned()),
        "DEL left eth0 in the container"
    );
    // Twice: nothing left to do, still a success.
    del(&env1)?;

    del(&CniPlugin::attachment_env(
        "ctr-fake",
        &netns_path(&c2),
        "eth0",
    ))?;
    ensure!(
        link_names(&c2)?.contains(&"eth0".to_owned()) && w.host_links()?.contains(&fake.to_owned()),
        "DEL removed a veth that is not ovl's"
    );
    del(&CniPlugin::attachment_env(
        "ctr-other",
        &netns_path(&c3),
        "eth0",
    ))?;
    ensure!(
        link_names(&c3)?.contains(&"eth0".to_owned()) && w.host_links()?.contains(&c3_host_if[0]),
        "DEL removed another attachment's veth"
    );
    // A namespace that is gone took its interface along: success.
    let gone = format!("/run/netns/{}-gone", lab.prefix());
    del(&CniPlugin::attachment_env("ctr-gone", &gone, "eth0"))?;

    // A store restored from before the network itself: its interface is
    // still known as ovl's by its host end's name, MAC and peering.
    let c4 = lab.container("c4")?;
    let s4 = netns_path(&c4);
    let env4 = CniPlugin::attachment_env("ctr-netless", &s4, "eth0");
    let res = w.plugin.call("ADD", &env4, &conf.to_string())?.ok()?;
    let host_if4 = res["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_owned();
    forget_in_store(&lab, "cni:ctr-netless/eth0")?;
    w.ovl
        .run(&w.host.netns, NODE, &["disconnect", NETWORK, c3.name()])?;
    w.ovl
        .run(&w.host.netns, NODE, &["network", "rm", NETWORK])?;
    del(&env4)?;
    ensure!(
        !w.host_links()?.contains(&host_if4) && !link_names(&c4)?.contains(&"eth0".to_owned()),
        "DEL left the veth {host_if4} of a network the store lost"
    );
    ensure!(
        w.host_links()?.contains(&fake.to_owned()),
        "the look-alike went with it"
    );
    Ok(())
}
