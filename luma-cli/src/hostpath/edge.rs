//! The edge of the host fast path: the client's leg, between the host's uplinks and the
//! bridge that carries the proxy's published ports.
//!
//! Why: a client on another machine reaches the proxy through Docker's DNAT. Its packets are
//! routed from an uplink (`eth0`) into the proxy's bridge and back, and each one walks
//! Docker's FORWARD rules on the way: about four per network and one isolation rule per
//! network, each way. At 200 projects that is about 1,000 rules per packet. Measured
//! (`benches/scale.py`, docs/scale.md, one run): without these rules, one host at 200
//! projects served 0.50x the requests of one project at 2.00x the proxy's CPU per request,
//! and a p99 of 957 ms; with them, 0.77x, 1.24x and 37 ms (10 ms at one project).
//!
//! For each uplink `U` and each bridge `B` that a published port of the proxy `P` is DNATed
//! to, two rules go into `DOCKER-USER`, before its first bare `RETURN` (Docker's):
//!
//! ```text
//! -i U -o B  ESTABLISHED, direction ORIGINAL, DNAT  "luma edge in U B P"   ACCEPT
//! -i B -o U  ESTABLISHED, direction REPLY,    DNAT  "luma edge out U B P"  ACCEPT
//! ```
//!
//! They give the verdict Docker's own rules give, sooner. The argument, and what it rests on:
//! - `U` is no bridge at all: every interface of kind bridge is left out when the uplinks are
//!   picked, Docker's and any other, including one for a network being created while luma
//!   reads. So Docker's isolation rules, which match only packets coming from one of its
//!   bridges, never see the first rule's packets, and Docker accepts every established packet
//!   going into a bridge (`-o B --ctstate RELATED,ESTABLISHED -j ACCEPT`).
//! - `B` is a bridge of this host and not an `--internal` network (those are left out), and `U`
//!   is not one of Docker's bridges, so Docker accepts every packet from `B` to `U`, whatever
//!   its state (`-i B ! -o B -j ACCEPT`, after isolation let it pass).
//! - Both interfaces are pinned, each way. A client that spoofs a source address inside
//!   another network gets its reply routed into that network's bridge, not out of `U`, so the
//!   second rule does not match and Docker's isolation drops it (tests/docker_netpool.rs sends
//!   such a SYN). A container cannot make its packets arrive on `U`, tagged or not.
//! - Only established connections whose destination was translated (a published port): the
//!   first packet of each still walks all of Docker's rules.
//!
//! Each proxy owns the rules that name it (a host may run a second proxy under
//! `LUMA_PROXY_NAME`): a run adds and deletes only its proxy's, and the withdrawn trial
//! format's (`luma fast path edge ...`, which pinned too little). Docker may move the proxy's
//! published ports to another of its networks (a disconnect does it), and uplinks come and go:
//! every deploy, setup, proxy update and removal of a whole project (`luma remove
//! --everything`, which takes the proxy off its network) computes the rules anew, adds the missing,
//! and deletes the proxy's edge rules it no longer wants, that are not reached (after the
//! first bare `RETURN`) or not written as luma writes them now. Until then a stale rule names an
//! interface pair the traffic no longer takes. With the fast path off, rules in place stay
//! as they are. IPv4 only, as the pool's rule.

use super::{insert_before_return, iptables, CHAIN};
use crate::engine::{Bridge, Engine};
use crate::netpool::Cidr;
use std::collections::BTreeSet;

/// The comment every edge rule carries before its direction, interfaces and proxy.
const MARK: &str = "luma edge";

/// What a trial version of these rules was commented with (never released; it pinned too
/// little). Rules of it, and `luma edge ...` comments of another format (an earlier version
/// named no proxy), are deleted where found.
const LEGACY: &str = "luma fast path edge ";

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

/// One rule: an edge, a way, and the proxy container it is for. Each proxy keeps its own
/// rules (a host may run a second proxy under `LUMA_PROXY_NAME`), so none deletes another's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeRule {
    pub edge: Edge,
    pub way: Way,
    pub proxy: String,
}

