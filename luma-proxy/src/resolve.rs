//! Project-scoped name resolution through Docker's embedded DNS.
//!
//! A bare `web` asked of Docker's DNS from a container on several networks is answered from one
//! network only (the first by name), which is the bug this proxy exists to fix. So an alias is
//! always asked as `<alias>.<network>.`, fully qualified. Docker forwards a query for a network
//! the proxy is not on to the upstream resolvers instead of refusing it, so every answer is
//! checked against the subnet of the proxy's own interface on that network, and that interface is
//! what upstream sockets get pinned to.
//!
//! The proxy finds its interface on a network by asking for its own name there
//! (`<self-name>.<network>.`, by default its hostname, which Docker registers as an alias on
//! every user network) and matching the answer to a local interface address. No docker.sock.
//!
//! That interface is cached per network, so a re-resolve in the steady state is one DNS query
//! and no interface listing (at 200 networks `getifaddrs` lists 200 interfaces). The cache
//! cannot be trusted blindly: the proxy may be disconnected and reconnected (a new interface,
//! maybe a new name), and a network may be removed and created again (maybe a new subnet). So
//! an entry is dropped, and learnt again on next use, when:
//! - a look-up on that network fails;
//! - an answer does not fit it: empty (a detached proxy gets an empty answer, forwarded
//!   upstream) or with an address outside its subnet. The same answer is then judged against
//!   the interface learnt afresh, so this costs one query more, not a second alias query;
//! - the caller says so: [`Resolver::forget_interface`] on a flush of the project, before a
//!   deploy's gate, and before a re-resolve woken by a failure (a stale interface name makes
//!   every connect fail, which is such a failure; see `service`).
//!
//! Docker refuses overlapping subnets on one engine, so a stale interface can only make
//! connects fail, never reach another project's container.
//!
//! hickory's cache is off: Docker answers with a 600 s TTL, and a cached answer would keep a
//! stopped container in rotation for ten minutes.
//!
//! Every look-up sent is counted in [`DNS_QUERIES`] (the `luma_proxy_dns_queries` metric), so
//! the DNS load at idle can be shown.

use crate::route::{Target, HOST_NETWORK};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// DNS look-ups sent by every [`Resolver`] of the process (one in the server): route aliases,
/// the proxy's own name per network, outside names. Process-wide so that `metrics` reads it
/// without being handed the resolver; a `Counter` is one shared atomic.
pub static DNS_QUERIES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// How often a started route re-resolves in the background by default (see `service`).
pub const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(30);
/// The shortest background pace accepted: the pace every route had before events drove it.
pub const MIN_REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The interface the proxy has on one Docker network.
#[derive(Clone, Debug, PartialEq)]
pub struct Interface {
    pub name: Arc<str>,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Interface {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => same_subnet(self.addr, v4, self.prefix),
            IpAddr::V6(_) => false,
        }
    }
}

pub fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    };
    (u32::from(a) & mask) == (u32::from(b) & mask)
}

/// The outcome of resolving a target: replica addresses and the interface to pin sockets to.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    pub addrs: Vec<SocketAddr>,
    pub device: Option<Arc<str>>,
}

pub struct Resolver {
    docker: TokioResolver,
    self_name: String,
    /// The proxy's interface per network, learnt on first use (see the module doc).
    interfaces: Mutex<HashMap<Box<str>, Interface>>,
    refresh_every: Duration,
}

/// Whether a non-empty answer lies wholly inside `iface`'s subnet: only then is a cached
/// interface trusted without asking again.
pub fn answer_fits(iface: &Interface, ips: &[Ipv4Addr]) -> bool {
    !ips.is_empty() && ips.iter().all(|ip| iface.contains(IpAddr::V4(*ip)))
}

