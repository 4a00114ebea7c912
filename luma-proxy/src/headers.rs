//! Per-request header handling: hop-by-hop stripping, forwarding headers, request ids.
//!
//! Kept free of I/O so it can be unit-tested and benchmarked on its own.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Uri, Version};
use std::net::IpAddr;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection and must not be forwarded (RFC 9110 7.6.1). Typed
/// names, so removing them hashes nothing at run time.
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

/// Removes hop-by-hop headers, including any named in `Connection`. For an upgrade, keeps
/// `Upgrade` and sets `Connection: upgrade` so the upstream sees the handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
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
    for name in listed {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in hop_by_hop() {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if headers.contains_key(header::UPGRADE) {
        headers.remove(header::UPGRADE);
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// A fresh request id: 128 random bits as 32 hex characters.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let v = fastrand::u128(..);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((v >> (i * 4)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Rewrites a downstream request's head for the upstream: HTTP/1.1, origin-form URI, Host kept,
/// hop-by-hop headers stripped, X-Forwarded-* and X-Request-Id set.
pub fn prepare_upstream(parts: &mut Parts, client_ip: IpAddr, proto: &'static str, upgrade: bool) {
    // HTTP/1.1 carries the Host header (cloning a HeaderValue is a reference count); HTTP/2 and
    // absolute-form requests carry the authority in the URI.
    let host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(host) = host {
        parts.headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        parts.headers.insert(header::HOST, host);
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
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    // from_maybe_shared takes the buffer without copying it again.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        parts.headers.insert(X_REQUEST_ID.clone(), new_request_id());
    }
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
        prepare_upstream(&mut p, "10.0.0.9".parse().unwrap(), "http", false);
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

    #[test]
    fn appends_to_forwarded_for_and_keeps_request_id() {
        let mut p = parts(
            Request::get("/")
                .header("host", "a.test")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-request-id", "abc")
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, "10.0.0.9".parse().unwrap(), "http", false);
        assert_eq!(p.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(p.headers["x-request-id"], "abc");
    }

    #[test]
    fn http2_authority_becomes_host_and_origin_form() {
        let mut p = parts(
            Request::get("http://b.test:8080/p?q=1")
                .version(Version::HTTP_2)
                .body(())
                .unwrap(),
        );
        prepare_upstream(&mut p, "10.0.0.9".parse().unwrap(), "http", false);
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
        prepare_upstream(&mut p, "10.0.0.9".parse().unwrap(), "http", true);
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["connection"], "upgrade");
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
