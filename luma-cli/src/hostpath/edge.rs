//! The edge of the host fast path: the client's leg, between the host's uplinks and the
//! bridge that carries the proxy's published ports.
//!
//! Why: a client on another machine reaches the proxy through Docker's DNAT. Its packets are
//! routed from an uplink (`eth0`) into the proxy's bridge and back, and each one walks
//! Docker's FORWARD rules on the way: about four per network and one isolation rule per
//! network, each way. At 200 projects that is about 1,000 rules per packet. Measured
//! (`benches/scale.py`, docs/scale.md): without these rules, one host at 200 projects served
//! 0.59x the requests of one project at 1.59x the proxy's CPU per request and 10.6x the p99;
//! with a first version of them, 0.92x, 1.00x and 2.3x.
//!
//! For each uplink `U` and each bridge `B` that a published port of the proxy is DNATed to,
//! two rules go into `DOCKER-USER`, before its final `RETURN`:
//!
//! ```text
//! -i U -o B  ESTABLISHED, direction ORIGINAL, DNAT  "luma edge in U B"   ACCEPT
//! -i B -o U  ESTABLISHED, direction REPLY,    DNAT  "luma edge out U B"  ACCEPT
//! ```
//!
//! They give the verdict Docker's own rules give, sooner. The argument, and what it rests on:
//! - `U` is not one of Docker's bridges (every bridge network's interface is left out when
//!   the uplinks are picked), so Docker's isolation rules, which match only packets coming
//!   from one of its bridges, never see the first rule's packets. Docker then accepts every
//!   established packet going into a bridge (`-o B --ctstate RELATED,ESTABLISHED -j ACCEPT`).
//! - `B` is not an `--internal` network (those are left out), and `U` is not a Docker
//!   bridge, so Docker accepts every packet from `B` to `U`, whatever its state
//!   (`-i B ! -o B -j ACCEPT`, after isolation let it pass).
//! - Both interfaces are pinned, each way. A client that spoofs a source address inside
//!   another project's network gets its reply routed into that network's bridge, not out of
//!   `U`, so the second rule does not match and Docker's isolation drops it. A container
//!   cannot make its packets arrive on `U`, tagged or not.
//! - Only established connections whose destination was translated (a published port): the
//!   first packet of each still walks all of Docker's rules.
//!
//! The rules are named in their comments, so luma knows its own, and they are rebuilt from
//! the comment to be deleted. Docker may move the proxy's published ports to another of its
//! networks (a disconnect does it), and uplinks come and go: every deploy, setup and remove
//! computes the rules anew, adds the missing and deletes luma's edge rules it no longer
//! wants. A stale rule is only slow, never wrong: it matches interfaces the traffic no longer
//! takes. IPv4 only, as the pool's rule.

use super::{insert_before_return, iptables, CHAIN};
use crate::engine::{Bridge, Engine};
use std::collections::BTreeSet;

/// The comment every edge rule carries before its direction and interfaces.
const MARK: &str = "luma edge";

/// One pair the edge rules join: an uplink of the host and a bridge of the proxy's ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub uplink: String,
    pub bridge: String,
}

/// Which way a rule of an [`Edge`] lets packets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    /// From the uplink into the bridge: the client's packets.
    In,
    /// From the bridge out of the uplink: the proxy's replies.
    Out,
}

/// One rule: an edge and a way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeRule {
    pub edge: Edge,
    pub way: Way,
}

impl EdgeRule {
    fn comment(&self) -> String {
        let way = match self.way {
            Way::In => "in",
            Way::Out => "out",
        };
        format!("{MARK} {way} {} {}", self.edge.uplink, self.edge.bridge)
    }

