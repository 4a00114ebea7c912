//! Project networks from a Luma-managed address pool: the pool, its subnets, and which of them
//! are free on a server.
//!
//! Why: a network created without a subnet takes one from Docker's default address pools,
//! which hold about 30 networks per engine (172.17-31.0.0/16 and 192.168.0.0/16 in /20s), and
//! every Luma project has a network: the 31st project on a server failed. So Luma gives each
//! new project network an explicit small subnet of its own pool, by default
//! [`DEFAULT_POOL`] in /[`DEFAULT_SUBNET_SIZE`]s (256 projects per server), set with
//! `network: {pool, subnet_size}` in luma.yml or `LUMA_NETWORK_POOL` /
//! `LUMA_NETWORK_SUBNET_SIZE` (the environment wins: the pool is a property of the servers).
//!
//! Docker does not check an explicit subnet against the host's routes, so a subnet is only
//! taken when it overlaps none of the engine's networks (any driver) and none of the host's
//! routes except default ones. The routes also cover other engines on the same host (their
//! bridges are host routes) and LANs and VPNs the host reaches.
//!
//! Known limit: only the kernel's main routing table is read (`/proc/net/route`). A VPN that
//! routes through a policy-routing table of its own (WireGuard's `wg-quick` with a default
//! route, Tailscale) is not seen; set the pool clear of its ranges by hand.
//!
//! Everything here is pure: the engine side (listing networks, reading routes, creating the
//! network and retrying when another run took the subnet first, removing a duplicate of the
//! same name) is in `project.rs`.

use std::fmt;
use std::net::Ipv4Addr;

/// The pool when neither luma.yml nor the environment sets one: inside 10.0.0.0/8, clear of
/// Docker's default pools (172.17-31, 192.168) and of the low 10.x ranges that routers and
/// VPNs usually hand out.
pub const DEFAULT_POOL: &str = "10.210.0.0/16";
/// Each project's subnet when none is set: 254 addresses.
pub const DEFAULT_SUBNET_SIZE: u8 = 24;
/// The smallest subnet a project may get (/28: 16 addresses, 12 containers beside the
/// gateway and the proxy); a release runs its new replicas beside the old ones, so smaller is
/// too tight.
pub const MAX_SUBNET_SIZE: u8 = 28;
/// The largest pool: one /8. Anything larger reaches over several /8s of unrelated networks.
pub const MIN_POOL_PREFIX: u8 = 8;

pub const POOL_ENV: &str = "LUMA_NETWORK_POOL";
pub const SUBNET_SIZE_ENV: &str = "LUMA_NETWORK_SUBNET_SIZE";

/// An IPv4 network: an address with no host bits set, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: u32,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`, refused when `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, String> {
        if prefix > 32 {
            return Err(format!("/{prefix} is not an IPv4 prefix length (0 to 32)"));
        }
        let a = u32::from(addr);
        let net = a & mask(prefix);
        if net != a {
            return Err(format!(
                "{addr}/{prefix} has host bits set; the network of that range is {}/{prefix}",
                Ipv4Addr::from(net)
            ));
        }
        Ok(Cidr { addr: a, prefix })
    }

    /// Parses `a.b.c.d/n` strictly, as written by a user: the network address itself (no host
    /// bits), a prefix length from 0 to 32, nothing else.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        const FORM: &str = "write an IPv4 network as ADDRESS/PREFIX, e.g. 10.210.0.0/16";
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(format!("{s:?} is not an IPv4 network: no /PREFIX; {FORM}"));
        };
        if addr.contains(':') {
            return Err(format!(
                "{s:?} is IPv6; the pool must be IPv4 (Docker's bridge networks need an IPv4 subnet); {FORM}"
            ));
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 network: {addr:?} is not an IPv4 address; {FORM}")
        })?;
        let prefix = Some(prefix)
            .filter(|p| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u8>().ok())
            .filter(|p| *p <= 32)
            .ok_or_else(|| {
                format!("{s:?} is not an IPv4 network: /{prefix} is not a prefix length (0 to 32); {FORM}")
            })?;
        Cidr::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }

    /// A subnet as the engine reports it (`IPAM.Config[].Subnet`): IPv4 only (None for IPv6
    /// or anything else), host bits dropped (the engine's own business).
    pub fn from_engine(s: &str) -> Option<Cidr> {
        let (addr, prefix) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        Some(Cidr {
            addr: u32::from(addr) & mask(prefix),
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    fn first(&self) -> u32 {
        self.addr
    }

    fn last(&self) -> u32 {
        self.addr | !mask(self.prefix)
    }

    /// Whether every address of `other` is in this one.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.first() <= other.first() && other.last() <= self.last()
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

/// The netmask of a prefix length, as a number.
fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - p.min(32)),
    }
}

