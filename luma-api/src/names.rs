//! The one definition of a valid name, shared by the CLI (which checks `luma.yml` before
//! anything changes) and the proxy (which checks every admin request at the door).
//!
//! Projects and apps are DNS labels without `--`: `_` separates the parts of Docker object
//! names and `--` separates an app from its release in network aliases, so neither can be
//! forged (project `a-b` + app `c` never meets project `a` + app `b-c`). A release alias
//! `<app>--<release>` is itself a DNS label, so it must fit in 63 bytes; names are capped at
//! [`MAX_NAME`] to leave room for a release id.

/// Longest project or app name.
pub const MAX_NAME: usize = 40;
/// Longest DNS label, and so the longest release alias `<app>--<release>`.
pub const MAX_LABEL: usize = 63;
/// Names Luma uses for itself.
pub const RESERVED: [&str; 6] = ["luma", "luma-proxy", "proxy", "lock", "host", "none"];

fn is_label(v: &str, max: usize) -> bool {
    !v.is_empty()
        && v.len() <= max
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

/// A project or app name (`what` names the field in the error).
pub fn check_name(what: &str, v: &str) -> Result<(), String> {
    if !is_label(v, MAX_NAME) || v.contains("--") {
        return Err(format!(
            "{what} {v:?} is not a valid name: use 1-{MAX_NAME} lowercase letters, digits and single '-', starting and ending with a letter or digit"
        ));
    }
    if RESERVED.contains(&v) {
        return Err(format!(
            "{what} {v:?} is reserved by Luma; pick another name"
        ));
    }
    Ok(())
}

/// A release id: a DNS label (git short sha, or a time-based id).
pub fn check_release(v: &str) -> Result<(), String> {
    if is_label(v, MAX_LABEL) {
        Ok(())
    } else {
        Err(format!(
            "release {v:?} is not valid: use lowercase letters, digits and '-'"
        ))
    }
}

/// The alias a release answers to inside its project network, checked to be one DNS label.
pub fn release_alias(app: &str, release: &str) -> Result<String, String> {
    let alias = format!("{app}--{release}");
    if alias.len() > MAX_LABEL {
        return Err(format!(
            "the release alias {alias:?} is {} bytes, over the {MAX_LABEL}-byte DNS label limit; shorten the app name {app:?} (at most {} bytes with this release id)",
            alias.len(),
            MAX_LABEL.saturating_sub(release.len() + 2)
        ));
    }
    check_release(release)?;
    Ok(alias)
}

/// Recovers the release from a route target like `web--3f2a1c9:3000`.
pub fn release_of_target(app: &str, target: &str) -> Option<String> {
    let alias = target.rsplit_once(':').map(|(a, _)| a).unwrap_or(target);
    alias.strip_prefix(&format!("{app}--")).map(str::to_string)
}

/// The app an alias belongs to: `web--3f2a1c9` -> `web`.
pub fn app_of_alias(alias: &str) -> &str {
    let first = alias.split('.').next().unwrap_or(alias);
    first.split_once("--").map(|(a, _)| a).unwrap_or(first)
}

/// A Docker network or alias name (dotted labels of letters, digits, '-', '_').
pub fn is_dns_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= MAX_LABEL
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Normalizes a host pattern: lowercase, no port, no trailing dot; `*.` allowed only as the
/// whole first label.
pub fn normalize_host_pattern(h: &str) -> Result<String, String> {
    let raw = h.trim();
    let h = raw.trim_end_matches('.').to_ascii_lowercase();
    if h.contains(':') || h.contains('/') {
        return Err(format!(
            "host {raw:?} must be a bare hostname without port or path, e.g. app.example.com"
        ));
    }
    let rest = h.strip_prefix("*.").unwrap_or(&h);
    if rest.contains('*') || !is_dns_name(rest) || (h.starts_with("*.") && !rest.contains('.')) {
        return Err(format!(
            "host {raw:?} is not a valid hostname; a wildcard must be the whole first label of a name with at least two more labels, e.g. *.example.com"
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labels_without_double_dash() {
        assert!(check_name("project", "shop").is_ok());
        assert!(check_name("project", "a-b").is_ok());
        assert!(check_name("project", "a--b").is_err());
        assert!(check_name("project", "Shop").is_err());
        assert!(check_name("project", "-a").is_err());
        assert!(check_name("project", &"a".repeat(41)).is_err());
        assert!(check_name("app", "proxy").unwrap_err().contains("reserved"));
    }

    #[test]
    fn release_alias_must_fit_one_dns_label() {
        assert_eq!(release_alias("web", "3f2a1c9").unwrap(), "web--3f2a1c9");
        let long_app = "a".repeat(40);
        let err = release_alias(&long_app, "20261128-083000-123456789").unwrap_err();
        assert!(err.contains("63-byte"), "{err}");
        assert!(release_alias("web", "Bad_Id").is_err());
    }

    #[test]
    fn release_round_trips_through_the_target() {
        let alias = release_alias("web", "3f2a1c9").unwrap();
        assert_eq!(
            release_of_target("web", &format!("{alias}:3000")).as_deref(),
            Some("3f2a1c9")
        );
        assert_eq!(release_of_target("api", &format!("{alias}:3000")), None);
        assert_eq!(app_of_alias("web--3f2a1c9"), "web");
        assert_eq!(app_of_alias("web-v1"), "web-v1");
    }

    #[test]
    fn wildcards_are_one_whole_label() {
        assert_eq!(
            normalize_host_pattern("*.Example.com").unwrap(),
            "*.example.com"
        );
        assert!(normalize_host_pattern("*.com").is_err());
        assert!(normalize_host_pattern("a*.example.com").is_err());
        assert!(normalize_host_pattern("a.*.example.com").is_err());
        assert!(normalize_host_pattern("a.test:80").is_err());
    }
}

/// Why no public CA will issue a certificate for `host`, if that is so: IP addresses, and names
/// under suffixes reserved for local or test use (RFC 2606, RFC 6761, RFC 6762, RFC 8375, and
/// ICANN's `.internal`). With a private or test CA (`proxy.acme.directory`) these are allowed.
pub fn no_public_certificate(host: &str) -> Option<String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Some(format!(
            "{host} is an IP address; public CAs issue certificates for DNS names only"
        ));
    }
    const RESERVED: [&str; 9] = [
        "localhost",
        "test",
        "internal",
        "local",
        "invalid",
        "example",
        "example.com",
        "example.net",
        "example.org",
    ];
    let suffix = RESERVED
        .iter()
        .chain(std::iter::once(&"home.arpa"))
        .find(|s| h == **s || h.ends_with(&format!(".{s}")))?;
    Some(format!(
        "no public CA issues certificates for {suffix} names; {host} stays HTTP only (use a real domain, a custom certificate, or a private CA with proxy.acme.directory)"
    ))
}

/// Whether a certificate whose subjectAltName DNS names are `names` covers `host` (a route's
/// host pattern or a request's host): an exact name, or `*.parent` for a host exactly one
/// label under `parent`. A wildcard host pattern `*.parent` needs the same wildcard name (no
/// single name covers every host a wildcard route matches). Case and a trailing dot are
/// ignored on both sides. The one rule for the CLI's preflight and the proxy's gate and
/// handshakes; the proxy asks it on every HTTPS request, so it compares in place and never
/// allocates.
pub fn certificate_covers<S: AsRef<str>>(names: &[S], host: &str) -> bool {
    let host = host.trim_end_matches('.');
    names.iter().any(|n| {
        let n = n.as_ref().trim_end_matches('.');
        if n.eq_ignore_ascii_case(host) {
            return true;
        }
        match (n.strip_prefix("*."), host.split_once('.')) {
            (Some(parent), Some((label, rest))) => {
                !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(parent)
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod covers_tests {
    use super::certificate_covers as covers;

    #[test]
    fn exact_names_and_one_label_wildcards() {
        let names = ["*.shop.test", "shop.test", "Other.TEST."];
        assert!(covers(&names, "shop.test"));
        assert!(covers(&names, "a.shop.test"));
        assert!(covers(&names, "A.Shop.Test."));
        assert!(covers(&names, "other.test"));
        assert!(!covers(&names, "a.b.shop.test"), "one label only");
        assert!(!covers(&names, ".shop.test"), "an empty label is no host");
        assert!(!covers(&names, "www.other.test"));
        assert!(covers(&names, "*.shop.test"), "the same wildcard");
        assert!(
            !covers(&["a.shop.test"], "*.shop.test"),
            "a wildcard route needs a wildcard name"
        );
        assert!(!covers(&["*.shop.test"], "*.a.shop.test"));
        assert!(!covers::<&str>(&[], "shop.test"));
        assert!(
            covers(&["*.SHOP.test"], "a.shop.TEST"),
            "case on both sides"
        );
        assert!(!covers(&["*.shop.test"], "a.shop.test.x"));
        assert!(
            !covers(&["*.shop.test"], "shop.test"),
            "a wildcard is not its parent"
        );
    }
}

#[cfg(test)]
mod public_ca_tests {
    use super::no_public_certificate;

    #[test]
    fn reserved_names_and_ips_get_no_public_certificate() {
        for h in [
            "localhost",
            "a.localhost",
            "shop.test",
            "db.internal",
            "x.example.com",
            "127.0.0.1",
            "::1",
            "printer.home.arpa",
        ] {
            assert!(no_public_certificate(h).is_some(), "{h}");
        }
        for h in [
            "shop.example.io",
            "testing.com",
            "mytest",
            "example.company.com",
        ] {
            assert!(no_public_certificate(h).is_none(), "{h}");
        }
    }
}