    /// The rule as iptables arguments after the chain name.
    pub fn args(&self) -> Vec<String> {
        let (from, to, dir) = match self.way {
            Way::In => (&self.edge.uplink, &self.edge.bridge, "ORIGINAL"),
            Way::Out => (&self.edge.bridge, &self.edge.uplink, "REPLY"),
        };
        [
            "-i",
            from,
            "-o",
            to,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED",
            "--ctdir",
            dir,
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-m",
            "comment",
            "--comment",
            &self.comment(),
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The rule named by a comment luma wrote, if it is one.
    fn from_comment(comment: &str) -> Option<EdgeRule> {
        let mut words = comment.strip_prefix(MARK)?.split_whitespace();
        let way = match words.next()? {
            "in" => Way::In,
            "out" => Way::Out,
            _ => return None,
        };
        let (uplink, bridge) = (words.next()?, words.next()?);
        words.next().is_none().then(|| EdgeRule {
            edge: Edge {
                uplink: uplink.into(),
                bridge: bridge.into(),
            },
            way,
        })
    }
}

/// Both rules of each edge.
pub fn rules(edges: &[Edge]) -> BTreeSet<EdgeRule> {
    edges
        .iter()
        .flat_map(|e| {
            [Way::In, Way::Out].map(|way| EdgeRule {
                edge: e.clone(),
                way,
            })
        })
        .collect()
}

/// One of luma's edge rules as a listing shows it: what its comment names, and the line's
/// own arguments, which delete exactly it (whatever luma version wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub rule: EdgeRule,
    pub args: Vec<String>,
}

/// Luma's edge rules in a listing of `DOCKER-USER` (`iptables -S`), once per line of each.
pub fn listed(listing: &str) -> Vec<Listed> {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("-A {CHAIN} ")))
        .filter_map(|l| {
            let args = words(l)?;
            let at = args.iter().position(|a| a == "--comment")?;
            Some(Listed {
                rule: EdgeRule::from_comment(args.get(at + 1)?)?,
                args,
            })
        })
        .collect()
}

/// The words of a rule as `iptables -S` prints it: split at spaces, a double-quoted word
/// (a comment) kept whole. `None` if a quote is left open.
fn words(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            let (word, after) = q.split_once('"')?;
            out.push(word.to_string());
            rest = after.trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    Some(out)
}

/// The host's uplinks, from `ip -o -4 addr show`: interfaces with an IPv4 address of global
/// or link scope that are none of Docker's bridges (`bridges`). Loopback is left out.
pub fn uplinks(addresses: &str, bridges: &[Bridge]) -> Vec<String> {
    let docker: BTreeSet<&str> = bridges.iter().map(|b| b.iface.as_str()).collect();
    let found: BTreeSet<String> = addresses
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let iface = words.get(1)?.split('@').next()?;
            let scope = words
                .iter()
                .position(|w| *w == "scope")
                .and_then(|i| words.get(i + 1))?;
            (words.get(2) == Some(&"inet")
                && *scope != "host"
                && iface != "lo"
                && !docker.contains(iface))
            .then(|| iface.to_string())
        })
        .collect();
    found.into_iter().collect()
}

/// The bridges the proxy's published ports are DNATed to: in Docker's `nat` chain `DOCKER`
/// (`iptables -t nat -S DOCKER`), the rules whose `--to-destination` is one of the proxy's
/// addresses (`proxy`: network and address), each mapped to its network's bridge. Internal
/// networks are left out (Docker publishes nothing there, and drops what tries).
pub fn proxy_bridges(nat: &str, proxy: &[(String, String)], bridges: &[Bridge]) -> Vec<String> {
    let found: BTreeSet<String> = nat
        .lines()
        .filter(|l| l.starts_with("-A DOCKER ") && l.contains("-j DNAT"))
        .filter_map(|l| {
            let to = l
                .split_once("--to-destination ")?
                .1
                .split_whitespace()
                .next()?;
            let ip = to.split(':').next()?;
            let (network, _) = proxy.iter().find(|(_, addr)| addr == ip)?;
            let b = bridges.iter().find(|b| &b.network == network)?;
            (!b.internal).then(|| b.iface.clone())
        })
        .collect();
    found.into_iter().collect()
}

/// What the rules in place need: the rules to add, and which of luma's listed edge rules to
/// delete (stale ones, and every copy but one of a rule listed twice, as two deploys at once
/// may leave), as indices into `present`.
pub fn plan(present: &[Listed], wanted: &BTreeSet<EdgeRule>) -> (Vec<EdgeRule>, Vec<usize>) {
    let mut seen = BTreeSet::new();
    let remove = (0..present.len())
        .filter(|&i| !wanted.contains(&present[i].rule) || !seen.insert(&present[i].rule))
        .collect();
    let add = wanted
        .iter()
        .filter(|r| !present.iter().any(|p| &p.rule == *r))
        .cloned()
        .collect();
    (add, remove)
}