/// Ranges no pool may touch: they are never a LAN's, and Docker or the kernel treat them
/// specially.
const SPECIAL: [(&str, &str); 5] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

/// The ranges a pool must lie in: the private ones (RFC 1918) and the shared address space
/// of carrier-grade NAT (RFC 6598). Addresses outside belong to hosts on the internet, which
/// the containers of a project would no longer reach (`8.8.0.0/16` for `10.8.0.0/16`).
const PRIVATE: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// The pool project networks come from, and where each of its settings came from (for
/// messages).
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub range: Cidr,
    /// The prefix length of each project's subnet.
    pub subnet_size: u8,
    /// Where `range` came from: `network.pool in <file>`, `LUMA_NETWORK_POOL`, or `the
    /// default`.
    pub range_from: String,
    /// Where `subnet_size` came from, in the same way.
    pub size_from: String,
}

impl Pool {
    /// The pool when nothing sets one.
    pub fn default_pool() -> Pool {
        Pool {
            range: Cidr::parse(DEFAULT_POOL).unwrap_or(Cidr {
                addr: u32::from(Ipv4Addr::new(10, 210, 0, 0)),
                prefix: 16,
            }),
            subnet_size: DEFAULT_SUBNET_SIZE,
            range_from: "the default".into(),
            size_from: "the default".into(),
        }
    }

    /// Checks a range for `pool`: one /8 at most, two /28s at least, inside a private range
    /// ([`PRIVATE`]). The message says what is wrong and how to fix it; the caller names the
    /// key or variable.
    pub fn check_range(range: &Cidr) -> Result<(), String> {
        if range.prefix < MIN_POOL_PREFIX {
            return Err(format!(
                "{range} is larger than a /{MIN_POOL_PREFIX}; use a private range such as \
                 {DEFAULT_POOL} (256 projects in /24s) or 10.0.0.0/8 at most"
            ));
        }
        if range.prefix >= MAX_SUBNET_SIZE {
            return Err(format!(
                "{range} is too small a pool: it must hold at least two project subnets of \
                 /{MAX_SUBNET_SIZE}, so a /{} or larger; e.g. {DEFAULT_POOL} (256 projects \
                 in /24s)",
                MAX_SUBNET_SIZE - 1
            ));
        }
        for (special, what) in SPECIAL {
            let s = Cidr::parse(special)?;
            if s.overlaps(range) {
                return Err(format!(
                    "{range} overlaps {special} ({what} addresses); use a private range such as \
                     {DEFAULT_POOL}"
                ));
            }
        }
        let inside = |p: &&str| Cidr::parse(p).is_ok_and(|p| p.contains(range));
        if !PRIVATE.iter().any(inside) {
            return Err(format!(
                "{range} is not a private range: project networks would hide the public \
                 addresses in it from the containers; use a range inside {}, such as \
                 {DEFAULT_POOL}",
                PRIVATE.join(", ")
            ));
        }
        Ok(())
    }

    /// Checks `subnet_size` against the pool's range: longer than its prefix (the pool holds
    /// at least two subnets) and at most /[`MAX_SUBNET_SIZE`].
    pub fn check_size(range: &Cidr, size: u8) -> Result<(), String> {
        if size > MAX_SUBNET_SIZE {
            return Err(format!(
                "/{size} is too small for a project network (at most /{MAX_SUBNET_SIZE}: 12 \
                 containers beside the proxy, and a release runs beside the one it replaces); \
                 use 24 (254 addresses), or up to {MAX_SUBNET_SIZE}"
            ));
        }
        if size <= range.prefix {
            let example = (range.prefix + 8).min(MAX_SUBNET_SIZE);
            return Err(format!(
                "a /{size} subnet is not smaller than the pool {range}; the subnet size is the \
                 prefix length of each project's subnet and must be longer than the pool's \
                 /{} (e.g. {example} for /{example}s)",
                range.prefix
            ));
        }
        Ok(())
    }

