//! The boundary between `luma` (the CLI) and `luma-proxy`, as types.
//!
//! Both sides compile against this crate and nothing else of each other: the CLI never links
//! the proxy (hyper, hickory, sockets), and the proxy never parses argv built by the CLI. What
//! crosses the boundary is one [`Request`] value and one [`Envelope`] reply, as JSON, through
//! `docker exec -i <proxy> luma-proxy call` (stdin in, stdout out), so the proxy still needs no
//! docker.sock.
//!
//! - [`names`]: the one definition of a valid project, app, release, alias and host.
//! - [`route`]: what a route is ([`route::RouteSpec`]), validated once at the door.
//! - [`messages`]: each admin operation, its reply type, and [`ApiError`], which says whether
//!   the world changed.
//! - [`net`]: IP networks (CIDRs) in the proxy's settings, such as its trusted proxies.
//! - [`tls`]: a route's HTTPS settings, the certificate state the proxy reports, and a
//!   project's shared ACME account key.

pub mod messages;
pub mod names;
pub mod net;
pub mod route;
pub mod time;
pub mod tls;

pub use messages::*;

use std::time::Duration;

/// Parses a human duration: `250ms`, `2s`, `1m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 2s, 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid duration {s:?}: too long")),
        _ => Err(format!(
            "invalid duration {s:?}: unit must be ms, s or m (e.g. 500ms, 2s, 1m)"
        )),
    }
}
