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
//! That interface is cached per network, so the proxy's own name is asked once per network,
//! not once per re-resolve. A cached entry is only a hint, checked on every use:
//! - it must still be the very interface it was learnt as: the same name with the same kernel
//!   index (one read of `/sys/class/net/<name>/ifindex`; a reconnect, or a network that took
//!   the name over, makes a new interface with a new index), or where sysfs cannot be read,
//!   the same name, address and prefix in a listing. The proxy may have been disconnected,
//!   and the name or the subnet handed to another network's interface since. A stale entry is
//!   dropped and learnt again;
//! - every address of the answer must lie in its subnet. An answer with an address outside it
//!   (the network may have been created again elsewhere) is judged once more against the
//!   interface learnt afresh; still outside, it is refused. An empty answer (an app stopped or
//!   scaled to 0) fits: it pins nothing, and the entry stays, so a route waiting for its
//!   containers costs one query per retry;
//! - a failure on a route's backends (see `service`) and a deploy's gate learn it afresh: one
//!   query each, when the network is most likely to have changed;
//! - an entry goes when the last route on its network does (`deploy` keeps the cache to the
//!   networks of live routes), so the cache never outlives the routes that use it.
//!
//! Why a route cannot reach another project's network through the cache: sockets are pinned to
//! an entry's interface only while it is the interface the proxy's own name on this network
//! pointed to when it was learnt, and only to answer addresses inside its subnet. An interface
//! connected to another network since is another kernel interface (a new index), so its entry
//! is dropped, whatever name, address and subnet it took over, and learning it again asks the
//! network (`<self-name>.<network>.`), which then fails (the proxy left it) or finds the right
//! one. Without sysfs the comparison falls back to name, address and prefix, which such an
//! interface passes only if the route's network was removed (or the proxy left it) and its
//! subnet, name and address were all handed on (Docker refuses overlapping subnets on one
//! engine); Docker's DNS answers `<alias>.<network>.` from that network's own records alone,
//! so the route's answers then come from the upstream resolvers (NXDOMAIN: no backend), and
//! only an upstream resolver answering inside another project's subnet could steer it, as it
//! could answer the self-name query of a fresh look-up.
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
/// The longest background pace accepted: the round is what finds containers changed by hand
/// without a flush, and a bound keeps every deadline derived from it far from overflow.
pub const MAX_REFRESH_EVERY: Duration = Duration::from_secs(3600);

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
    interfaces: Mutex<HashMap<Box<str>, Cached>>,
    refresh_every: Duration,
}

/// A cached interface and the kernel's index of it when it was learnt (None: sysfs could not
/// say, and every use compares against a listing instead).
#[derive(Clone, Debug, PartialEq)]
struct Cached {
    iface: Interface,
    ifindex: Option<u32>,
}

/// Whether an answer lies wholly inside `iface`'s subnet, so a cached interface may pin it
/// without asking for the proxy's own name again. An empty answer fits: it pins nothing (an
/// app stopped or scaled to 0), and whether the interface is still there is
/// [`Resolver::verified_interface`]'s job.
pub fn answer_fits(iface: &Interface, ips: &[Ipv4Addr]) -> bool {
    ips.iter().all(|ip| iface.contains(IpAddr::V4(*ip)))
}

/// Whether a cached interface is still one of `local`: same name, address and prefix. A
/// missing name (the proxy was disconnected) or the name on another address or prefix (handed
/// to another network's interface, or the network created again) fails.
pub fn still_local(cached: &Interface, local: &[Interface]) -> bool {
    local.iter().any(|i| i == cached)
}

