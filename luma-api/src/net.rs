//! IP networks in the settings the CLI passes to the proxy: `--trusted-proxies`
//! (`LUMA_TRUSTED_PROXIES` on the CLI's side). One parser, so the CLI refuses a bad list before it
//! creates a proxy that would refuse it at start.

use std::net::IpAddr;
use std::sync::Arc;

/// An IP network: `10.0.0.0/8`, `2001:db8::/32`; a bare address means just that address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not a CIDR: {addr:?} is not an IP address (write e.g. 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                format!(
                    "{s:?} is not a CIDR: the prefix length {p:?} must be a number from 0 to {max}"
                )
            })?,
        };
        let c = Cidr { net, prefix };
        if c.masked(net) != net {
            return Err(format!(
                "{s:?} has bits set after the first {prefix}: did you mean {}/{prefix}?",
                c.masked(net)
            ));
        }
        // Peers are matched as IPv4 when they are IPv4-mapped (`contains`), so an IPv4-mapped
        // network is stored as the IPv4 one. Its prefix is at least 96 here: below that, the
        // mapping's `ffff` bits would have been refused above.
        if let Some(v4) = match net {
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
            IpAddr::V4(_) => None,
        } {
            return Ok(Cidr {
                net: IpAddr::V4(v4),
                prefix: prefix.saturating_sub(96),
            });
        }
        Ok(c)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v) & mask).into())
            }
            IpAddr::V6(v) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v) & mask).into())
            }
        }
    }

    /// True when `ip` is inside this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && self.masked(ip) == self.net
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The networks whose forwarded headers are believed (`--trusted-proxies`). Empty by default:
/// edge mode for every peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Arc<[Cidr]>);

impl TrustedProxies {
    /// A comma- or space-separated list of CIDRs; an empty string is an empty list.
    pub fn parse(s: &str) -> Result<TrustedProxies, String> {
        s.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .map(Cidr::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| TrustedProxies(v.into()))
            .map_err(|e| format!("trusted proxies: {e}"))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn cidrs(&self) -> &[Cidr] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly_and_match() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains("::1".parse().unwrap()));
        // IPv4-mapped networks match the IPv4 peers they map, in either notation.
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(mapped, c);
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        let one_mapped = Cidr::parse("::ffff:192.0.2.7").unwrap();
        assert_eq!(one_mapped.to_string(), "192.0.2.7/32");
        assert!(one_mapped.contains("192.0.2.7".parse().unwrap()));
        let all_mapped = Cidr::parse("::ffff:0.0.0.0/96").unwrap();
        assert!(all_mapped.contains("203.0.113.1".parse().unwrap()));
        assert!(Cidr::parse("::ffff:10.0.0.0/80").is_err());
        let err = Cidr::parse("10.0.0.1/8").unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("ten/8")
            .unwrap_err()
            .contains("not an IP address"));
        assert!(Cidr::parse("10.0.0.0/x").is_err());
        let list = TrustedProxies::parse(" 10.0.0.0/8,, 192.0.2.0/24 ").unwrap();
        assert_eq!(list.cidrs().len(), 2);
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        let err = TrustedProxies::parse("10.0.0.0/8,nope").unwrap_err();
        assert!(err.starts_with("trusted proxies: \"nope\""), "{err}");
    }
}