/// What [`ensure`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The edges in place now.
    pub edges: Vec<Edge>,
    pub added: usize,
    pub removed: usize,
}

/// Makes `DOCKER-USER` hold exactly the edge rules for the proxy `proxy` (its container) as
/// its ports and the host's uplinks are now. Errs with why it could not (no iptables, not
/// root, no `ip`, the proxy not running); the caller goes on, since it is only speed.
pub async fn ensure(engine: &Engine, proxy: &str) -> Result<Outcome, String> {
    let listing = iptables(engine, &["-S".into(), CHAIN.into()]).await?;
    let bridges = engine.bridges().await?;
    let container = engine
        .inspect(proxy)
        .await?
        .ok_or_else(|| format!("the proxy {proxy} is not there"))?;
    let addresses: Vec<(String, String)> = container
        .network_settings
        .and_then(|s| s.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(net, ep)| Some((net, ep.ip_address.filter(|a| !a.is_empty())?)))
        .collect();
    let nat = iptables(engine, &["-t", "nat", "-S", "DOCKER"].map(String::from)).await?;
    let links = engine
        .host_output(&["ip", "-o", "-4", "addr", "show"], super::LIMIT)
        .await?;
    let uplinks = uplinks(&links, &bridges);
    let edges: Vec<Edge> = proxy_bridges(&nat, &addresses, &bridges)
        .into_iter()
        .flat_map(|bridge| {
            uplinks.iter().map(move |u| Edge {
                uplink: u.clone(),
                bridge: bridge.clone(),
            })
        })
        .collect();
    let present = listed(&listing);
    let (add, remove) = plan(&present, &rules(&edges));
    for r in &add {
        iptables(engine, &insert_before_return(&listing, r.args())).await?;
    }
    for &i in &remove {
        let mut args = vec!["-D".to_string(), CHAIN.into()];
        args.extend(present[i].args.iter().cloned());
        iptables(engine, &args).await?;
    }
    Ok(Outcome {
        edges,
        added: add.len(),
        removed: remove.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(network: &str, iface: &str, internal: bool) -> Bridge {
        Bridge {
            network: network.into(),
            iface: iface.into(),
            internal,
        }
    }

    fn docker() -> Vec<Bridge> {
        vec![
            bridge("bridge", "docker0", false),
            bridge("shop-network", "br-0123456789ab", false),
            bridge("vault", "br-ffffffffffff", true),
        ]
    }

    fn edge(u: &str, b: &str) -> Edge {
        Edge {
            uplink: u.into(),
            bridge: b.into(),
        }
    }

    #[test]
    fn uplinks_are_the_addressed_interfaces_that_are_not_dockers_bridges() {
        let addrs = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
5: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever
9: br-0123456789ab    inet 10.210.0.1/28 brd 10.210.0.15 scope global br-0123456789ab\\  x
12: veth-c@if11    inet 198.18.0.1/30 scope global veth-c\\       valid_lft forever
13: wg0    inet 10.9.0.1/24 scope global wg0\\       valid_lft forever
";
        assert_eq!(uplinks(addrs, &docker()), ["eth0", "veth-c", "wg0"]);
        // An interface with two addresses is one uplink.
        let twice = "4: eth0    inet 192.0.2.2/24 scope global eth0\n4: eth0    inet 192.0.2.3/24 scope global secondary eth0\n";
        assert_eq!(uplinks(twice, &docker()), ["eth0"]);
        assert!(uplinks("", &docker()).is_empty());
    }

    #[test]
    fn the_proxys_bridges_come_from_the_dnat_rules_to_its_addresses() {
        let nat = "\
-N DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER -d 192.0.2.2/32 ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.2:8080
-A DOCKER -d 192.0.2.2/32 ! -i docker0 -p tcp -m tcp --dport 443 -j DNAT --to-destination 172.17.0.2:8443
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.17.0.9:5432
";
        let proxy = vec![
            ("bridge".to_string(), "172.17.0.2".to_string()),
            ("shop-network".to_string(), "10.210.0.2".to_string()),
        ];
        assert_eq!(proxy_bridges(nat, &proxy, &docker()), ["docker0"]);
        // Moved to a project's network (Docker does that when the proxy leaves `bridge`).
        let moved = nat.replace("172.17.0.2", "10.210.0.2");
        assert_eq!(
            proxy_bridges(&moved, &proxy, &docker()),
            ["br-0123456789ab"]
        );
        // Another container's published port is not the proxy's.
        assert!(proxy_bridges(nat, &proxy[1..], &docker()).is_empty());
        // An internal network never gets edge rules.
        let inside = vec![("vault".to_string(), "172.17.0.2".to_string())];
        assert!(proxy_bridges(nat, &inside, &docker()).is_empty());
    }

    #[test]
    fn each_rule_pins_both_interfaces_its_direction_and_dnat() {
        let r = rules(&[edge("eth0", "docker0")]);
        let text: Vec<String> = r.iter().map(|r| r.args().join(" ")).collect();
        assert_eq!(
            text,
            [
                "-i eth0 -o docker0 -m conntrack --ctstate ESTABLISHED --ctdir ORIGINAL -m conntrack \
                 --ctstate DNAT -m comment --comment luma edge in eth0 docker0 -j ACCEPT",
                "-i docker0 -o eth0 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -m conntrack \
                 --ctstate DNAT -m comment --comment luma edge out eth0 docker0 -j ACCEPT",
            ]
        );
    }

    #[test]
    fn luma_knows_its_rules_by_their_comments_and_plans_the_difference() {
        let listing = "\
-N DOCKER-USER
-A DOCKER-USER -i eth0 -j DROP
-A DOCKER-USER -i eth0 -o docker0 -m conntrack --ctstate ESTABLISHED --ctdir ORIGINAL -m conntrack --ctstate DNAT -m comment --comment \"luma edge in eth0 docker0\" -j ACCEPT
-A DOCKER-USER -i docker0 -o eth0 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -m conntrack --ctstate DNAT -m comment --comment \"luma edge out eth0 docker0\" -j ACCEPT
-A DOCKER-USER -i docker0 -o eth0 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -m conntrack --ctstate DNAT -m comment --comment \"luma edge out eth0 docker0\" -j ACCEPT
-A DOCKER-USER -i eth1 -o docker0 -m comment --comment \"luma edge in eth1 docker0\" -j ACCEPT
-A DOCKER-USER -m comment --comment \"luma edge sideways x y\" -j ACCEPT
-A DOCKER-USER -m comment --comment \"luma fast path 10.210.0.0/16\" -j ACCEPT
-A DOCKER-USER -j RETURN
";
        let present = listed(listing);
        assert_eq!(present.len(), 4, "{present:?}");
        // The line's own words, to delete it by: the comment unquoted.
        assert_eq!(
            present[3].args.join(" "),
            "-i eth1 -o docker0 -m comment --comment luma edge in eth1 docker0 -j ACCEPT"
        );
        let wanted = rules(&[edge("eth0", "docker0"), edge("wg0", "docker0")]);
        let (add, remove) = plan(&present, &wanted);
        let comments = |v: &[EdgeRule]| v.iter().map(|r| r.comment()).collect::<Vec<_>>();
        assert_eq!(
            comments(&add),
            ["luma edge in wg0 docker0", "luma edge out wg0 docker0"]
        );
        // The second copy, and the rule of an uplink that is gone.
        assert_eq!(remove, [2, 3]);
        // In place: nothing to do.
        let now = listed(listing);
        let (add, remove) = plan(&now[..2], &rules(&[edge("eth0", "docker0")]));
        assert!(add.is_empty() && remove.is_empty());
        // Nothing wanted: every edge rule goes; the pool's rule is not an edge rule.
        let (_, remove) = plan(&now, &BTreeSet::new());
        assert_eq!(remove.len(), 4);
    }
}