/// The kernel's index of interface `name`, from `/sys/class/net/<name>/ifindex` (Docker mounts
/// a sysfs of the container's own network namespace). One small file read: 8 µs measured,
/// against 2.1 ms for a `getifaddrs` listing of 200 interfaces.
pub fn ifindex(name: &str) -> std::io::Result<u32> {
    // Interface names cannot hold '/', but this one came from outside the process.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is no interface name"),
        ));
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/sys/class/net/{name}/ifindex holds {text:?}, not a number"),
        )
    })
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

    /// Sets the background re-resolve pace of every route (`--refresh-every`), kept between
    /// [`MIN_REFRESH_EVERY`] and [`MAX_REFRESH_EVERY`] (the flag refuses values outside; this
    /// clamps what a library caller passes).
    pub fn refreshing_every(mut self, every: Duration) -> Resolver {
        self.refresh_every = every.clamp(MIN_REFRESH_EVERY, MAX_REFRESH_EVERY);
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

    /// Drops the cached interfaces of networks for which `keep` is false (`deploy` keeps the
    /// networks of live routes).
    pub fn retain_interfaces(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut m) = self.interfaces.lock() {
            m.retain(|network, _| keep(network));
        }
    }

    /// The cached interface on `network`, if any, unchecked.
    pub fn cached_interface(&self, network: &str) -> Option<Interface> {
        self.cached(network).map(|c| c.iface)
    }

    fn cached(&self, network: &str) -> Option<Cached> {
        self.interfaces
            .lock()
            .ok()
            .and_then(|m| m.get(network).cloned())
    }

    /// Caches `iface`, found in a listing a moment ago, as the proxy's interface on `network`,
    /// with the kernel's index of it (`ifindex`: None reads it now). Public so that tests can
    /// plant a stale entry; the proxy itself only caches what it has learnt.
    #[doc(hidden)]
    pub fn remember_interface(&self, network: &str, iface: &Interface, ifindex: Option<u32>) {
        // Read after the listing: the interface would have to be deleted and created again
        // under the same name between the two (Docker takes a tenth of a second to connect a
        // network) for the index to belong to another interface than the listing showed.
        let ifindex = ifindex.or_else(|| self::ifindex(&iface.name).ok());
        if let Ok(mut m) = self.interfaces.lock() {
            m.insert(
                network.into(),
                Cached {
                    iface: iface.clone(),
                    ifindex,
                },
            );
        }
    }

    /// The cached interface on `network` if it is still the local interface it was learnt as
    /// (module doc); a stale one is dropped (unless another resolve replaced it meanwhile) and
    /// `None` returned.
    ///
    /// The check is one read of `/sys/class/net/<name>/ifindex` (not a listing of every
    /// interface, 2.1 ms at 200 of them): the same name with the same index is the same kernel
    /// interface, so its address and prefix are the ones the listing showed when it was learnt
    /// (Docker addresses an endpoint's interface when it creates it, and a disconnect deletes
    /// it; a reconnect creates a new one, with a new index, whatever its name and address). That
    /// is stricter than comparing name, address and prefix, which a network that took over the
    /// name and subnet would pass. Without sysfs the entry is compared to a listing.
    pub fn verified_interface(&self, network: &str) -> Result<Option<Interface>, String> {
        let Some(cached) = self.cached(network) else {
            return Ok(None);
        };
        let live = match cached.ifindex {
            // Gone (NotFound) or unreadable: learnt again, which compares to a listing if
            // sysfs cannot be read then either.
            Some(index) => ifindex(&cached.iface.name).ok() == Some(index),
            None => {
                let local = local_interfaces().map_err(|e| format!("list interfaces: {e}"))?;
                still_local(&cached.iface, &local)
            }
        };
        if live {
            return Ok(Some(cached.iface));
        }
        if let Ok(mut m) = self.interfaces.lock() {
            if m.get(network) == Some(&cached) {
                m.remove(network);
            }
        }
        Ok(None)
    }

    /// Looks the interface up (a DNS query and an interface listing) and caches it.
    async fn learn_interface(&self, network: &str) -> Result<Interface, String> {
        let found = self.interface_for(network).await;
        match &found {
            Ok(iface) => self.remember_interface(network, iface, None),
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
                let cached = self.verified_interface(network)?;
                let mut iface = match &cached {
                    Some(i) => i.clone(),
                    None => self.learn_interface(network).await?,
                };
                // A failed look-up says nothing about the interface (just verified): the entry
                // stays, and the route keeps its last set (see `service`).
                let ips = self.lookup_v4(&format!("{name}.{network}.")).await?;
                // An address outside the cached interface's subnet may mean the network was
                // created again: judge the same answer against a fresh one (module doc).
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
    fn only_an_answer_inside_the_subnet_fits_a_cached_interface() {
        let iface = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 24,
        };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(answer_fits(&iface, &[ip("172.20.0.9"), ip("172.20.0.10")]));
        // Empty (an app scaled to 0) pins nothing, so it fits: no re-learn on every retry.
        assert!(answer_fits(&iface, &[]));
        // Mixed or outside: maybe a recreated network.
        assert!(!answer_fits(&iface, &[ip("172.20.0.9"), ip("172.20.1.9")]));
        assert!(!answer_fits(&iface, &[ip("10.0.0.1")]));
    }

    #[test]
    fn a_cached_interface_must_still_exist_with_its_name_address_and_prefix() {
        let eth1 = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 24,
        };
        let local = vec![
            Interface {
                name: "lo".into(),
                addr: Ipv4Addr::LOCALHOST,
                prefix: 8,
            },
            eth1.clone(),
        ];
        assert!(still_local(&eth1, &local));
        let with = |name: &str, addr: &str, prefix: u8| Interface {
            name: name.into(),
            addr: addr.parse().unwrap(),
            prefix,
        };
        // Disconnected: the name is gone, or another network's interface took it.
        assert!(!still_local(&with("eth2", "172.20.0.5", 24), &local));
        assert!(!still_local(&with("eth1", "172.20.0.6", 24), &local));
        assert!(!still_local(&with("eth1", "172.20.0.5", 16), &local));
        assert!(!still_local(&eth1, &local[..1]));
    }

    fn lo() -> Interface {
        local_interfaces()
            .unwrap()
            .into_iter()
            .find(|i| i.addr == Ipv4Addr::LOCALHOST)
            .expect("no 127.0.0.1 interface")
    }

    #[tokio::test]
    async fn a_cached_interface_is_checked_by_its_kernel_index() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        let lo = lo();
        let index = ifindex(&lo.name).expect("no sysfs index for lo");
        r.remember_interface("net-a", &lo, None);
        assert_eq!(r.cached("net-a").unwrap().ifindex, Some(index));
        assert_eq!(r.verified_interface("net-a"), Ok(Some(lo.clone())));
        assert_eq!(r.cached_interface("net-a"), Some(lo.clone()));
        // The name on another interface (an interface created again, or a network that took
        // the name over), or a name that is gone: stale, dropped.
        for (stale, index) in [
            (lo.clone(), Some(index.wrapping_add(100_000))),
            (
                Interface {
                    name: "luma-gone0".into(),
                    ..lo.clone()
                },
                Some(index),
            ),
            (
                Interface {
                    name: "luma-gone0".into(),
                    ..lo.clone()
                },
                None,
            ),
        ] {
            r.remember_interface("net-a", &stale, index);
            assert_eq!(
                r.verified_interface("net-a"),
                Ok(None),
                "{stale:?} {index:?}"
            );
            assert_eq!(r.cached_interface("net-a"), None, "{stale:?} kept");
        }
        assert_eq!(r.verified_interface("net-a"), Ok(None));
        assert!(ifindex("../lo").is_err() && ifindex("").is_err());
    }

    #[tokio::test]
    async fn without_sysfs_a_cached_interface_is_compared_to_a_listing() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        let lo = lo();
        // What an entry learnt where sysfs could not be read holds.
        let plant = |iface: &Interface| {
            r.interfaces.lock().unwrap().insert(
                "net-a".into(),
                Cached {
                    iface: iface.clone(),
                    ifindex: None,
                },
            );
        };
        plant(&lo);
        assert_eq!(r.verified_interface("net-a"), Ok(Some(lo.clone())));
        for stale in [
            Interface {
                addr: "127.0.0.77".parse().unwrap(),
                ..lo.clone()
            },
            Interface {
                prefix: 16,
                ..lo.clone()
            },
            Interface {
                name: "luma-gone0".into(),
                ..lo.clone()
            },
        ] {
            plant(&stale);
            assert_eq!(r.verified_interface("net-a"), Ok(None), "{stale:?}");
            assert_eq!(r.cached_interface("net-a"), None, "{stale:?} kept");
        }
    }

    #[tokio::test]
    async fn the_cache_keeps_only_the_networks_it_is_told_to() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        let i = Interface {
            name: "eth1".into(),
            addr: "172.20.0.5".parse().unwrap(),
            prefix: 24,
        };
        for n in ["a", "b", "c"] {
            r.remember_interface(n, &i, Some(7));
        }
        r.retain_interfaces(|n| n != "b");
        assert!(r.cached_interface("a").is_some());
        assert!(r.cached_interface("b").is_none());
        assert!(r.cached_interface("c").is_some());
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
        r.remember_interface("net-a", &a, Some(7));
        r.remember_interface("net-b", &b, Some(8));
        assert_eq!(r.cached_interface("net-a"), Some(a));
        r.forget_interface("net-a");
        assert_eq!(r.cached_interface("net-a"), None);
        assert_eq!(r.cached_interface("net-b"), Some(b));
    }

    #[tokio::test]
    async fn the_background_pace_has_a_floor_and_a_ceiling() {
        let r = Resolver::new("127.0.0.1:1".parse().unwrap(), "x".into()).unwrap();
        assert_eq!(r.refresh_every(), DEFAULT_REFRESH_EVERY);
        let r = r.refreshing_every(Duration::from_millis(10));
        assert_eq!(r.refresh_every(), MIN_REFRESH_EVERY);
        let r = r.refreshing_every(Duration::MAX);
        assert_eq!(r.refresh_every(), MAX_REFRESH_EVERY);
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
