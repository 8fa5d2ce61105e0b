//! The naming policy every front end shares: which of the names a container
//! asks for its endpoint gets in the network's DNS, and what it is called
//! instead when its own name is invalid or another endpoint holds it.
//!
//! Names are unique per ovl network across hosts, while runtimes make them
//! unique per daemon (Docker, podman) or per namespace (Kubernetes) only:
//! two `db` containers on two hosts, or `postgres-0` in two namespaces,
//! ask for one name. The second keeps what it can have — its aliases, and
//! its short container or endpoint ID as its name — rather than not being
//! attached at all. Aliases are shared, as Docker's `--network-alias`es
//! are (Compose gives every replica of a service the service's name as an
//! alias): an alias several endpoints have resolves to all of them.

use crate::model::{Endpoint, State, validate_endpoint_name};

/// The names a container asks for on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub aliases: Vec<String>,
}

/// The names an endpoint gets: those of [`Wanted`] it can have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    pub name: String,
    pub aliases: Vec<String>,
    /// Why each name it cannot have is refused.
    pub refused: Vec<String>,
}

impl Naming {
    /// Its name and aliases, for a log line.
    pub fn names_text(&self) -> String {
        std::iter::once(self.name.as_str())
            .chain(self.aliases.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The names an endpoint of `network` gets of `wanted`, by `state`: every
/// alias that is a valid DNS name, and its name if valid and no other
/// endpoint of the network is called so (`own`: the endpoint itself once
/// registered, or the reservation it takes over, is no clash; another's
/// alias is none either: the name then resolves to both). When its name
/// is refused it is called `fallback` (its short container or endpoint
/// ID); when another holds even that, it keeps `own`'s name, and without
/// `own` it is still called `fallback`, which the model then refuses
/// naming the holder.
pub fn choose(
    state: &State,
    network: &str,
    own: Option<&Endpoint>,
    wanted: &Wanted,
    fallback: &str,
) -> Naming {
    let mut refused = Vec::new();
    let mut usable = |name: &str, say: bool| -> bool {
        if let Err(e) = validate_endpoint_name(name) {
            if say {
                refused.push(e.to_string());
            }
            return false;
        }
        let holder = state
            .endpoints_of(network)
            .filter(|e| own.is_none_or(|o| e.ip != o.ip))
            .find(|e| e.name.eq_ignore_ascii_case(name));
        match holder {
            Some(h) => {
                if say {
                    refused.push(format!(
                        "{name} is held by endpoint {} ({}{})",
                        h.name,
                        h.ip,
                        h.node()
                            .map(|n| format!(" on node {n}"))
                            .unwrap_or_default()
                    ));
                }
                false
            }
            None => true,
        }
    };
    let name = if usable(&wanted.name, true) {
        wanted.name.clone()
    } else if usable(fallback, false) {
        fallback.to_owned()
    } else {
        own.map_or(fallback, |o| o.name.as_str()).to_owned()
    };
    let aliases = wanted
        .aliases
        .iter()
        .filter(|a| !a.eq_ignore_ascii_case(&name))
        .filter(|a| match validate_endpoint_name(a) {
            Ok(()) => true,
            Err(e) => {
                refused.push(e.to_string());
                false
            }
        })
        .cloned()
        .collect();
    Naming {
        name,
        aliases,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    const NET: &str = "uber-net";

    fn network() -> State {
        let mut s = State::default();
        s.create_network(NetworkSpec::new(NET, "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        s
    }

    fn attach(s: &mut State, node: &str, ns: &str, name: &str) -> Endpoint {
        s.add_container(ContainerSpec {
            network: NET.into(),
            node: node.into(),
            netns: ns.into(),
            name: Some(name.into()),
            ..ContainerSpec::default()
        })
        .unwrap()
    }

    fn wanted(name: &str, aliases: &[&str]) -> Wanted {
        Wanted {
            name: name.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    #[test]
    fn an_endpoint_gets_its_aliases_and_the_name_no_other_is_called() {
        let mut s = network();
        let mine = attach(&mut s, "a", "/run/docker/netns/1", "e1aaaaaaaaaa");
        let want = wanted("web", &["www", "api", "bad name"]);
        let n = choose(&s, NET, Some(&mine), &want, "e1aaaaaaaaaa");
        assert_eq!(n.name, "web");
        assert_eq!(n.aliases, ["www", "api"]);
        assert_eq!(n.refused.len(), 1, "{n:?}");
        assert!(n.refused[0].contains("bad name"), "{n:?}");

        // A container on node b is called `web` and has alias `api`: the
        // name is its, the alias is shared.
        let theirs = attach(&mut s, "b", "/run/docker/netns/2", "WEB");
        s.set_names(NET, theirs.ip, None, vec!["api".into()])
            .unwrap();
        let n = choose(&s, NET, Some(&mine), &want, "e1aaaaaaaaaa");
        assert_eq!(n.name, "e1aaaaaaaaaa", "its fallback");
        assert_eq!(n.aliases, ["www", "api"]);
        assert_eq!(n.refused.len(), 2, "{n:?}");
        assert!(
            n.refused[0].contains("web is held by endpoint WEB (198.18.0.3 on node b)"),
            "{n:?}"
        );
        // Another's alias is no clash for a name either.
        let n = choose(&s, NET, Some(&mine), &wanted("api", &[]), "e1aaaaaaaaaa");
        assert_eq!(n.name, "api", "{n:?}");
        assert!(n.refused.is_empty(), "{n:?}");
        // Its own names are not a clash with itself.
        let named = s
            .set_names(
                NET,
                mine.ip,
                Some("e1aaaaaaaaaa".into()),
                vec!["www".into()],
            )
            .unwrap();
        assert_eq!(
            choose(&s, NET, Some(&named), &want, "e1aaaaaaaaaa").aliases,
            ["www", "api"]
        );
        // Its fallback held by another as well: it keeps the name it has.
        attach(&mut s, "b", "/run/docker/netns/3", "e9cccccccccc");
        let n = choose(&s, NET, Some(&named), &wanted("web", &[]), "e9cccccccccc");
        assert_eq!(n.name, "e1aaaaaaaaaa", "{n:?}");
    }

    #[test]
    fn a_new_endpoint_whose_name_is_taken_or_invalid_is_called_its_fallback() {
        let mut s = network();
        // `postgres-0` of another namespace (or another host's `db`).
        attach(&mut s, "b", "/run/netns/other", "postgres-0");
        let n = choose(&s, NET, None, &wanted("postgres-0", &[]), "4f9c2d1e7a3b");
        assert_eq!(n.name, "4f9c2d1e7a3b");
        assert_eq!(n.refused.len(), 1, "{n:?}");
        assert!(
            n.refused[0].contains("postgres-0 is held by endpoint postgres-0"),
            "{n:?}"
        );
        // Names are unique ignoring case.
        assert_eq!(
            choose(&s, NET, None, &wanted("Postgres-0", &[]), "4f9c2d1e7a3b").name,
            "4f9c2d1e7a3b"
        );
        let n = choose(&s, NET, None, &wanted("my_pod-", &[]), "4f9c2d1e7a3b");
        assert_eq!(n.name, "4f9c2d1e7a3b");
        assert!(n.refused[0].contains("invalid endpoint name"), "{n:?}");
        let n = choose(&s, NET, None, &wanted("postgres-1", &[]), "4f9c2d1e7a3b");
        assert_eq!(n.name, "postgres-1");
        assert!(n.refused.is_empty(), "{n:?}");
        // With its fallback held as well there is nothing else to call it:
        // the fallback, which the model refuses naming its holder.
        attach(&mut s, "b", "/run/netns/third", "4f9c2d1e7a3b");
        let n = choose(&s, NET, None, &wanted("postgres-0", &[]), "4f9c2d1e7a3b");
        assert_eq!(n.name, "4f9c2d1e7a3b");
    }
}
