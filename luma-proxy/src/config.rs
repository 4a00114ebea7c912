//! Runtime settings of the proxy server, with the defaults used inside the container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Public HTTP listener.
    pub http_addr: SocketAddr,
    /// Public HTTPS listener (certificates picked by SNI, see `tls`).
    pub https_addr: SocketAddr,
    /// The HTTPS port clients see (a 308 names it when it is not 443).
    pub https_public_port: u16,
    /// Time a client has to finish the TLS handshake once connected.
    pub tls_handshake_timeout: Duration,
    /// Where certificates of ACME routes come from.
    pub acme: AcmeSettings,
    /// Admin API listener; must be a loopback address.
    pub admin_addr: SocketAddr,
    /// Where routes and the admin token live (a volume in Docker).
    pub state_dir: PathBuf,
    /// Token file; defaults to `<state_dir>/admin.token`, generated on first start.
    pub token_file: Option<PathBuf>,
    /// Docker's embedded DNS.
    pub dns: SocketAddr,
    /// The name the proxy asks for to find its own interface on a network.
    pub self_name: String,
    /// Background re-resolve pace of every route, ±25% (events re-resolve at once; see
    /// `service`). At least [`crate::resolve::MIN_REFRESH_EVERY`].
    pub refresh_every: Duration,
    pub access_log: bool,
    /// Bytes of access lines that may wait for stdout; past it lines are dropped and counted
    /// (see `access`).
    pub access_log_buffer: usize,
    pub max_connections: usize,
    /// Time a client has to send a request head (slowloris guard). hyper starts this timer
    /// whenever an HTTP/1.1 connection waits for a request head, so it also bounds the idle time
    /// between keep-alive requests.
    pub header_read_timeout: Duration,
    /// A connection with no bytes either way for this long is closed (HTTP/2 and tunnels too).
    /// It must exceed every route's response timeout.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long SIGTERM waits for in-flight requests before exiting.
    pub shutdown_timeout: Duration,
    /// A new connection that sends no byte for this long is closed (capped at `idle_timeout`).
    pub first_byte_timeout: Duration,
    /// A plain HTTP/1.1 keep-alive connection that starts no request for this long releases
    /// hyper's state while it waits (`park`); zero never parks.
    pub park_after: Duration,
    /// Where the metrics listener (`GET /metrics`, no token) listens; see [`MetricsListen`].
    pub metrics: MetricsListen,
    /// Constant labels added to every metric (`--metrics-label name=value`).
    pub metrics_labels: Vec<(String, String)>,
    /// Peers whose forwarded headers are believed (a load balancer or CDN in front). Empty:
    /// edge mode for everyone (see `headers`).
    pub trusted_proxies: crate::headers::TrustedProxies,
    /// Accept routes to literal `ip:port` targets (tests and benchmarks). Off: every target is
    /// an alias resolved in its own project's network.
    pub allow_literal_targets: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http_addr: ([0, 0, 0, 0], 8080).into(),
            https_addr: ([0, 0, 0, 0], 8443).into(),
            https_public_port: 443,
            tls_handshake_timeout: Duration::from_secs(10),
            acme: AcmeSettings::default(),
            admin_addr: ([127, 0, 0, 1], 9090).into(),
            state_dir: PathBuf::from("/var/lib/luma-proxy"),
            token_file: None,
            dns: ([127, 0, 0, 11], 53).into(),
            self_name: crate::resolve::default_self_name(),
            refresh_every: crate::resolve::DEFAULT_REFRESH_EVERY,
            access_log: true,
            access_log_buffer: crate::access::DEFAULT_LIMIT,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 64 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(10),
            park_after: crate::park::PARK_AFTER,
            metrics: MetricsListen::Network {
                network: DEFAULT_METRICS_NETWORK.into(),
                port: DEFAULT_METRICS_PORT,
            },
            metrics_labels: Vec::new(),
            trusted_proxies: Default::default(),
            allow_literal_targets: false,
        }
    }
}

impl ProxyConfig {
    pub fn token_path(&self) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join(crate::token::TOKEN_FILE))
    }
}

