//! Runtime settings of the proxy server, with the defaults used inside the container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Public HTTP listener.
    pub http_addr: SocketAddr,
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
    pub access_log: bool,
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http_addr: ([0, 0, 0, 0], 8080).into(),
            admin_addr: ([127, 0, 0, 1], 9090).into(),
            state_dir: PathBuf::from("/var/lib/luma-proxy"),
            token_file: None,
            dns: ([127, 0, 0, 11], 53).into(),
            self_name: crate::resolve::default_self_name(),
            access_log: true,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 64 * 1024,
            shutdown_timeout: Duration::from_secs(30),
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