impl EdgeRule {
    pub fn comment(&self) -> String {
        let way = match self.way {
            Way::In => "in",
            Way::Out => "out",
        };
        format!(
            "{MARK} {way} {} {} {}",
            self.edge.uplink, self.edge.bridge, self.proxy
        )
    }

    /// The rule as iptables arguments after the chain name, in the order `iptables -S`
    /// prints them back (so a listed rule can be compared word for word).
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
        let (uplink, bridge, proxy) = (words.next()?, words.next()?, words.next()?);
        words.next().is_none().then(|| EdgeRule {
            edge: Edge {
                uplink: uplink.into(),
                bridge: bridge.into(),
            },
            way,
            proxy: proxy.into(),
        })
    }
}

/// Both rules of each edge, for `proxy`.
pub fn rules(edges: &[Edge], proxy: &str) -> BTreeSet<EdgeRule> {
    edges
        .iter()
        .flat_map(|e| {
            [Way::In, Way::Out].map(|way| EdgeRule {
                edge: e.clone(),
                way,
                proxy: proxy.to_string(),
            })
        })
        .collect()
}

/// One of luma's edge rules as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// What its comment names; `None` for a rule of an earlier format, always deleted.
    pub rule: Option<EdgeRule>,
    /// The line's own words after the chain name: they delete exactly it, whatever luma
    /// version wrote it, and tell whether it is the rule luma writes now.
    pub args: Vec<String>,
    /// Whether it comes before the chain's first bare `-j RETURN` (after it, it is never
    /// reached).
    pub reached: bool,
}

/// Luma's edge rules in a listing of `DOCKER-USER` (`iptables -S`), once per line of each.
pub fn listed(listing: &str) -> Vec<Listed> {
    let lines: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("-A {CHAIN} ")))
        .collect();
    // Nothing after the first bare RETURN is reached (where luma inserts, too).
    let first_return = lines.iter().position(|l| *l == "-j RETURN");
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let args = words(l)?;
            let at = args.iter().position(|a| a == "--comment")?;
            let comment = args.get(at + 1)?;
            // luma's comments: the current format, or an earlier one (deleted).
            if !comment.starts_with(LEGACY) && !comment.starts_with(&format!("{MARK} ")) {
                return None;
            }
            Some(Listed {
                rule: EdgeRule::from_comment(comment),
                args,
                reached: first_return.is_none_or(|r| i < r),
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

/// The names of interfaces in `ip -o link show` output (`5: docker0: <...> ...`; a veth's
/// `name@peer` without its peer).
pub fn link_names(links: &str) -> BTreeSet<String> {
    links
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| n.trim_end_matches(':'))
        .filter_map(|n| n.split('@').next())
        .map(String::from)
        .collect()
}

/// The IPv4 addresses in `ip -o -4 addr show` output: interface (without a veth's
/// `@peer`), address (without its prefix length), scope.
fn addresses(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let iface = words.get(1)?.split('@').next()?;
            if words.get(2) != Some(&"inet") {
                return None;
            }
            let ip = words.get(3)?.split('/').next()?;
            let scope = words
                .iter()
                .position(|w| *w == "scope")
                .and_then(|i| words.get(i + 1))?;
            Some((iface.to_string(), ip.to_string(), scope.to_string()))
        })
        .collect()
}

/// The host's uplinks, from `ip -o -4 addr show`: interfaces with an IPv4 address of global
/// or link scope that are not bridges (`host_bridges`, from `ip -o link show type bridge`,
/// read both before and after the addresses) and none of Docker's (`docker`). Every bridge is
/// left out, not only Docker's known ones: a network created or removed while luma reads has
/// a bridge that the engine may not list, and must never pass for an uplink. (A host whose
/// own uplink is a bridge, `br0` with `eth0` in it, gets no edge rules: slower, not wrong.)
/// A name with `+`, which iptables takes as a wildcard, is left out too, and loopback.
pub fn uplinks(
    addresses_text: &str,
    host_bridges: &BTreeSet<String>,
    docker: &[Bridge],
) -> Vec<String> {
    let found: BTreeSet<String> = addresses(addresses_text)
        .into_iter()
        .filter(|(iface, _, scope)| {
            scope != "host"
                && iface != "lo"
                && !iface.contains('+')
                && !host_bridges.contains(iface)
                && !docker.iter().any(|b| &b.iface == iface)
        })
        .map(|(iface, _, _)| iface)
        .collect();
    found.into_iter().collect()
}