/// Let's Encrypt's production directory, the default ACME directory (defined once, in
/// `luma_api`, so `luma` compares against the same value).
pub const LETS_ENCRYPT: &str = luma_api::tls::LETS_ENCRYPT_DIRECTORY;

/// ACME settings (`--acme-*`). Orders are placed per host in the background (see `tls::acme`).
#[derive(Clone, Debug)]
pub struct AcmeSettings {
    /// The directory URL; `None` turns ACME off (`--acme-directory off`).
    pub directory: Option<String>,
    /// Contact address given to the CA.
    pub email: Option<String>,
    /// Extra roots (PEM) trusted for the directory's HTTPS, next to the public web roots.
    pub ca_roots_pem: Option<String>,
    /// First wait after a failed attempt; doubles on every failure in a row up to `retry_max`.
    /// An attempt may place two orders (HTTP-01, then TLS-ALPN-01), so a short first wait
    /// would spend the hourly cap in minutes.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Orders one host may place in any hour.
    pub orders_per_hour: u32,
}

impl Default for AcmeSettings {
    fn default() -> Self {
        AcmeSettings {
            directory: Some(LETS_ENCRYPT.into()),
            email: None,
            ca_roots_pem: None,
            retry_min: Duration::from_secs(5 * 60),
            retry_max: Duration::from_secs(6 * 3600),
            orders_per_hour: 5,
        }
    }
}

impl AcmeSettings {
    /// ACME off: hosts of ACME routes stay HTTP only.
    pub fn off() -> AcmeSettings {
        AcmeSettings {
            directory: None,
            ..AcmeSettings::default()
        }
    }

    /// `off` or an `https://` URL.
    pub fn parse_directory(s: &str) -> Result<Option<String>, String> {
        let s = s.trim();
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        let uri: hyper::Uri = s
            .parse()
            .map_err(|e| format!("ACME directory {s:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(format!(
                "ACME directory {s:?} must be an https:// URL (or `off`)"
            ));
        }
        Ok(Some(s.to_string()))
    }

    /// True for the public CAs, which refuse reserved names (`.test`, `localhost`, IPs): hosts
    /// under those are reported HTTP only instead of burning orders. Any other directory (a
    /// private or test CA) may issue for any name.
    pub fn is_public_ca(&self) -> bool {
        let Some(d) = &self.directory else {
            return false;
        };
        let host = d
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.to_ascii_lowercase()))
            .unwrap_or_default();
        PUBLIC_CAS
            .iter()
            .any(|ca| host == *ca || host.ends_with(&format!(".{ca}")))
    }
}

/// Domains of public ACME CAs (see [`AcmeSettings::is_public_ca`]).
const PUBLIC_CAS: [&str; 5] = [
    "letsencrypt.org",
    "zerossl.com",
    "pki.goog",
    "buypass.com",
    "ssl.com",
];

/// The Docker network the metrics listener binds to by default.
pub const DEFAULT_METRICS_NETWORK: &str = "luma-metrics";
pub const DEFAULT_METRICS_PORT: u16 = 9100;

/// Where the metrics listener listens.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricsListen {
    /// No metrics listener (the admin API's `GET /metrics` still answers).
    Off,
    /// Exactly this address. `0.0.0.0:PORT` is reachable from every network the proxy is on,
    /// so every project's containers could read every project's per-backend series.
    Addr(SocketAddr),
    /// Only the proxy's own interface on this Docker network (`SO_BINDTODEVICE`), bound once
    /// the proxy is attached to it and re-bound if that interface changes.
    Network { network: String, port: u16 },
}

impl MetricsListen {
    /// `off`, `IP:PORT`, or `NETWORK:PORT`.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        let s = s.trim();
        if s == "off" {
            return Ok(MetricsListen::Off);
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(MetricsListen::Addr(a));
        }
        let (network, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("metrics address {s:?}: write NETWORK:PORT (e.g. {DEFAULT_METRICS_NETWORK}:{DEFAULT_METRICS_PORT}), IP:PORT or off"))?;
        let port: u16 = port.parse().map_err(|_| {
            format!("metrics address {s:?}: port {port:?} is not a number from 0 to 65535")
        })?;
        if !luma_api::names::is_dns_name(network) {
            return Err(format!(
                "metrics address {s:?}: {network:?} is not a Docker network name (letters, digits, '-', '.', '_')"
            ));
        }
        Ok(MetricsListen::Network {
            network: network.to_string(),
            port,
        })
    }
}