    /// This pool with `LUMA_NETWORK_POOL` / `LUMA_NETWORK_SUBNET_SIZE` applied over it (`var`
    /// looks a variable up; an empty one counts as unset). The message of an error names the
    /// variable, its value and the fix.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Pool, String> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let pool_set = get(POOL_ENV);
        if let Some(v) = &pool_set {
            self.range = Cidr::parse(v)
                .and_then(|r| Pool::check_range(&r).map(|()| r))
                .map_err(|e| format!("{POOL_ENV}: {e}"))?;
            self.range_from = POOL_ENV.into();
        }
        let size_set = get(SUBNET_SIZE_ENV);
        if let Some(v) = &size_set {
            self.subnet_size = Some(v.as_str())
                .filter(|v| v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "{SUBNET_SIZE_ENV}={v:?}: expected the prefix length of each project's \
                         subnet as a whole number, e.g. {SUBNET_SIZE_ENV}=24 for /24 subnets"
                    )
                })?;
            self.size_from = SUBNET_SIZE_ENV.into();
        }
        Pool::check_size(&self.range, self.subnet_size).map_err(|e| {
            let blame = if size_set.is_some() {
                SUBNET_SIZE_ENV
            } else {
                POOL_ENV
            };
            format!(
                "{blame}: {e} (the pool {} is from {}, the subnet size /{} from {})",
                self.range, self.range_from, self.subnet_size, self.size_from
            )
        })?;
        Ok(self)
    }

    /// How many subnets the pool has.
    pub fn subnets(&self) -> u64 {
        1u64 << (self.subnet_size - self.range.prefix)
    }

    /// The `i`th subnet of the pool (`i` < [`Pool::subnets`]).
    fn nth(&self, i: u64) -> Cidr {
        Cidr {
            addr: (self.range.first() as u64 + (i << (32 - self.subnet_size))) as u32,
            prefix: self.subnet_size,
        }
    }

    /// The first subnet of the pool that overlaps nothing in `taken` and is none of `skip`.
    /// Jumps past each taken range instead of trying every subnet, so a /8 in /28s (a million
    /// subnets) costs no more than the ranges in the way.
    pub fn first_free(&self, taken: &[Taken], skip: &[Cidr]) -> Option<Cidr> {
        self.free_from(taken, skip, 0)
    }

    /// [`Pool::first_free`] from the `i`th subnet on.
    fn free_from(&self, taken: &[Taken], skip: &[Cidr], mut i: u64) -> Option<Cidr> {
        let n = self.subnets();
        let step = 32 - self.subnet_size as u32;
        while i < n {
            let cand = self.nth(i);
            let blocker = taken
                .iter()
                .map(|t| &t.net)
                .chain(skip.iter())
                .filter(|t| t.overlaps(&cand))
                .map(|t| t.last().max(cand.last()))
                .max();
            match blocker {
                None => return Some(cand),
                // The next subnet that starts after everything in the way.
                Some(end) => i = (end as u64 + 1 - self.range.first() as u64) >> step,
            }
        }
        None
    }
}

/// A range that is in use on a server, and by what.
#[derive(Clone, Debug, PartialEq)]
pub struct Taken {
    pub net: Cidr,
    pub by: Holder,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Holder {
    /// A Docker network of the engine, by name.
    Network(String),
    /// A host route, by interface.
    Route(String),
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.by {
            Holder::Network(n) => write!(f, "{n} ({})", self.net),
            Holder::Route(dev) => write!(f, "{} dev {dev}", self.net),
        }
    }
}