/// The bridges the proxy's published ports are DNATed to: in Docker's `nat` chain `DOCKER`
/// (`iptables -t nat -S DOCKER`), the rules whose `--to-destination` is one of the proxy's
/// addresses (`proxy`: network and address), each mapped to its network's bridge. Internal
/// networks are left out (Docker publishes nothing there, and drops what tries), and so is a
/// bridge that is not this host's: one that is no bridge here (`host_bridges`) or holds no
/// address in the network's subnets (`addresses_text`, `ip -o -4 addr show`), as with an
/// engine on another machine behind a forwarded socket, whose `docker0` is not this one.
pub fn proxy_bridges(
    nat: &str,
    proxy: &[(String, String)],
    docker: &[Bridge],
    host_bridges: &BTreeSet<String>,
    addresses_text: &str,
) -> Vec<String> {
    let held = addresses(addresses_text);
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
            let b = docker.iter().find(|b| &b.network == network)?;
            let here = held.iter().any(|(iface, ip, _)| {
                iface == &b.iface
                    && b.subnets.iter().any(|net| {
                        let net = Cidr::from_engine(net);
                        let ip = ip.parse().ok().and_then(|ip| Cidr::new(ip, 32).ok());
                        matches!((net, ip), (Some(net), Some(ip)) if net.contains(&ip))
                    })
            });
            (!b.internal && here && host_bridges.contains(&b.iface) && !b.iface.contains('+'))
                .then(|| b.iface.clone())
        })
        .collect();
    found.into_iter().collect()
}

