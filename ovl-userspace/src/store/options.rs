//! A store URL and the options that may follow it as a query string:
//! `etcds://h1:2379,h2:2379?cacert=/etc/ovl/ca.pem&cert=…&key=…&user=ovl`.
//! One string describes how to reach the store, so every front end (CLI,
//! agent, runtime plugins) passes it on whole; command-line flags are
//! folded into it ([`with_options`]). Passwords never appear in it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::StoreError;

/// Where the password of `user` comes from when no password file is given.
pub const PASSWORD_ENV: &str = "OVL_ETCD_PASSWORD";

/// The query keys a store URL may carry.
const KEYS: [&str; 7] = [
    "cacert",
    "cert",
    "key",
    "user",
    "password-file",
    "address-grace",
    "lock-timeout",
];

/// A parsed store URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreUrl {
    /// `file`, `etcd` or `etcds`.
    pub scheme: String,
    /// The path (file) or `host:port[,host:port...]` (etcd).
    pub location: String,
    pub options: StoreOptions,
}

/// Options of a store URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    pub etcd: EtcdAccess,
    /// How long a freed address is held back from allocation.
    pub address_grace: Option<Duration>,
    /// How long a file store change waits for another's lock.
    pub lock_timeout: Option<Duration>,
}

/// How to reach etcd: TLS material and a user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// CA bundle that signed etcd's server certificate (TLS).
    pub cacert: Option<PathBuf>,
    /// Client certificate and key (TLS client authentication).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (etcd authentication).
    pub user: Option<String>,
    /// File holding the user's password; else [`PASSWORD_ENV`].
    pub password_file: Option<PathBuf>,
}

impl EtcdAccess {
    /// True when any TLS option is set.
    pub fn wants_tls(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The user's password: the password file's first line, or
    /// [`PASSWORD_ENV`].
    pub fn password(&self) -> Result<String, StoreError> {
        let user = self.user.as_deref().unwrap_or_default();
        if let Some(path) = &self.password_file {
            let text = read_secret(path, "--etcd-password-file")?;
            return Ok(text.lines().next().unwrap_or_default().to_owned());
        }
        std::env::var(PASSWORD_ENV).map_err(|_| {
            StoreError::BadOption(format!(
                "etcd user {user:?} needs a password: set {PASSWORD_ENV} or pass --etcd-password-file FILE"
            ))
        })
    }
}

/// Reads a file named by option `option`, naming both on failure.
pub fn read_file(path: &Path, option: &str) -> Result<String, StoreError> {
    std::fs::read_to_string(path)
        .map_err(|e| StoreError::BadOption(format!("cannot read {option} {}: {e}", path.display())))
}

/// Reads a secret (a password file, a private key) named by option
/// `option`, refusing one that others than its owner may read or that
/// belongs to another user than this one or root: whoever reads it may
/// change the cluster's state.
pub fn read_secret(path: &Path, option: &str) -> Result<String, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        StoreError::BadOption(format!("cannot read {option} {}: {e}", path.display()))
    })?;
    let mode = meta.mode() & 0o777;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if mode & 0o077 != 0 || (meta.uid() != me && meta.uid() != 0) {
        return Err(StoreError::BadOption(format!(
            "{option} {} may be read by others (mode {mode:o}, owner uid {}): it holds a secret; \
             `chown` it to this user and `chmod 600` it",
            path.display(),
            meta.uid()
        )));
    }
    read_file(path, option)
}

impl StoreUrl {
    /// Parses `scheme://location[?key=value&...]`.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        let unsupported = || StoreError::UnsupportedUrl(url.to_owned());
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (scheme, location) = base.split_once("://").ok_or_else(unsupported)?;
        let ok = match scheme {
            "file" => location.starts_with('/'),
            "etcd" | "etcds" => !location.is_empty(),
            _ => false,
        };
        if !ok {
            return Err(unsupported());
        }
        if scheme != "file" && location.contains('@') {
            // Not repeated: `user:password@host` would show the password.
            return Err(StoreError::BadOption(format!(
                "credentials never go in the store URL (they would show in process lists, logs \
                 and errors): pass --etcd-user and set {PASSWORD_ENV} or pass --etcd-password-file FILE"
            )));
        }
        let mut options = StoreOptions::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let bad =
                |why: &str| StoreError::BadOption(format!("store URL option {key}={value}: {why}"));
            let path = || Some(PathBuf::from(value.as_ref()));
            match key.as_ref() {
                "cacert" => options.etcd.cacert = path(),
                "cert" => options.etcd.cert = path(),
                "key" => options.etcd.key = path(),
                "user" => options.etcd.user = Some(value.clone().into_owned()),
                "password-file" => options.etcd.password_file = path(),
                "address-grace" => {
                    options.address_grace =
                        Some(seconds(&value).ok_or_else(|| bad("expected seconds"))?)
                }
                "lock-timeout" => {
                    options.lock_timeout =
                        Some(seconds(&value).ok_or_else(|| bad("expected seconds"))?)
                }
                "password" => {
                    return Err(StoreError::BadOption(format!(
                        "a password never goes in the store URL (it would show in process lists and logs): set {PASSWORD_ENV} or pass --etcd-password-file FILE"
                    )));
                }
                _ => return Err(bad(&format!("unknown option; known: {}", KEYS.join(", ")))),
            }
        }
        let etcd_options = options.etcd != EtcdAccess::default();
        if scheme == "file" && etcd_options {
            return Err(StoreError::BadOption(format!(
                "{base} is a file store: etcd options (cacert, cert, key, user, password-file) do not apply"
            )));
        }
        if scheme == "etcd" && options.etcd.wants_tls() {
            return Err(StoreError::BadOption(format!(
                "TLS options given for {base}, which is plain text: use etcds://{location}"
            )));
        }
        if options.etcd.cert.is_some() != options.etcd.key.is_some() {
            return Err(StoreError::BadOption(
                "a client certificate needs its key and the other way round: pass both --etcd-cert and --etcd-key".into(),
            ));
        }
        Ok(StoreUrl {
            scheme: scheme.to_owned(),
            location: location.to_owned(),
            options,
        })
    }

    /// The URL without its options, for messages.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.location)
    }
}