impl Resolver {
    /// `dns` is Docker's embedded DNS (127.0.0.11:53 inside a container).
    pub fn new(dns: SocketAddr, self_name: String) -> Result<Resolver, String> {
        let mut ns = NameServerConfig::udp_and_tcp(dns.ip());
        for c in &mut ns.connections {
            c.port = dns.port();
        }
        let config = ResolverConfig::from_name_servers(vec![ns]);
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::from_secs(1));
        opts.negative_max_ttl = Some(Duration::from_secs(1));
        opts.timeout = Duration::from_millis(1500);
        opts.attempts = 2;
        opts.ndots = 0;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4Only;
        let docker = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot build DNS resolver for {dns}: {e}"))?;
        Ok(Resolver {
            docker,
            self_name,
            interfaces: Mutex::new(HashMap::new()),
            refresh_every: DEFAULT_REFRESH_EVERY,
        })
    }

    /// Sets the background re-resolve pace of every route (`--refresh-every`), at least
    /// [`MIN_REFRESH_EVERY`].
    pub fn refreshing_every(mut self, every: Duration) -> Resolver {
        self.refresh_every = every.max(MIN_REFRESH_EVERY);
        self
    }

    /// How long a started route trusts its last answer before asking again in the background
    /// (events re-resolve sooner; see `service`).
    pub fn refresh_every(&self) -> Duration {
        self.refresh_every
    }

    /// Drops anything hickory may hold (a no-op with the cache off, kept for safety on flush).
    pub fn flush(&self) {
        self.docker.clear_cache();
    }

    /// Forgets the proxy's interface on `network`; the next resolve there learns it again.
    pub fn forget_interface(&self, network: &str) {
        if let Ok(mut m) = self.interfaces.lock() {
            m.remove(network);
        }
    }

    /// The cached interface on `network`, if any.
    pub fn cached_interface(&self, network: &str) -> Option<Interface> {
        self.interfaces
            .lock()
            .ok()
            .and_then(|m| m.get(network).cloned())
    }

    fn remember_interface(&self, network: &str, iface: &Interface) {
        if let Ok(mut m) = self.interfaces.lock() {
            m.insert(network.into(), iface.clone());
        }
    }

    /// Looks the interface up (a DNS query and an interface listing) and caches it.
    async fn learn_interface(&self, network: &str) -> Result<Interface, String> {
        let found = self.interface_for(network).await;
        match &found {
            Ok(iface) => self.remember_interface(network, iface),
            Err(_) => self.forget_interface(network),
        }
        found
    }

    pub async fn resolve(&self, target: &Target, network: &str) -> Result<Resolution, String> {
        match target {
            Target::Literal(addrs) => Ok(Resolution {
                addrs: addrs.clone(),
                device: None,
            }),
            Target::Name { name, port } if network == HOST_NETWORK => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                    .await
                    .map_err(|e| format!("resolve {name}: {e}"))?
                    .collect();
                Ok(Resolution {
                    addrs,
                    device: None,
                })
            }
            Target::Name { name, port } => {
                let cached = self.cached_interface(network);
                let mut iface = match &cached {
                    Some(i) => i.clone(),
                    None => self.learn_interface(network).await?,
                };
                let ips = match self.lookup_v4(&format!("{name}.{network}.")).await {
                    Ok(ips) => ips,
                    Err(e) => {
                        self.forget_interface(network);
                        return Err(e);
                    }
                };
                // An answer that does not fit the cached interface may mean the interface is
                // stale: judge the same answer against a fresh one (module doc).
                if cached.is_some() && !answer_fits(&iface, &ips) {
                    self.forget_interface(network);
                    iface = self.learn_interface(network).await?;
                }
                let (inside, outside): (Vec<_>, Vec<_>) = ips
                    .into_iter()
                    .partition(|ip| iface.contains(IpAddr::V4(*ip)));
                if inside.is_empty() && !outside.is_empty() {
                    return Err(format!(
                        "{name}.{network}. answered {outside:?}, outside the proxy's subnet {}/{} on {network}: refusing a foreign answer",
                        iface.addr, iface.prefix
                    ));
                }
                let mut addrs: Vec<SocketAddr> = inside
                    .into_iter()
                    .map(|ip| SocketAddr::new(IpAddr::V4(ip), *port))
                    .collect();
                addrs.sort();
                Ok(Resolution {
                    addrs,
                    device: Some(iface.name),
                })
            }
        }
    }

    /// Finds the proxy's own interface on `network`, asking DNS and listing the local
    /// interfaces every time (no cache: resolves go through the cache, see the module doc).
    pub async fn interface_for(&self, network: &str) -> Result<Interface, String> {
        let me = self
            .lookup_v4(&format!("{}.{network}.", self.self_name))
            .await
            .map_err(|e| {
                format!("the proxy is not attached to network {network:?} (own name {:?} does not resolve there: {e}); connect it with `docker network connect {network} <proxy>`", self.self_name)
            })?;
        let local = local_interfaces().map_err(|e| format!("list interfaces: {e}"))?;
        me.iter()
            .find_map(|ip| local.iter().find(|i| i.addr == *ip).cloned())
            .ok_or_else(|| {
                format!(
                    "the proxy is not attached to network {network:?}: its name there resolves to {me:?}, which is no local interface address"
                )
            })
    }

    /// Addresses of an outside name (the ACME directory's host), asked of the same DNS server:
    /// Docker's, which answers container names and forwards the rest. IPv4 only, like every
    /// look-up here.
    pub async fn lookup_name(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        Ok(self
            .lookup_v4(&fqdn)
            .await?
            .into_iter()
            .map(IpAddr::V4)
            .collect())
    }

    async fn lookup_v4(&self, fqdn: &str) -> Result<Vec<Ipv4Addr>, String> {
        DNS_QUERIES.inc();
        match self.docker.lookup_ip(fqdn).await {
            Ok(l) => Ok(l
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(format!("DNS lookup {fqdn}: {e}")),
        }
    }
}