/// The routes in `/proc/net/route` (the kernel's main IPv4 table; tables of policy routing
/// are not in it): each destination with its interface. Default routes are left out: they
/// overlap everything and claim nothing. That is the /0, and every route shorter than
/// /[`MIN_POOL_PREFIX`]: OpenVPN's `redirect-gateway def1` sends everything through the tunnel
/// with the two halves `0.0.0.0/1` and `128.0.0.0/1` (more specific than the /0 they replace,
/// so they win), and no real network is larger than a /8.
///
/// The kernel prints each address as the 32-bit number it holds in network byte order, in
/// hex: on a little-endian machine 10.210.3.0 is `0003D20A`. Which order a file is in shows in
/// its masks (a netmask is ones, then zeros): a file whose masks only read as netmasks in big
/// endian comes from a big-endian server (a server's file may come from another machine
/// than this one), anything else is read as little endian.
pub fn parse_routes(text: &str) -> Result<Vec<Taken>, String> {
    let mut rows = Vec::new();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let cols: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("no {name} column in the routing table's header {header:?}"))
    };
    let (iface, dest, mask_col) = (col("Iface")?, col("Destination")?, col("Mask")?);
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let hex = |i: usize| {
            f.get(i)
                .and_then(|v| u32::from_str_radix(v, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "line {} of the routing table is not readable: {line:?}",
                        n + 2
                    )
                })
        };
        let dev = f.get(iface).copied().unwrap_or_default().to_string();
        rows.push((dev, hex(dest)?, hex(mask_col)?));
    }
    let is_netmask = |m: u32| m.leading_ones() + m.trailing_zeros() == 32;
    let big_endian = rows.iter().any(|(_, _, m)| !is_netmask(m.swap_bytes()))
        && rows.iter().all(|(_, _, m)| is_netmask(*m));
    let mut routes = Vec::new();
    for (dev, d, m) in rows {
        let (d, m) = if big_endian {
            (d, m)
        } else {
            (d.swap_bytes(), m.swap_bytes())
        };
        if !is_netmask(m) {
            return Err(format!(
                "the routing table has a mask that is no netmask ({:08X} on {dev})",
                m
            ));
        }
        let prefix = m.leading_ones() as u8;
        // A default route, whole or split (see above): it would make every pool look full.
        if prefix < MIN_POOL_PREFIX {
            continue;
        }
        routes.push(Taken {
            net: Cidr {
                addr: d & mask(prefix),
                prefix,
            },
            by: Holder::Route(dev),
        });
    }
    Ok(routes)
}

/// At most `n` items, then how many more.
fn some_of(items: &[&Taken], n: usize) -> String {
    let mut s: Vec<String> = items.iter().take(n).map(|t| t.to_string()).collect();
    if items.len() > n {
        s.push(format!("and {} more", items.len() - n));
    }
    s.join(", ")
}

/// Why no subnet of `pool` is free on `server` for `network`, and what to do: which Docker
/// networks and host routes take the pool, and the settings to change where they are really
/// set (`config` is the path of the project's luma.yml). No concrete range is suggested: one
/// free on this server may be another server's LAN, or a VPN's that the main routing table
/// does not show.
pub fn exhausted(
    server: &str,
    network: &str,
    pool: &Pool,
    taken: &[Taken],
    config: &str,
) -> String {
    let mut inside: Vec<&Taken> = taken
        .iter()
        .filter(|t| t.net.overlaps(&pool.range))
        .collect();
    inside.sort_by_key(|t| t.net);
    let nets: Vec<&Taken> = inside
        .iter()
        .copied()
        .filter(|t| matches!(t.by, Holder::Network(_)))
        .collect();
    // A bridge network's subnet is a host route too: said once, as the network.
    let routes: Vec<&Taken> = inside
        .iter()
        .copied()
        .filter(|t| matches!(t.by, Holder::Route(_)) && !nets.iter().any(|n| n.net == t.net))
        .collect();
    let mut why = Vec::new();
    if !nets.is_empty() {
        why.push(format!("Docker networks {}", some_of(&nets, 5)));
    }
    if !routes.is_empty() {
        why.push(format!("host routes {}", some_of(&routes, 5)));
    }
    // The environment wins over the file: advice to edit the file would change nothing then.
    let pool_knob = if pool.range_from == POOL_ENV {
        format!(
            "{POOL_ENV} (it is set in the environment, which wins over `network.pool` in {config})"
        )
    } else {
        format!("`network.pool` in {config}")
    };
    let which = if pool.range.prefix > MIN_POOL_PREFIX {
        "a larger range or another one"
    } else {
        "another range"
    };
    let size_knob = if pool.size_from == SUBNET_SIZE_ENV {
        SUBNET_SIZE_ENV.to_string()
    } else {
        format!("`network.subnet_size` in {config}")
    };
    let smaller = if pool.subnet_size < MAX_SUBNET_SIZE {
        format!(
            "; or give each project a smaller subnet with {size_knob} (now {}, at most \
             {MAX_SUBNET_SIZE})",
            pool.subnet_size
        )
    } else {
        String::new()
    };
    let subnets = pool.subnets();
    format!(
        "server {server}: no free subnet for network {network}: the pool {range} ({range_from}) \
         has {subnets} subnet{s} of /{size} ({size_from}), and every one overlaps {why}. Set \
         {pool_knob} to {which}, inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, that \
         server {server} does not use (no Docker network, route, LAN or VPN of it in \
         there){smaller}",
        range = pool.range,
        range_from = pool.range_from,
        s = if subnets == 1 { "" } else { "s" },
        size = pool.subnet_size,
        size_from = pool.size_from,
        why = if why.is_empty() {
            "a subnet another luma run took while this one looked".to_string()
        } else {
            why.join("; ")
        },
    )
}