/// Whole seconds as a duration.
fn seconds(s: &str) -> Option<Duration> {
    s.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Adds `options` (from flags) to `url`'s query, each replacing the same
/// option in the URL; etcd options are left out of file store URLs.
pub fn with_options(url: &str, options: &StoreOptions) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let is_file = base.starts_with("file://");
    let mut pairs: Vec<(String, String)> = Vec::new();
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let e = &options.etcd;
    let given: [(&str, Option<String>); 7] = [
        ("cacert", path(&e.cacert).filter(|_| !is_file)),
        ("cert", path(&e.cert).filter(|_| !is_file)),
        ("key", path(&e.key).filter(|_| !is_file)),
        ("user", e.user.clone().filter(|_| !is_file)),
        ("password-file", path(&e.password_file).filter(|_| !is_file)),
        (
            "address-grace",
            options.address_grace.map(|d| d.as_secs().to_string()),
        ),
        (
            "lock-timeout",
            options.lock_timeout.map(|d| d.as_secs().to_string()),
        ),
    ];
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !given.iter().any(|(g, val)| *g == k && val.is_some()) {
            pairs.push((k.into_owned(), v.into_owned()));
        }
    }
    for (k, v) in given {
        if let Some(v) = v {
            pairs.push((k.to_owned(), v));
        }
    }
    if pairs.is_empty() {
        return base.to_owned();
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{base}?{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_are_refused_without_repeating_them() {
        for url in [
            "etcd://ovl:hunter2@192.0.2.1:2379",
            "etcds://ovl:hunter2@h:2379",
        ] {
            let e = StoreUrl::parse(url).unwrap_err().to_string();
            assert!(
                !e.contains("hunter2") && e.contains(PASSWORD_ENV),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn a_secret_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::TestDir::new("secret-mode");
        std::fs::create_dir_all(dir.path()).unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let access = EtcdAccess {
            user: Some("u".into()),
            password_file: Some(pw.clone()),
            ..EtcdAccess::default()
        };
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = access.password().unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(access.password().unwrap(), "s3cret");
    }

    #[test]
    fn options_from_flags_travel_in_the_url_and_parse_back() {
        let options = StoreOptions {
            etcd: EtcdAccess {
                cacert: Some("/etc/ovl/ca & co.pem".into()),
                cert: Some("/etc/ovl/c.pem".into()),
                key: Some("/etc/ovl/k.pem".into()),
                user: Some("ovl".into()),
                password_file: Some("/etc/ovl/pw".into()),
            },
            address_grace: Some(Duration::from_secs(90)),
            lock_timeout: None,
        };
        let url = with_options("etcds://192.0.2.1:2379?user=old", &options);
        let parsed = StoreUrl::parse(&url).unwrap();
        assert_eq!(parsed.options, options, "{url}");
        assert_eq!(parsed.base(), "etcds://192.0.2.1:2379");
        assert_eq!(
            with_options("etcd://h:1", &StoreOptions::default()),
            "etcd://h:1"
        );
        // etcd options do not follow a file store.
        assert_eq!(
            with_options("file:///var/lib/ovl", &options),
            "file:///var/lib/ovl?address-grace=90"
        );
    }

    #[test]
    fn inconsistent_or_secret_options_are_refused_clearly() {
        for (url, needle) in [
            ("etcd://h:1?cacert=/ca.pem", "etcds://h:1"),
            ("etcds://h:1?password=hunter2", "OVL_ETCD_PASSWORD"),
            ("etcds://h:1?cert=/c.pem", "--etcd-key"),
            ("file:///x?user=u", "file store"),
            ("etcd://h:1?colour=blue", "known:"),
            ("etcd://h:1?address-grace=soon", "seconds"),
        ] {
            let err = StoreUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
