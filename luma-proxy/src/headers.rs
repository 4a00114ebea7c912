//! Per-request header handling: hop-by-hop stripping, forwarding headers, request ids, and the
//! strict checks a request head must pass before it is routed.
//!
//! Kept free of I/O so it can be unit-tested and benchmarked on its own.
//!
//! Forwarded headers, in one place. The proxy faces the internet, so by default (edge mode) it
//! vouches only for what it saw itself:
//! - `X-Forwarded-For` is set to the peer address; a client-sent one is discarded;
//! - `X-Forwarded-Proto` is the scheme the client used with the proxy (`http`), and
//!   `X-Forwarded-Host` the Host it asked for; client-sent ones are overwritten;
//! - client-sent `X-Real-IP` and `Forwarded` are removed (the proxy writes neither).
//!
//! Behind a load balancer or CDN, `--trusted-proxies` lists its networks. When the immediate
//! peer is inside one of them, the peer is appended to the `X-Forwarded-For` it sent, and its
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP` and `Forwarded` are kept (the proxy
//! fills in the first two when they are missing). A peer outside the list gets edge mode.
//!
//! In both modes, a request header whose name reads as one of those five once `_` is read as
//! `-` (`X_Real_IP`, `X_Forwarded-For`) is removed: CGI, WSGI and Rack name headers
//! `HTTP_X_REAL_IP`, mapping both spellings to the same key, so an app could take the client's
//! underscore spelling for the proxy's header. A trusted hop passes such a header through from
//! its own client, so trusting the hop does not make it trustworthy.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Uri, Version};
use std::net::{IpAddr, SocketAddr};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

pub use luma_api::net::{Cidr, TrustedProxies};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection and must not be forwarded (RFC 9110 7.6.1). Typed
/// names, so removing them hashes nothing at run time. `Connection` first ([`CONNECTION_BIT`]).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ]
}

/// True for an HTTP/1.1 upgrade request (WebSocket and friends).
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

const CONNECTION_BIT: u16 = 1; // hop_by_hop()[0]
const UPGRADE_BIT: u16 = 1 << 8;

/// Which of [`hop_by_hop`]'s names (bit i for entry i) and `Upgrade` ([`UPGRADE_BIT`]) a head
/// carries, found in one pass over its names: comparing each name with nine typed names is
/// cheaper than hashing nine lookups, and most heads carry none of them.
fn hop_by_hop_present(headers: &HeaderMap) -> u16 {
    let names = hop_by_hop();
    let mut present = 0;
    for key in headers.keys() {
        if let Some(i) = names.iter().position(|n| *n == key) {
            present |= 1 << i;
        } else if key == header::UPGRADE {
            present |= UPGRADE_BIT;
        }
    }
    present
}

/// Removes hop-by-hop headers, including any named in `Connection`. For an upgrade, keeps
/// `Upgrade` and sets `Connection: upgrade` so the upstream sees the handshake. Returns true
/// when `Connection` named other headers (which are gone now, whatever their names).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) -> bool {
    let present = hop_by_hop_present(headers);
    let mut named = false;
    if present & CONNECTION_BIT != 0 {
        // Most requests carry at most `Connection: keep-alive`; only other tokens need a list.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
                    && !t.is_empty()
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        named = !listed.is_empty();
        for name in listed {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for (i, name) in hop_by_hop().into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
    named
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// Methods the proxy forwards, for the `Allow` header of a 405.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Why a request head is refused before it is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// CONNECT and TRACE: a reverse proxy opens no tunnels and echoes no requests (405).
    MethodNotAllowed,
    /// A head that RFC 9112 requires a server to refuse (400); the text says why.
    BadRequest(&'static str),
}

/// The strict checks on a request head (RFC 9112 3.2, RFC 9113 8.3.1), without allocating:
/// CONNECT and TRACE, more than one Host, HTTP/1.1 without Host, a Host that is not a valid
/// authority, and a Host that disagrees with the URI's authority (absolute-form, HTTP/2).
pub fn refuse(
    method: &Method,
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Refusal> {
    if method == Method::CONNECT || method == Method::TRACE {
        return Some(Refusal::MethodNotAllowed);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some(Refusal::BadRequest("400 more than one Host header\n"));
    }
    let Some(host) = host else {
        return (version == Version::HTTP_11).then_some(Refusal::BadRequest(
            "400 HTTP/1.1 request without a Host header\n",
        ));
    };
    let valid = host.as_bytes().iter().all(|&b| HOST_BYTES[usize::from(b)]);
    if !valid {
        return Some(Refusal::BadRequest("400 invalid Host header\n"));
    }
    // RFC 9112 3.2.2 lets a server ignore Host when the target is absolute. At the edge a
    // disagreement is refused instead (as HAProxy does): a request that names two hosts is
    // either broken or probing for the one component that reads the other name.
    if let Some(authority) = uri.authority() {
        // Valid bytes are ASCII, so this is a str.
        let host = host.to_str().unwrap_or("");
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let (ah, ap) = split_host_port(authority.as_str());
        let (hh, hp) = split_host_port(host);
        let port = |p: Option<&str>| match p {
            None => Some(default_port),
            // Numbers, so `080` is `80`; digits only, as `u16::from_str` would take `+80`.
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse::<u16>().ok(),
            Some(_) => None,
        };
        let same_port = matches!((port(ap), port(hp)), (Some(a), Some(b)) if a == b);
        if !ah.eq_ignore_ascii_case(hh) || !same_port {
            return Some(Refusal::BadRequest(
                "400 the Host header disagrees with the request target\n",
            ));
        }
    }
    None
}

/// The bytes a Host header may hold (an authority: RFC 3986 reg-name, IP literal, port), as a
/// table: one load per byte instead of a search through the punctuation.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let punct = b"-._~!$&'()*+,;=:[]%";
    let mut i = 0;
    while i < punct.len() {
        t[punct[i] as usize] = true;
        i += 1;
    }
    t
};

/// `host[:port]` or `[v6][:port]` (a trailing dot on the host is ignored).
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    let (h, p) = if s.starts_with('[') {
        match s.find(']') {
            Some(i) => (&s[..=i], s[i + 1..].strip_prefix(':')),
            None => (s, None),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    (
        h.strip_suffix('.').unwrap_or(h),
        p.filter(|p| !p.is_empty()),
    )
}

/// True when `e`, returned by an upstream send, was caused by the client's request body (bad
/// chunked framing, a body cut short) rather than by the upstream: hyper reports an error of
/// the body it was given as a "user" error whose source is the server side's body error.
pub fn is_client_body_error(e: &hyper::Error) -> bool {
    e.is_user()
        && std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<hyper::Error>().is_some())
}

/// True for an HTTP/1 request whose body is chunked (no length known up front): the one body
/// whose framing the proxy must see before anything goes upstream.
pub fn has_chunked_body(version: Version, headers: &HeaderMap) -> bool {
    version <= Version::HTTP_11 && headers.contains_key(header::TRANSFER_ENCODING)
}

/// The headers whose meaning the proxy decides (see the module doc).
const MANAGED: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// True when `name` (lowercase, as `HeaderName` keeps it) has a `_` and reads as a managed
/// header once every `_` is read as `-`.
fn is_underscore_alias(name: &str) -> bool {
    name.contains('_')
        && MANAGED.iter().any(|m| {
            m.len() == name.len()
                && m.bytes()
                    .zip(name.bytes())
                    .all(|(m, n)| m == n || (m == b'-' && n == b'_'))
        })
}

/// Removes the underscore spellings of the managed headers (see the module doc). Only scans
/// names for `_`; allocates only when there is one to remove.
fn remove_underscore_aliases(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| is_underscore_alias(k.as_str())) {
        return;
    }
    let aliases: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_underscore_alias(k.as_str()))
        .cloned()
        .collect();
    for name in aliases {
        headers.remove(&name);
    }
}

/// A connection's immediate peer, with its address already written out as `X-Forwarded-For`
/// carries it. Formatting an address cost more than the rest of the header rewrite (about 1,400
/// instructions of 4,900, see docs/profile.md), and it is the same for every request on the
/// connection, so it is done once, at accept.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The IP, IPv4-mapped addresses written as IPv4.
    ip_text: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let text = addr.ip().to_canonical().to_string();
        Peer {
            addr,
            // An IP address's text is always a valid header value.
            ip_text: HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

/// A fresh request id: 128 random bits as 32 hex characters.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let v = fastrand::u128(..);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((v >> (i * 4)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value. An owned array rather than a Vec: a Vec's
    // bytes are moved to a shared allocation on their first clone (a replay's copy of the head,
    // in `proxy`), an owner's are counted from the start.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Rewrites a downstream request's head for the upstream: HTTP/1.1, origin-form URI, Host kept,
/// hop-by-hop headers stripped, forwarded headers set by the policy in the module doc (`peer`
/// is the immediate peer, trusted or not), X-Request-Id set.
pub fn prepare_upstream(
    parts: &mut Parts,
    peer: &Peer,
    proto: &'static str,
    trusted: &TrustedProxies,
    upgrade: bool,
) {
    // HTTP/1.1 carries the Host header (cloning a HeaderValue is a reference count); HTTP/2 and
    // absolute-form requests carry the authority in the URI.
    let from_uri = parts.uri.authority().is_some();
    let host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    // First, so that a client cannot name a forwarded header in `Connection` to drop the one
    // the proxy sets.
    let named = strip_hop_by_hop(&mut parts.headers, upgrade);
    let trusted = !trusted.is_empty() && trusted.contains(peer.ip());
    if let Some(host) = host {
        if !trusted || !parts.headers.contains_key(&X_FORWARDED_HOST) {
            parts.headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        // A Host header is still in place unless `Connection` named it.
        if from_uri || named {
            parts.headers.insert(header::HOST, host);
        }
    } else if !trusted {
        parts.headers.remove(&X_FORWARDED_HOST);
    }
    if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = pq.parse() {
            parts.uri = u;
        }
    }
    parts.version = Version::HTTP_11;
    let xff = if trusted {
        // Every X-Forwarded-For line the trusted hop sent, in order, then the hop itself.
        let mut xff = String::new();
        for prev in parts.headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(prev) = prev.to_str() {
                if !prev.trim().is_empty() {
                    xff.push_str(prev.trim());
                    xff.push_str(", ");
                }
            }
        }
        xff.push_str(peer.ip_text.to_str().unwrap_or(""));
        // from_maybe_shared takes the buffer without copying it again.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)).ok()
    } else {
        for name in [&X_REAL_IP, &FORWARDED] {
            if parts.headers.contains_key(name) {
                parts.headers.remove(name);
            }
        }
        // A reference count, not a copy.
        Some(peer.ip_text.clone())
    };
    remove_underscore_aliases(&mut parts.headers);
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !trusted || !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    // One lookup for both the check and the insert.
    parts
        .headers
        .entry(&X_REQUEST_ID)
        .or_insert_with(new_request_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut p = parts(
            Request::get("/x")
                .header("host", "a.test")
                .header("connection", "keep-alive, x-secret-hop")
                .header("keep-alive", "timeout=5")
                .header("x-secret-hop", "1")
                .header("te", "trailers")
                .header("upgrade", "h2c")
                .header("x-app", "kept")
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), false);
        for h in ["connection", "keep-alive", "x-secret-hop", "te", "upgrade"] {
            assert!(!p.headers.contains_key(h), "{h} was forwarded");
        }
        assert_eq!(p.headers["x-app"], "kept");
        assert_eq!(p.headers["host"], "a.test");
        assert_eq!(p.headers["x-forwarded-host"], "a.test");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.9");
        assert_eq!(p.headers["x-request-id"].len(), 32);
    }

    fn peer(ip: &str) -> Peer {
        Peer::new(SocketAddr::new(ip.parse().unwrap(), 50000))
    }

    fn edge() -> TrustedProxies {
        TrustedProxies::default()
    }

    fn spoofed() -> Parts {
        parts(
            Request::get("/")
                .header("host", "a.test")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-for", "7.7.7.7")
                .header("x-real-ip", "6.6.6.6")
                .header("forwarded", "for=6.6.6.6;proto=https")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "evil.test")
                .header("x-request-id", "abc")
                .body(())
                .unwrap(),
        )
    }

    #[test]
    fn edge_mode_vouches_only_for_what_the_proxy_saw() {
        let mut p = spoofed();
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), false);
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.9");
        assert_eq!(p.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "a.test");
        assert!(!p.headers.contains_key("x-real-ip"));
        assert!(!p.headers.contains_key("forwarded"));
        assert_eq!(p.headers["x-request-id"], "abc");
        // A peer outside the trusted networks gets the same.
        let mut p = spoofed();
        let trusted = TrustedProxies::parse("192.0.2.0/24").unwrap();
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &trusted, false);
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.9");
        assert!(!p.headers.contains_key("x-real-ip"));
        // Naming a forwarded header in Connection does not remove the proxy's own.
        let mut p = parts(
            Request::get("/")
                .header("host", "a.test")
                .header("connection", "x-forwarded-for, x-forwarded-proto")
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), false);
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.9");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
    }

    /// A request with the managed headers spelled with underscores, as CGI-style apps would
    /// read them, and two headers that only look alike.
    fn underscored() -> Parts {
        parts(
            Request::get("/")
                .header("host", "a.test")
                .header("x_real_ip", "6.6.6.6")
                .header("X_Forwarded_For", "6.6.6.6")
                .header("x-forwarded_proto", "https")
                .header("x_forwarded_host", "evil.test")
                .header("x_request_id", "kept")
                .header("x_real_ip_extra", "kept")
                .body(())
                .unwrap(),
        )
    }

    #[test]
    fn underscore_spellings_of_managed_headers_are_removed_in_both_modes() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").unwrap();
        for mode in [edge(), trusted] {
            let mut p = underscored();
            prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &mode, false);
            for h in [
                "x_real_ip",
                "x_forwarded_for",
                "x-forwarded_proto",
                "x_forwarded_host",
            ] {
                assert!(!p.headers.contains_key(h), "{h} was forwarded ({mode:?})");
            }
            assert_eq!(p.headers["x_request_id"], "kept");
            assert_eq!(p.headers["x_real_ip_extra"], "kept");
            assert_eq!(p.headers["x-forwarded-for"], "10.0.0.9");
        }
        assert!(!is_underscore_alias("x-real-ip"));
        assert!(!is_underscore_alias("x_real_ipx"));
        assert!(is_underscore_alias("x_real-ip"));
    }

    #[test]
    fn a_trusted_peer_is_appended_and_its_headers_kept() {
        let trusted = TrustedProxies::parse("192.0.2.0/24, 10.0.0.0/8").unwrap();
        let mut p = spoofed();
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &trusted, false);
        assert_eq!(p.headers["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 10.0.0.9");
        assert_eq!(p.headers["x-forwarded-proto"], "https");
        assert_eq!(p.headers["x-forwarded-host"], "evil.test");
        assert_eq!(p.headers["x-real-ip"], "6.6.6.6");
        assert_eq!(p.headers["forwarded"], "for=6.6.6.6;proto=https");
        // Missing ones are filled in; an IPv4-mapped peer is written as IPv4.
        let mut p = parts(Request::get("/").header("host", "a.test").body(()).unwrap());
        prepare_upstream(&mut p, &peer("::ffff:10.1.2.3"), "http", &trusted, false);
        assert_eq!(p.headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "a.test");
    }

    #[test]
    fn strict_request_heads() {
        fn check(req: Request<()>) -> Option<Refusal> {
            let p = parts(req);
            refuse(&p.method, p.version, &p.uri, &p.headers)
        }
        let ok = Request::get("/").header("host", "a.test").body(()).unwrap();
        assert_eq!(check(ok), None);
        for m in ["CONNECT", "TRACE"] {
            let r = Request::builder()
                .method(m)
                .uri("/")
                .header("host", "a.test");
            assert_eq!(check(r.body(()).unwrap()), Some(Refusal::MethodNotAllowed));
        }
        let two = Request::get("/")
            .header("host", "a.test")
            .header("host", "b.test")
            .body(())
            .unwrap();
        assert!(matches!(check(two), Some(Refusal::BadRequest(t)) if t.contains("more than one")));
        let none = Request::get("/").body(()).unwrap();
        assert!(
            matches!(check(none), Some(Refusal::BadRequest(t)) if t.contains("without a Host"))
        );
        let old = Request::get("/")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(check(old), None);
        let bad = Request::get("/")
            .header("host", "a.test/x")
            .body(())
            .unwrap();
        assert!(matches!(check(bad), Some(Refusal::BadRequest(_))));
        let differs = Request::get("http://a.test/")
            .header("host", "b.test")
            .body(())
            .unwrap();
        assert!(matches!(check(differs), Some(Refusal::BadRequest(t)) if t.contains("disagrees")));
        for (uri, host) in [
            ("http://A.test/", "a.test"),
            ("http://a.test:80/", "a.test"),
            ("http://a.test/", "a.test:80"),
            ("http://[::1]:8080/", "[::1]:8080"),
            // Ports are numbers.
            ("http://a.test:80/", "a.test:080"),
            ("http://a.test:0080/", "a.test"),
        ] {
            let same = Request::get(uri).header("host", host).body(()).unwrap();
            assert_eq!(check(same), None, "{uri} {host}");
        }
        let port = Request::get("http://a.test:8080/")
            .header("host", "a.test")
            .body(())
            .unwrap();
        assert!(matches!(check(port), Some(Refusal::BadRequest(_))));
        for host in ["a b.test", "a.test\t", "ä.test", "a.test/"] {
            let bad = Request::get("/").header("host", host).body(()).unwrap();
            assert!(matches!(check(bad), Some(Refusal::BadRequest(_))), "{host}");
        }
        let odd_ok = Request::get("/")
            .header("host", "[::1]:8080")
            .body(())
            .unwrap();
        assert_eq!(check(odd_ok), None);
        for host in ["a.test:+80", "a.test:x", "a.test:99999"] {
            let odd = Request::get("http://a.test/")
                .header("host", host)
                .body(())
                .unwrap();
            assert!(matches!(check(odd), Some(Refusal::BadRequest(_))), "{host}");
        }
        // HTTP/2 carries the authority alone.
        let h2 = Request::get("http://a.test/")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(check(h2), None);
    }

    #[test]
    fn http2_authority_becomes_host_and_origin_form() {
        let mut p = parts(
            Request::get("http://b.test:8080/p?q=1")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), false);
        assert_eq!(p.uri, "/p?q=1");
        assert_eq!(p.headers["host"], "b.test:8080");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn upgrades_keep_the_handshake() {
        let mut p = parts(
            Request::get("/ws")
                .header("host", "a.test")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        assert!(is_upgrade(p.version, &p.headers));
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), true);
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["connection"], "upgrade");
    }

    #[test]
    fn naming_host_in_connection_does_not_drop_it() {
        let mut p = parts(
            Request::get("/")
                .header("host", "a.test")
                .header("connection", "host, close")
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, &peer("10.0.0.9"), "http", &edge(), false);
        assert_eq!(p.headers["host"], "a.test");
        assert_eq!(p.headers.get_all("host").iter().count(), 1);
        assert!(!p.headers.contains_key("connection"));
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header() {
        // A response head: no Connection, but framing and upgrade headers of its own hop.
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h.len(), 1);
        assert_eq!(h["content-type"], "text/plain");
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .as_bytes()
            .iter()
            .all(|b| b"0123456789abcdef".contains(b)));
    }
}