/// IPv4 interfaces of this network namespace.
pub fn local_interfaces() -> std::io::Result<Vec<Interface>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(Interface {
                name: Arc::from(i.name.as_str()),
                addr: v4.ip,
                prefix: u32::from(v4.netmask).count_ones() as u8,
            }),
            _ => None,
        })
        .collect())
}

/// The default name the proxy asks for to find itself on a network: its hostname.
pub fn default_self_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_filter_rejects_foreign_answers() {
        let iface = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 16,
        };
        assert!(iface.contains("172.20.9.9".parse().unwrap()));
        assert!(!iface.contains("172.21.0.2".parse().unwrap()));
        assert!(!iface.contains("8.8.8.8".parse().unwrap()));
        assert!(!iface.contains("::1".parse().unwrap()));
    }

    #[test]
    fn loopback_is_a_local_interface() {
        let l = local_interfaces().unwrap();
        assert!(l
            .iter()
            .any(|i| i.addr == Ipv4Addr::LOCALHOST && i.prefix == 8));
    }

    #[test]
    fn only_a_nonempty_answer_inside_the_subnet_fits_a_cached_interface() {
        let iface = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 24,
        };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(answer_fits(&iface, &[ip("172.20.0.9"), ip("172.20.0.10")]));
        // Empty: what a detached proxy gets; mixed or outside: maybe a recreated network.
        assert!(!answer_fits(&iface, &[]));
        assert!(!answer_fits(&iface, &[ip("172.20.0.9"), ip("172.20.1.9")]));
        assert!(!answer_fits(&iface, &[ip("10.0.0.1")]));
    }

    #[tokio::test]
    async fn the_interface_cache_is_per_network_and_forgets_on_demand() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        let a = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 24,
        };
        let b = Interface {
            name: "eth2".into(),
            addr: "172.21.0.5".parse().unwrap(),
            prefix: 24,
        };
        assert_eq!(r.cached_interface("net-a"), None);
        r.remember_interface("net-a", &a);
        r.remember_interface("net-b", &b);
        assert_eq!(r.cached_interface("net-a"), Some(a));
        r.forget_interface("net-a");
        assert_eq!(r.cached_interface("net-a"), None);
        assert_eq!(r.cached_interface("net-b"), Some(b));
    }

    #[tokio::test]
    async fn the_background_pace_has_a_floor() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        assert_eq!(r.refresh_every(), DEFAULT_REFRESH_EVERY);
        let r = r.refreshing_every(Duration::from_millis(10));
        assert_eq!(r.refresh_every(), MIN_REFRESH_EVERY);
    }

    #[tokio::test]
    async fn literal_targets_resolve_without_dns() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        let t = Target::parse("127.0.0.1:80,127.0.0.2:81").unwrap();
        let res = r.resolve(&t, HOST_NETWORK).await.unwrap();
        assert_eq!(res.addrs.len(), 2);
        assert_eq!(res.device, None);
    }
}