/// Which of several networks of one name stays (an engine before API 1.44 creates a second
/// network of a name that exists when two creates meet): the first made, by the engine's
/// `Created`, the lowest ID among equals. Every creator reads the same list, so they agree on
/// it, and each one that did not make it removes its own. `nets` are (ID, `Created` as the
/// engine writes it); one that does not read as a time comes after every one that does.
pub fn keeper(nets: &[(&str, &str)]) -> Option<usize> {
    (0..nets.len()).min_by_key(|&i| {
        let (id, created) = nets[i];
        let at = rfc3339_nanos(created);
        (at.is_none(), at, id)
    })
}

/// Nanoseconds since 1970 of an RFC 3339 time as Docker writes it (Go's RFC3339Nano:
/// `2024-05-01T12:34:56.123456789+02:00`, or `Z`, trailing zeros of the fraction left out):
/// compared as text, `.1Z` would come after `.12Z`.
fn rfc3339_nanos(s: &str) -> Option<i128> {
    let num = |t: &str| -> Option<i128> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let (date, time) = s.trim().split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-');
    let (y, mo, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => return None,
    };
    let offset_s = match offset {
        "Z" | "z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (h, m) = o[1..].split_once(':')?;
            sign * (num(h)? * 3600 + num(m)? * 60)
        }
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    let nanos = if frac.is_empty() {
        0
    } else if frac.len() <= 9 {
        num(frac)? * 10i128.pow(9 - frac.len() as u32)
    } else {
        return None;
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a date in the proleptic Gregorian calendar (H. Hinnant's
    // days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn net(name: &str, s: &str) -> Taken {
        Taken {
            net: c(s),
            by: Holder::Network(name.into()),
        }
    }

    fn pool(range: &str, size: u8) -> Pool {
        Pool {
            range: c(range),
            subnet_size: size,
            range_from: "network.pool in luma.yml".into(),
            size_from: "the default".into(),
        }
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(c("10.210.0.0/16").to_string(), "10.210.0.0/16");
        assert_eq!(c("0.0.0.0/0").prefix(), 0);
        for (bad, says) in [
            ("10.210.0.0", "no /PREFIX"),
            (
                "10.210.1.0/16",
                "host bits set; the network of that range is 10.210.0.0/16",
            ),
            ("10.210.0.0/33", "/33 is not a prefix length"),
            ("10.210.0.0/", "is not a prefix length"),
            ("10.210.0.0/+8", "is not a prefix length"),
            ("10.210.0.0/016", "is not a prefix length"),
            ("10.210.0/16", "is not an IPv4 address"),
            ("10.210.0.256/24", "is not an IPv4 address"),
            ("shop/24", "is not an IPv4 address"),
            ("fd00::/8", "is IPv6"),
        ] {
            let e = Cidr::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        // The engine's subnets are read leniently; IPv6 ones are not ours to check.
        assert_eq!(Cidr::from_engine("172.18.0.1/16"), Some(c("172.18.0.0/16")));
        assert_eq!(Cidr::from_engine("fd00:1::/64"), None);
    }

    #[test]
    fn overlap_is_any_shared_address() {
        assert!(c("10.210.0.0/16").overlaps(&c("10.210.3.0/24")));
        assert!(c("10.210.3.0/24").overlaps(&c("10.210.0.0/16")));
        assert!(c("10.210.3.0/24").overlaps(&c("10.210.3.77/32")));
        assert!(!c("10.210.3.0/24").overlaps(&c("10.210.4.0/24")));
        assert!(!c("10.210.3.0/24").overlaps(&c("10.210.2.255/32")));
        assert!(c("0.0.0.0/0").overlaps(&c("255.255.255.255/32")));
    }

    #[test]
    fn pools_and_sizes_are_checked() {
        assert!(Pool::check_range(&c("10.210.0.0/16")).is_ok());
        assert!(Pool::check_range(&c("10.0.0.0/8")).is_ok());
        let e = Pool::check_range(&c("0.0.0.0/0")).unwrap_err();
        assert!(e.contains("larger than a /8"), "{e}");
        let e = Pool::check_range(&c("127.0.0.0/16")).unwrap_err();
        assert!(e.contains("loopback") && e.contains(DEFAULT_POOL), "{e}");
        let e = Pool::check_range(&c("10.210.0.16/28")).unwrap_err();
        assert!(
            e.contains("too small a pool") && e.contains("a /27 or larger"),
            "{e}"
        );
        let e = Pool::check_range(&c("224.1.0.0/16")).unwrap_err();
        assert!(e.contains("multicast"), "{e}");
        // Only private ranges: a typo for 10.8.0.0/16 would hide a piece of the internet.
        for ok in [
            "172.16.0.0/12",
            "172.31.0.0/16",
            "192.168.0.0/16",
            "192.168.200.0/24",
            "100.64.0.0/10",
            "100.127.0.0/16",
        ] {
            assert_eq!(Pool::check_range(&c(ok)), Ok(()), "{ok}");
        }
        for public in [
            "8.8.0.0/16",
            "11.0.0.0/8",
            "172.32.0.0/16",
            "172.0.0.0/11",
            "192.169.0.0/16",
            "192.160.0.0/12",
            "100.128.0.0/16",
            "100.0.0.0/9",
        ] {
            let e = Pool::check_range(&c(public)).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "{public} is not a private range: project networks would hide the public \
                     addresses in it from the containers; use a range inside 10.0.0.0/8, \
                     172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, such as 10.210.0.0/16"
                )
            );
        }
        let e = Pool::default_pool()
            .with_env(|v| (v == POOL_ENV).then(|| "8.8.0.0/16".to_string()))
            .unwrap_err();
        assert!(
            e.starts_with("LUMA_NETWORK_POOL: 8.8.0.0/16 is not a private range"),
            "{e}"
        );
        assert!(Pool::check_size(&c("10.210.0.0/16"), 24).is_ok());
        assert!(Pool::check_size(&c("10.210.0.0/27"), 28).is_ok());
        let e = Pool::check_size(&c("10.210.0.0/16"), 29).unwrap_err();
        assert!(e.contains("at most /28"), "{e}");
        let e = Pool::check_size(&c("10.210.0.0/16"), 16).unwrap_err();
        assert!(
            e.starts_with("a /16 subnet is not smaller than the pool 10.210.0.0/16")
                && e.contains("must be longer than the pool's /16 (e.g. 24 for /24s)"),
            "{e}"
        );
    }

    #[test]
    fn the_pool_is_carved_in_order() {
        let p = pool("10.210.0.0/16", 24);
        assert_eq!(p.subnets(), 256);
        assert_eq!(p.nth(0), c("10.210.0.0/24"));
        assert_eq!(p.nth(3), c("10.210.3.0/24"));
        assert_eq!(p.nth(255), c("10.210.255.0/24"));
        let small = pool("10.250.7.0/27", 28);
        assert_eq!(small.subnets(), 2);
        assert_eq!(small.nth(1), c("10.250.7.16/28"));
        // The top of the address space does not wrap around.
        let top = pool("10.255.255.0/24", 28);
        assert_eq!(top.nth(15), c("10.255.255.240/28"));
        assert_eq!(top.first_free(&[net("a", "10.255.255.0/24")], &[]), None);
    }

    #[test]
    fn the_first_subnet_clear_of_everything_is_picked() {
        let p = pool("10.210.0.0/16", 24);
        assert_eq!(p.first_free(&[], &[]), Some(c("10.210.0.0/24")));
        let taken = [
            net("shop-network", "10.210.0.0/24"),
            // A smaller network, and a host route, inside the next subnets.
            net("odd", "10.210.1.128/25"),
            Taken {
                net: c("10.210.2.7/32"),
                by: Holder::Route("wg0".into()),
            },
            // Outside the pool: no matter.
            net("bridge", "172.17.0.0/16"),
        ];
        assert_eq!(p.first_free(&taken, &[]), Some(c("10.210.3.0/24")));
        // A subnet another run took in between is skipped too.
        assert_eq!(
            p.first_free(&taken, &[c("10.210.3.0/24")]),
            Some(c("10.210.4.0/24"))
        );
        // A route over a larger range takes every subnet in it at once.
        let wide = [Taken {
            net: c("10.210.0.0/17"),
            by: Holder::Route("eth1".into()),
        }];
        assert_eq!(p.first_free(&wide, &[]), Some(c("10.210.128.0/24")));
        // A million subnets, all but the last taken by one route: found without trying each.
        let huge = pool("10.0.0.0/8", 28);
        let mut most = vec![Taken {
            net: c("10.0.0.0/9"),
            by: Holder::Route("vpn0".into()),
        }];
        let mut start = u32::from(Ipv4Addr::new(10, 128, 0, 0));
        for prefix in 10..=28 {
            most.push(net(
                &format!("n{prefix}"),
                &format!("{}/{prefix}", Ipv4Addr::from(start)),
            ));
            start += 1 << (32 - prefix);
        }
        assert_eq!(huge.first_free(&most, &[]), Some(c("10.255.255.240/28")));
    }

    /// A real `/proc/net/route` of an x86 host with Docker: the default route, docker0, two
    /// user networks (one without containers: still routed, `linkdown`), the LAN.
    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
br-9e0daf1b5a34\t0000D20A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
br-55e534380254\t0003D20A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wg0\t0702D20A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn proc_net_route_is_read_as_the_kernel_writes_it() {
        let routes = parse_routes(ROUTES).unwrap();
        let shown: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "172.17.0.0/16 dev docker0",
                "10.210.0.0/24 dev br-9e0daf1b5a34",
                "10.210.3.0/24 dev br-55e534380254",
                "192.0.2.0/24 dev eth0",
                "10.210.2.7/32 dev wg0",
            ]
        );
        let p = pool("10.210.0.0/16", 24);
        assert_eq!(p.first_free(&routes, &[]), Some(c("10.210.1.0/24")));
        // The same table from a big-endian server.
        let be = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth0\t00000000\tC0000201\t0003\t0\t0\t0\t00000000\t0\t0\t0