/// What the rules in place need for `proxy`: the rules to add, and which listed edge rules to
/// delete, as indices into `present`. Deleted: the withdrawn trial format's; and of this
/// proxy's, those not wanted, those not reached (after the first bare `RETURN`) or not written as
/// luma writes them now (they are added again), and every copy but one (two deploys at once
/// may leave two). Other proxies' rules are not this run's to judge.
pub fn plan(
    present: &[Listed],
    wanted: &BTreeSet<EdgeRule>,
    proxy: &str,
) -> (Vec<EdgeRule>, Vec<usize>) {
    let mut kept = BTreeSet::new();
    let mut remove = Vec::new();
    for (i, l) in present.iter().enumerate() {
        match &l.rule {
            None => remove.push(i),
            Some(r) if r.proxy != proxy => {}
            Some(r) => {
                if wanted.contains(r) && l.reached && l.args == r.args() && kept.insert(r.clone()) {
                    continue;
                }
                remove.push(i);
            }
        }
    }
    // `-D` deletes the first rule of the same words, which may be the copy kept: then every
    // copy goes, and one is added again where it is reached.
    let doomed: Vec<&Vec<String>> = remove.iter().map(|&i| &present[i].args).collect();
    for (i, l) in present.iter().enumerate() {
        if let Some(r) = &l.rule {
            if kept.contains(r) && doomed.contains(&&l.args) && !remove.contains(&i) {
                kept.remove(r);
                remove.push(i);
            }
        }
    }
    remove.sort_unstable();
    let add = wanted.difference(&kept).cloned().collect();
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
/// root, no `ip`, no proxy container), and with what it had changed by then; the caller goes
/// on, since it is only speed. A stopped proxy has no addresses, so its rules are deleted.
pub async fn ensure(engine: &Engine, proxy: &str) -> Result<Outcome, String> {
    super::firewall_is_the_engines(&engine.transport, std::env::var("DOCKER_HOST").ok())?;
    // The host's view first, then the engine's: a network created in between has a bridge
    // the host's read already knows as a bridge, so it never passes for an uplink.
    // And the bridges both before and after the addresses: one removed in between is in the
    // first list, one made in between in the second.
    let limit = super::LIMIT;
    let bridges_now = || engine.host_output(&["ip", "-o", "link", "show", "type", "bridge"], limit);
    let mut host_bridges = link_names(&bridges_now().await?);
    let addresses = engine
        .host_output(&["ip", "-o", "-4", "addr", "show"], limit)
        .await?;
    host_bridges.extend(link_names(&bridges_now().await?));
    let docker = engine.bridges().await?;
    let container = engine
        .inspect(proxy)
        .await?
        .ok_or_else(|| format!("the proxy {proxy} is not there"))?;
    let on: Vec<(String, String)> = container
        .network_settings
        .and_then(|s| s.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(net, ep)| Some((net, ep.ip_address.filter(|a| !a.is_empty())?)))
        .collect();
    let nat = iptables(engine, &["-t", "nat", "-S", "DOCKER"].map(String::from)).await?;
    let uplinks = uplinks(&addresses, &host_bridges, &docker);
    let edges: Vec<Edge> = proxy_bridges(&nat, &on, &docker, &host_bridges, &addresses)
        .into_iter()
        .flat_map(|bridge| {
            uplinks.iter().map(move |u| Edge {
                uplink: u.clone(),
                bridge: bridge.clone(),
            })
        })
        .collect();
    let list_args = ["-S".to_string(), CHAIN.to_string()];
    let list = || iptables(engine, &list_args);
    let present = listed(&list().await?);
    let (add, remove) = plan(&present, &rules(&edges, proxy), proxy);
    let (mut added, mut removed) = (0, 0);
    let so_far = |added: usize, removed: usize, e: String| {
        if added + removed == 0 {
            e
        } else {
            format!("{added} rules added and {removed} removed, then: {e}")
        }
    };
    for &i in &remove {
        let mut args = vec!["-D".to_string(), CHAIN.into()];
        args.extend(present[i].args.iter().cloned());
        if let Err(e) = iptables(engine, &args).await {
            // Another luma may have deleted it first: gone is what was wanted.
            let now = list().await.map_err(|e| so_far(added, removed, e))?;
            if listed(&now).iter().any(|l| l.args == present[i].args) {
                return Err(so_far(added, removed, e));
            }
        }
        removed += 1;
    }
    for r in &add {
        // Listed again for each: the position before the first bare RETURN is where it is now.
        let now = list().await.map_err(|e| so_far(added, removed, e))?;
        iptables(engine, &insert_before_return(&now, r.args()))
            .await
            .map_err(|e| so_far(added, removed, e))?;
        added += 1;
    }
    Ok(Outcome {
        edges,
        added,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(network: &str, iface: &str, internal: bool, subnet: &str) -> Bridge {
        Bridge {
            network: network.into(),
            iface: iface.into(),
            internal,
            subnets: vec![subnet.into()],
        }
    }

    fn docker() -> Vec<Bridge> {
        vec![
            bridge("bridge", "docker0", false, "172.17.0.0/16"),
            bridge("shop-network", "br-0123456789ab", false, "10.210.0.0/28"),
            bridge("vault", "br-ffffffffffff", true, "10.210.0.32/28"),
        ]
    }

    /// `ip -o -4 addr show` on the engine's host.
    const ADDRS: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
5: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever
9: br-0123456789ab    inet 10.210.0.1/28 brd 10.210.0.15 scope global br-0123456789ab\\  x
10: br-5555aaaa5555    inet 10.210.0.17/28 scope global br-5555aaaa5555\\  x
11: br0    inet 192.168.1.10/24 scope global br0\\  x
12: br-ffffffffffff    inet 10.210.0.33/28 scope global br-ffffffffffff\\  x
13: veth-c@if11    inet 198.18.0.1/30 scope global veth-c\\       valid_lft forever
14: wg0    inet 10.9.0.1/24 scope global wg0\\       valid_lft forever
15: odd+    inet 10.8.0.1/24 scope global odd+\\       valid_lft forever
";

    fn host_bridges() -> BTreeSet<String> {
        [
            "docker0",
            "br-0123456789ab",
            "br-ffffffffffff",
            "br-5555aaaa5555",
            "br0",
        ]
        .map(String::from)
        .into()
    }

    fn edge(u: &str, b: &str) -> Edge {
        Edge {
            uplink: u.into(),
            bridge: b.into(),
        }
    }

    #[test]
    fn uplinks_are_the_addressed_interfaces_that_are_no_bridge() {
        let addrs = ADDRS;
        // br-5555aaaa5555: a network being made, whose bridge the engine does not list yet.
        assert_eq!(
            uplinks(addrs, &host_bridges(), &docker()),
            ["eth0", "veth-c", "wg0"]
        );
        // An interface with two addresses is one uplink.
        let twice = "4: eth0    inet 192.0.2.2/24 scope global eth0\n\
                     4: eth0    inet 192.0.2.3/24 scope global secondary eth0\n";
        assert_eq!(uplinks(twice, &host_bridges(), &docker()), ["eth0"]);
        assert!(uplinks("", &host_bridges(), &docker()).is_empty());
    }

    #[test]
    fn link_names_drop_the_index_colon_and_peer() {
        let links = "5: docker0: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue\n\
                     9: br-0123456789ab: <NO-CARRIER> mtu 1500\n\
                     12: veth1@if11: <UP> mtu 1500\n";
        assert_eq!(
            link_names(links),
            ["br-0123456789ab", "docker0", "veth1"]
                .map(String::from)
                .into()
        );
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
        let here = host_bridges();
        let found = |nat: &str, proxy: &[(String, String)], docker: &[Bridge]| {
            proxy_bridges(nat, proxy, docker, &here, ADDRS)
        };
        assert_eq!(found(nat, &proxy, &docker()), ["docker0"]);
        // Moved to a project's network (Docker does that when the proxy leaves `bridge`).
        let moved = nat.replace("172.17.0.2", "10.210.0.2");
        assert_eq!(found(&moved, &proxy, &docker()), ["br-0123456789ab"]);
        // Another container's published port is not the proxy's.
        assert!(found(nat, &proxy[1..], &docker()).is_empty());
        // An internal network never gets edge rules.
        let inside = vec![("vault".to_string(), "172.17.0.2".to_string())];
        assert!(found(nat, &inside, &docker()).is_empty());
        // An engine on another machine: its bridge is no bridge here, or one of the same name
        // that holds no address in its subnet (another machine's docker0 behind a forwarded
        // socket).
        assert!(proxy_bridges(nat, &proxy, &docker(), &BTreeSet::new(), ADDRS).is_empty());
        let mut elsewhere = docker();
        elsewhere[0].subnets = vec!["172.31.0.0/16".into()];
        assert!(found(nat, &proxy, &elsewhere).is_empty());
    }

    #[test]
    fn each_rule_pins_both_interfaces_its_direction_and_dnat() {
        let r = rules(&[edge("eth0", "docker0")], "luma-proxy");
        let text: Vec<String> = r.iter().map(|r| r.args().join(" ")).collect();
        assert_eq!(
            text,
            [
                "-i eth0 -o docker0 -m conntrack --ctstate ESTABLISHED --ctdir ORIGINAL -m conntrack \
                 --ctstate DNAT -m comment --comment luma edge in eth0 docker0 luma-proxy -j ACCEPT",
                "-i docker0 -o eth0 -m conntrack --ctstate ESTABLISHED --ctdir REPLY -m conntrack \
                 --ctstate DNAT -m comment --comment luma edge out eth0 docker0 luma-proxy -j ACCEPT",
            ]
        );
    }

    /// A listing line for `rule` as `iptables -S` prints it.
    fn line(rule: &EdgeRule) -> String {
        let c = rule.comment();
        format!("-A DOCKER-USER {}", rule.args().join(" ")).replace(&c, &format!("\"{c}\""))
    }

    fn comments_of(v: &[EdgeRule]) -> Vec<String> {
        v.iter().map(|r| r.comment()).collect()
    }

    #[test]
    fn luma_knows_its_rules_by_their_comments_and_plans_the_difference() {
        let mine = rules(&[edge("eth0", "docker0")], "luma-proxy");
        let [my_in, my_out] = [0, 1].map(|i| mine.iter().nth(i).unwrap().clone());
        let theirs = rules(&[edge("eth0", "docker0")], "staging-proxy");
        let gone = rules(&[edge("eth1", "docker0")], "luma-proxy");
        let listing = [
            "-N DOCKER-USER".to_string(),
            "-A DOCKER-USER -i eth0 -j DROP".into(),
            line(&my_in),
            line(&my_out),
            line(&my_out),
            line(gone.iter().next().unwrap()),
            line(theirs.iter().next().unwrap()),
            // The withdrawn trial format: always deleted.
            "-A DOCKER-USER -o docker0 -m conntrack --ctstate ESTABLISHED -m comment --comment \
             \"luma fast path edge docker0 in\" -j ACCEPT"
                .into(),
            "-A DOCKER-USER -m comment --comment \"luma edge sideways x y z\" -j ACCEPT".into(),
            "-A DOCKER-USER -m comment --comment \"luma fast path 10.210.0.0/16\" -j ACCEPT".into(),
            "-A DOCKER-USER -j RETURN".into(),
        ]
        .join("\n");
        let present = listed(&listing);
        assert_eq!(present.len(), 7, "{present:?}");
        // The line's own words, to delete it by: the comment unquoted.
        assert_eq!(present[0].args, my_in.args());
        assert!(present.iter().all(|l| l.reached));
        let wanted = rules(
            &[edge("eth0", "docker0"), edge("wg0", "docker0")],
            "luma-proxy",
        );
        let (add, remove) = plan(&present, &wanted, "luma-proxy");
        // Both copies of the rule listed twice go (`-D` may take either), and it comes back
        // once; the rule of an uplink that is gone goes, and both earlier formats; the other
        // proxy's stays.
        assert_eq!(remove, [1, 2, 3, 5, 6]);
        assert_eq!(
            comments_of(&add),
            [
                "luma edge out eth0 docker0 luma-proxy",
                "luma edge in wg0 docker0 luma-proxy",
                "luma edge out wg0 docker0 luma-proxy"
            ]
        );
        // In place: nothing to do.
        let (add, remove) = plan(&present[..2], &mine, "luma-proxy");
        assert!(add.is_empty() && remove.is_empty());
        // Nothing wanted: every rule of this proxy goes, and the earlier formats'.
        let (_, remove) = plan(&present, &BTreeSet::new(), "luma-proxy");
        assert_eq!(remove, [0, 1, 2, 3, 5, 6]);
    }

    #[test]
    fn a_rule_past_the_final_return_or_written_otherwise_is_replaced() {
        let mine = rules(&[edge("eth0", "docker0")], "luma-proxy");
        let lines: Vec<String> = mine.iter().map(line).collect();
        // After RETURN: never reached.
        let late = format!("-A DOCKER-USER -j RETURN\n{}\n{}\n", lines[0], lines[1]);
        let present = listed(&late);
        assert!(present.iter().all(|l| !l.reached));
        let (add, remove) = plan(&present, &mine, "luma-proxy");
        assert_eq!((add.len(), remove), (2, vec![0, 1]));
        // One copy reached, one after RETURN: `-D` would take the first, so both go and one
        // comes back before the RETURN.
        let split = format!(
            "{}\n{}\n-A DOCKER-USER -j RETURN\n{}\n",
            lines[0], lines[1], lines[1]
        );
        let (add, remove) = plan(&listed(&split), &mine, "luma-proxy");
        assert_eq!(
            (comments_of(&add), remove),
            (vec![mine.iter().nth(1).unwrap().comment()], vec![1, 2])
        );
        // The same comment on a broader rule (no interface pinned): not luma's rule as written.
        let broad = format!(
            "{}\n{}\n-A DOCKER-USER -j RETURN\n",
            lines[0].replace("-i eth0 ", ""),
            lines[1]
        );
        let (add, remove) = plan(&listed(&broad), &mine, "luma-proxy");
        assert_eq!(
            (comments_of(&add), remove),
            (vec![mine.iter().next().unwrap().comment()], vec![0])
        );
    }
}