/// `--refresh-every`: a duration from [`crate::resolve::MIN_REFRESH_EVERY`] to
/// [`crate::resolve::MAX_REFRESH_EVERY`].
pub fn parse_refresh_every(s: &str) -> Result<Duration, String> {
    let d = crate::util::parse_duration(s)?;
    let (min, max) = (
        crate::resolve::MIN_REFRESH_EVERY,
        crate::resolve::MAX_REFRESH_EVERY,
    );
    if d < min {
        return Err(format!(
            "--refresh-every {s:?} is below {min:?}: routes re-resolve at once on deploys, flushes and failures, so the background pace only catches changes made by hand; use e.g. 30s"
        ));
    }
    if d > max {
        return Err(format!(
            "--refresh-every {s:?} is above {max:?}: the background round is what finds containers changed by hand without `luma-proxy flush`; use at most 60m (e.g. 30s, the default, or 10m)"
        ));
    }
    Ok(d)
}

/// `NAME=VALUE` for `--metrics-label`; the value may be anything, it is escaped on output.
pub fn parse_metrics_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("metrics label {s:?}: write NAME=VALUE"))?;
    crate::metrics::check_label_name(k)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_listen_parses_off_addresses_and_networks() {
        assert_eq!(MetricsListen::parse("off"), Ok(MetricsListen::Off));
        assert_eq!(
            MetricsListen::parse("0.0.0.0:9100"),
            Ok(MetricsListen::Addr("0.0.0.0:9100".parse().unwrap()))
        );
        assert_eq!(
            MetricsListen::parse("luma-metrics:9100"),
            Ok(MetricsListen::Network {
                network: "luma-metrics".into(),
                port: 9100
            })
        );
        assert!(MetricsListen::parse("luma-metrics").is_err());
        assert!(MetricsListen::parse("bad name:9100").is_err());
        assert!(MetricsListen::parse("net:99999").is_err());
        assert_eq!(
            parse_metrics_label("server=a=\"b\""),
            Ok(("server".into(), "a=\"b\"".into()))
        );
        assert!(parse_metrics_label("1x=a").is_err());
    }

    #[test]
    fn refresh_every_parses_with_a_floor_and_a_ceiling() {
        assert_eq!(parse_refresh_every("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_refresh_every("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_refresh_every("3600s"), Ok(Duration::from_secs(3600)));
        let e = parse_refresh_every("500ms").unwrap_err();
        assert!(e.contains("--refresh-every"), "{e}");
        // Above an hour (a huge value once overflowed the refresh tasks' deadlines).
        for huge in ["3601s", "61m", "18446744073709551615s"] {
            let e = parse_refresh_every(huge).unwrap_err();
            assert!(
                e.contains("--refresh-every") && e.contains("at most 60m"),
                "{e}"
            );
        }
        assert!(parse_refresh_every("soon").is_err());
    }

    #[test]
    fn acme_directories_parse_and_public_cas_are_known() {
        assert_eq!(AcmeSettings::parse_directory("off"), Ok(None));
        assert!(AcmeSettings::parse_directory("http://ca.test/dir").is_err());
        assert!(AcmeSettings::parse_directory("not a url").is_err());
        assert!(AcmeSettings::default().is_public_ca());
        let mut s = AcmeSettings {
            directory: AcmeSettings::parse_directory("https://pebble:14000/dir").unwrap(),
            ..AcmeSettings::default()
        };
        assert!(!s.is_public_ca());
        s.directory = Some("https://acme.zerossl.com/v2/DV90".into());
        assert!(s.is_public_ca());
        assert!(!AcmeSettings::off().is_public_ca());
    }
}