docker0\tAC110000\t00000000\t0001\t0\t0\t0\tFFFF0000\t0\t0\t0
";
        let shown: Vec<String> = parse_routes(be)
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(shown, ["172.17.0.0/16 dev docker0"]);
        // OpenVPN's redirect-gateway def1: two half-default routes over the /0, and the
        // server's own address through the old gateway. The halves are default routes, not
        // networks: the pool stays free.
        let vpn = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
tun0\t00000000\t0100080A\t0003\t0\t0\t0\t00000080\t0\t0\t0
tun0\t00000080\t0100080A\t0003\t0\t0\t0\t00000080\t0\t0\t0
tun0\t0000080A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t0A7100CB\t010200C0\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";
        let routes = parse_routes(vpn).unwrap();
        let shown: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, ["10.8.0.0/16 dev tun0", "203.0.113.10/32 dev eth0"]);
        assert_eq!(
            pool("10.210.0.0/16", 24).first_free(&routes, &[]),
            Some(c("10.210.0.0/24"))
        );
        // A /7 is a default route too; a /8 is a network (a VPN's whole 10.0.0.0/8).
        let wide = "Iface\tDestination\tMask\nvpn0\t0000000A\t000000FE\nvpn1\t0000000A\t000000FF\n";
        let shown: Vec<String> = parse_routes(wide)
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(shown, ["10.0.0.0/8 dev vpn1"]);
        // Only a header: no routes. Garbage: an error that says where.
        assert_eq!(parse_routes(ROUTES.lines().next().unwrap()).unwrap(), []);
        let e = parse_routes("Iface\tDestination\tMask\neth0\tzz\t00FFFFFF\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_routes("nothing here\n").unwrap_err();
        assert!(e.contains("no Iface column"), "{e}");
    }

    #[test]
    fn an_exhausted_pool_says_what_takes_it_and_where_to_change_it() {
        let p = pool("10.250.7.0/27", 28);
        let taken = vec![
            net("shop-network", "10.250.7.16/28"),
            net("mine", "10.250.7.0/28"),
            net("bridge", "172.17.0.0/16"),
            Taken {
                net: c("10.250.7.16/30"),
                by: Holder::Route("wg0".into()),
            },
            // The bridge of a network: not said twice.
            Taken {
                net: c("10.250.7.0/28"),
                by: Holder::Route("br-0123456789ab".into()),
            },
        ];
        assert_eq!(p.first_free(&taken, &[]), None);
        let e = exhausted(
            "app1.example.com",
            "blog-network",
            &p,
            &taken,
            "/srv/blog/luma.yml",
        );
        assert_eq!(
            e,
            "server app1.example.com: no free subnet for network blog-network: the pool \
             10.250.7.0/27 (network.pool in luma.yml) has 2 subnets of /28 (the default), and \
             every one overlaps Docker networks mine (10.250.7.0/28), shop-network \
             (10.250.7.16/28); host routes 10.250.7.16/30 dev wg0. Set `network.pool` in \
             /srv/blog/luma.yml to a larger range or another one, inside 10.0.0.0/8, \
             172.16.0.0/12 or 192.168.0.0/16, that server app1.example.com does not use (no \
             Docker network, route, LAN or VPN of it in there)"
        );
        // Many networks: the first few, and how many more. The subnet size is the other knob
        // while the subnets can be smaller; nothing names a concrete range that may be taken.
        let many: Vec<Taken> = (0..=255)
            .map(|i| net(&format!("p{i}-network"), &format!("10.210.{i}.0/24")))
            .collect();
        let e = exhausted(
            "local",
            "x-network",
            &Pool::default_pool(),
            &many,
            "luma.yml",
        );
        assert!(
            e.contains("the pool 10.210.0.0/16 (the default) has 256 subnets of /24 (the default)"),
            "{e}"
        );
        assert!(
            e.contains("p4-network (10.210.4.0/24), and 251 more"),
            "{e}"
        );
        assert!(
            e.ends_with(
                "Set `network.pool` in luma.yml to a larger range or another one, inside \
                 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, that server local does not use (no \
                 Docker network, route, LAN or VPN of it in there); or give each project a \
                 smaller subnet with `network.subnet_size` in luma.yml (now 24, at most 28)"
            ),
            "{e}"
        );
        assert!(!e.contains("10.211"), "{e}");
        // Set in the environment: the variables are what to change (the file would change
        // nothing); a /8 cannot be larger.
        let env = Pool {
            range: c("10.0.0.0/8"),
            subnet_size: 20,
            range_from: POOL_ENV.into(),
            size_from: SUBNET_SIZE_ENV.into(),
        };
        let e = exhausted(
            "s1",
            "x-network",
            &env,
            &[net("all", "10.0.0.0/8")],
            "/p/luma.yml",
        );
        assert!(
            e.ends_with(
                "Set LUMA_NETWORK_POOL (it is set in the environment, which wins over \
                 `network.pool` in /p/luma.yml) to another range, inside 10.0.0.0/8, \
                 172.16.0.0/12 or 192.168.0.0/16, that server s1 does not use (no Docker \
                 network, route, LAN or VPN of it in there); or give each project a smaller \
                 subnet with LUMA_NETWORK_SUBNET_SIZE (now 20, at most 28)"
            ),
            "{e}"
        );
        // The pool from the environment, the size from the file: each named where it is set.
        let mixed = Pool {
            size_from: "network.subnet_size in /p/luma.yml".into(),
            ..env
        };
        let e = exhausted("s1", "x-network", &mixed, &[], "/p/luma.yml");
        assert!(
            e.contains("Set LUMA_NETWORK_POOL (it is set")
                && e.contains("with `network.subnet_size` in /p/luma.yml (now 20"),
            "{e}"
        );
    }

    #[test]
    fn the_first_made_of_networks_of_one_name_stays() {
        assert_eq!(rfc3339_nanos("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_nanos("2024-05-01T12:34:56.5Z"),
            Some(1_714_566_896_500_000_000)
        );
        // Another zone, the same moment.
        assert_eq!(
            rfc3339_nanos("2024-05-01T14:34:56.5+02:00"),
            rfc3339_nanos("2024-05-01T12:34:56.500000000Z")
        );
        assert_eq!(
            rfc3339_nanos("2024-02-29T23:00:00-01:00"),
            rfc3339_nanos("2024-03-01T00:00:00Z")
        );
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01T12:34:56",
            "2024-13-01T00:00:00Z",
            "x",
        ] {
            assert_eq!(rfc3339_nanos(bad), None, "{bad}");
        }
        // Go leaves the fraction's trailing zeros out: .1 is before .12, unlike as text.
        let nets = [
            ("bbb", "2024-05-01T12:00:00.12Z"),
            ("ccc", "2024-05-01T12:00:00.1Z"),
        ];
        assert_eq!(keeper(&nets), Some(1));
        // The same moment: the lowest ID. Unreadable times come last.
        let nets = [
            ("ccc", "garbage"),
            ("bbb", "2024-05-01T12:00:00Z"),
            ("aaa", "2024-05-01T14:00:00+02:00"),
        ];
        assert_eq!(keeper(&nets), Some(2));
        assert_eq!(keeper(&[("z", "garbage"), ("y", "")]), Some(1));
        assert_eq!(keeper(&[]), None);
    }
}
