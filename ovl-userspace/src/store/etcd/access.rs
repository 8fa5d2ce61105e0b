//! Who ovl is to etcd and how it talks to it: TLS (server CA, client
//! certificate) and user/password authentication as connect options, and
//! etcd and transport errors told in one line that says what to fix.

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::store::{
    StoreError, StoreUrl,
    options::{EtcdAccess, read_file, read_secret},
};

/// The client's connection options for `url`: keep-alives, a leader
/// required for every request and watch (a member cut off from its
/// cluster fails fast instead of serving stale data), TLS for `etcds://`,
/// and a user whose token is refreshed when it expires.
pub fn connect_options(url: &StoreUrl) -> Result<ConnectOptions, StoreError> {
    let access = &url.options.etcd;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if url.scheme == "etcds" {
        options = options.with_tls(tls(access)?);
    }
    if let Some(user) = &access.user {
        options = options
            .with_user(user.clone(), access.password()?)
            .with_auto_token_refresh(true);
    }
    Ok(options)
}

fn tls(access: &EtcdAccess) -> Result<TlsOptions, StoreError> {
    let mut tls = TlsOptions::new();
    tls = match &access.cacert {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read_file(path, "--etcd-cacert")?)),
        // No CA given: the system's trusted roots.
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&access.cert, &access.key) {
        tls = tls.identity(Identity::from_pem(
            read_file(cert, "--etcd-cert")?,
            read_secret(key, "--etcd-key")?,
        ));
    }
    Ok(tls)
}

/// Every message in an error's chain, joined, without repeats.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        next = err.source();
    }
    parts.join(": ").replace('\n', " ")
}

/// What a failure of etcd's TLS or authentication means, when it is one.
fn access_hint(detail: &str) -> Option<&'static str> {
    let d = detail.to_ascii_lowercase();
    let hints: [(&[&str], &str); 8] = [
        (
            &[
                "unknownissuer",
                "unknown issuer",
                "certificate verify failed",
                "badsignature",
            ],
            "etcd's server certificate is not signed by the CA ovl trusts: check --etcd-cacert (OVL_ETCD_CACERT)",
        ),
        (
            &[
                "notvalidforname",
                "not valid for name",
                "certnotvalidforname",
            ],
            "etcd's server certificate does not name the address ovl connects to: use a host name or address in its subject alternative names",
        ),
        (
            &[
                "certificaterequired",
                "certificate required",
                "handshakefailure",
                "badcertificate",
                "bad certificate",
                "unknownca",
                "unknown ca",
            ],
            "etcd refused ovl's client certificate: pass one signed by a CA etcd trusts with --etcd-cert and --etcd-key (OVL_ETCD_CERT, OVL_ETCD_KEY)",
        ),
        (
            &[
                "invalidcontenttype",
                "corrupt message",
                "invalid content type",
            ],
            "etcd does not speak TLS on this port: use etcd:// instead of etcds://",
        ),
        (
            &["invalid user id or password", "authentication failed"],
            "wrong etcd user or password: check --etcd-user and OVL_ETCD_PASSWORD (or --etcd-password-file)",
        ),
        (
            &[
                "user name is empty",
                "user name not found",
                "invalid auth token",
            ],
            "etcd requires a login: pass --etcd-user (OVL_ETCD_USER) and set OVL_ETCD_PASSWORD or --etcd-password-file",
        ),
        (
            &["permission denied"],
            "the etcd user lacks read/write permission on /ovl/: grant it a role with readwrite on the /ovl/ prefix",
        ),
        (
            &["authentication is not enabled"],
            "etcd has authentication disabled: drop --etcd-user",
        ),
    ];
    hints
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| d.contains(n)))
        .map(|(_, hint)| *hint)
}

/// What a connection closed by etcd right away most likely means: over
/// TLS (1.3 reports a refused client certificate after the handshake), a
/// missing or refused client certificate; in plain text, a TLS port.
fn closed_hint(detail: &str, tls: bool) -> Option<&'static str> {
    let d = detail.to_ascii_lowercase();
    // hyper spells an io::ErrorKind in Debug form ("Kind(ConnectionReset)"),
    // so both spellings are looked for.
    let closed = [
        "connection closed",
        "broken pipe",
        "connection reset",
        "connectionreset",
        "connectionaborted",
    ]
    .iter()
    .any(|n| d.contains(n));
    match (closed, tls) {
        (false, _) => None,
        (true, true) => Some(
            "etcd closed the TLS connection: it wants a client certificate signed by a CA it trusts; pass --etcd-cert and --etcd-key (OVL_ETCD_CERT, OVL_ETCD_KEY)",
        ),
        (true, false) => Some(
            "etcd closed the connection: if it serves TLS on this port, use etcds:// with --etcd-cacert",
        ),
    }
}

/// An etcd client error from `what` against the store at `url`, as a
/// store error that says what to fix when TLS or a login is at fault.
pub fn store_error(url: &StoreUrl, what: &str, e: &etcd_client::Error) -> StoreError {
    let endpoints = url.base();
    let detail = chain(e);
    let hint = access_hint(&detail).or_else(|| closed_hint(&detail, url.scheme == "etcds"));
    match hint {
        Some(hint) => StoreError::EtcdAccess {
            endpoints,
            detail: format!("{hint} ({what}: {detail})"),
        },
        None => StoreError::Etcd {
            endpoints,
            detail: format!("{what}: {detail}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_and_login_failures_say_what_to_fix() {
        for (detail, needle) in [
            (
                "transport error: invalid peer certificate: UnknownIssuer",
                "--etcd-cacert",
            ),
            ("received fatal alert: CertificateRequired", "--etcd-cert"),
            (
                "etcdserver: authentication failed, invalid user ID or password",
                "wrong etcd user",
            ),
            ("etcdserver: user name is empty", "--etcd-user"),
            ("etcdserver: permission denied", "readwrite"),
        ] {
            let hint = access_hint(detail).unwrap_or_default();
            assert!(hint.contains(needle), "{detail}: {hint}");
        }
        assert_eq!(access_hint("connection refused"), None);
        assert_eq!(closed_hint("connection refused", true), None);
        assert!(
            closed_hint("hyper::Error(Canceled, \"connection closed\")", true)
                .is_some_and(|h| h.contains("--etcd-cert"))
        );
        assert!(
            closed_hint("stream closed because of a broken pipe", false)
                .is_some_and(|h| h.contains("etcds://"))
        );
        // What a plain-text client reads when a TLS port resets it (seen in CI).
        assert!(
            closed_hint(
                "transport error: hyper::Error(Io, Kind(ConnectionReset))",
                false
            )
            .is_some_and(|h| h.contains("etcds://"))
        );
    }
}
