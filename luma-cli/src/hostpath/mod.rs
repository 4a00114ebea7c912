//! The host fast path: one firewall rule per network pool, so packets of connections that are
//! already established inside Luma's networks skip Docker's per-network rules.
//!
//! Why: Docker puts about five rules into the host's FORWARD chains for every bridge network,
//! and with `br_netfilter` (which Docker turns on) the kernel walks them for every packet
//! between two containers of one network: the proxy and its backends. At 200 project networks
//! that is about 1,000 rules per packet. Measured (`benches/scale.sh`, docs/scale.md, five runs
//! on two machines): at 200 projects, taking this rule out cut the requests through one host to
//! 0.49-0.98x of one project's and raised the proxy's CPU per request 1.2-2.3x; with it, they
//! were 0.97-1.23x and 0.85-1.10x. 200 bare networks the proxy was not even on did the same.
//!
//! The rule goes into `DOCKER-USER`, the chain Docker keeps for its users and never rewrites:
//!
//! ```text
//! -s POOL -d POOL -m physdev --physdev-is-bridged -m conntrack --ctstate RELATED,ESTABLISHED
//!   -m comment --comment "luma fast path POOL" -j ACCEPT
//! ```
//!
//! It gives the verdict Docker's own rules give, for the traffic it matches:
//! - only packets bridged inside one bridge, that is between two containers of one network.
//!   Docker accepts those whatever their state (its rule `-i br -o br -j ACCEPT`). A packet
//!   from one network to another is routed, not bridged, so it never matches and still meets
//!   Docker's isolation, which drops it in any conntrack state (an ICMP error or a spoofed
//!   UDP packet can look RELATED or ESTABLISHED to a flow of another network);
//! - only packets of connections already accepted: the first packet of each still walks all
//!   of Docker's rules.
//!
//! It is inserted before the chain's first bare `RETURN` (Docker's), so the operator's own
//! rules there still come first.
//!
//! The pool's rule covers the proxy's leg to its apps. The client's leg, from the host's
//! uplinks to the proxy's published ports, has rules of its own: [`edge`].
//!
//! Every deploy and setup makes sure it is there (a reboot empties `DOCKER-USER`): one
//! `iptables -S` on the host, and an insert when the rule is missing. It needs root on the host:
//! luma runs `iptables` as the user it deploys as, and does not try sudo (a refused sudo is
//! logged and mailed to the server's admin on every deploy). When it cannot be added the
//! deploy goes on and says why: it is only speed. `LUMA_HOST_FAST_PATH=off` turns it off (the
//! environment, like the pool: it belongs to the servers). A rule stays when its pool is no
//! longer used; it matches nothing then. The edge rules are kept in step as [`edge`] says.
//!
//! The firewall luma changes is the engine's host's: over SSH, the server's; on the local
//! engine, this machine's, and only while the engine is on it (a unix socket). An engine at a
//! `DOCKER_HOST` elsewhere gets no rules here.

use crate::engine::{Engine, Transport};
use crate::netpool::Cidr;
use std::time::Duration;

pub mod edge;

pub const ENV: &str = "LUMA_HOST_FAST_PATH";

/// The chain Docker leaves to its users; FORWARD jumps to it before any of Docker's rules.
const CHAIN: &str = "DOCKER-USER";

/// Each iptables call: waits up to 5 s for the xtables lock (Docker takes it too), and is
/// killed after this.
const LIMIT: Duration = Duration::from_secs(20);

/// Whether the fast path is on, from `LUMA_HOST_FAST_PATH` (`var` looks a variable up):
/// unset, empty, `on`, `1`, `true` are on; `off`, `0`, `false` are off, in any case.
pub fn enabled(var: impl Fn(&str) -> Option<String>) -> Result<bool, String> {
    match var(ENV).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "on" | "1" | "true") => Ok(true),
        Some("off" | "0" | "false") => Ok(false),
        Some(other) => Err(format!(
            "{ENV}={other:?}: expected `on` or `off`; set {ENV}=off to keep luma from adding \
             its firewall rule for established traffic inside its networks (docs/scale.md)"
        )),
    }
}

/// The rule for `pool`, as iptables arguments after the chain name.
pub fn rule(pool: &Cidr) -> Vec<String> {
    let pool = pool.to_string();
    [
        "-s",
        &pool,
        "-d",
        &pool,
        "-m",
        "physdev",
        "--physdev-is-bridged",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-m",
        "comment",
        "--comment",
        &format!("luma fast path {pool}"),
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The iptables arguments that add the rule for `pool` to a chain listed as `listing`
/// (`iptables -S DOCKER-USER`): before its first bare `-j RETURN` (Docker ends the chain
/// with one), else at its end.
pub fn insert_args(listing: &str, pool: &Cidr) -> Vec<String> {
    insert_before_return(listing, rule(pool))
}

/// The iptables arguments that add `rule` to `DOCKER-USER`, listed as `listing`: before its
/// first bare `-j RETURN` (Docker ends the chain with one; nothing after it is reached), else
/// at its end. Rules an operator put there first keep coming first.
fn insert_before_return(listing: &str, rule: Vec<String>) -> Vec<String> {
    let mut args = match first_return(listing) {
        Some(i) => vec!["-I".to_string(), CHAIN.into(), (i + 1).to_string()],
        None => vec!["-A".to_string(), CHAIN.into()],
    };
    args.extend(rule);
    args
}

/// The index, among the chain's rules in `listing`, of its first bare `-j RETURN`.
fn first_return(listing: &str) -> Option<usize> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&format!("-A {CHAIN} ")))
        .position(|l| l == format!("-A {CHAIN} -j RETURN"))
}

/// What [`ensure`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The rule was there already.
    Present,
    /// This run added it.
    Added,
    /// It is not there and could not be added: why (no iptables, not root, no DOCKER-USER).
    Unavailable(String),
}

/// Whether `listing` (`iptables -S DOCKER-USER`) holds the rule for `pool`, known by its
/// comment, which is luma's alone. A listing, not `iptables -C`: `-C` fails alike for a rule
/// that is missing and for a lock it could not get, and the second must not add a duplicate.
pub fn listed(listing: &str, pool: &Cidr) -> bool {
    let comment = format!("--comment \"luma fast path {pool}\"");
    listing
        .lines()
        .any(|l| l.starts_with(&format!("-A {CHAIN} ")) && l.contains(&comment))
}

/// Makes sure the host of `engine` has the fast-path rule for `pool`. Never fails the deploy:
/// a host without it is slower, not broken.
pub async fn ensure(engine: &Engine, pool: &Cidr) -> Outcome {
    if let Err(e) = firewall_is_the_engines(&engine.transport, std::env::var("DOCKER_HOST").ok()) {
        return Outcome::Unavailable(e);
    }
    let listing = match iptables(engine, &["-S".into(), CHAIN.into()]).await {
        Ok(l) => l,
        Err(e) => return Outcome::Unavailable(e),
    };
    if listed(&listing, pool) {
        return Outcome::Present;
    }
    match iptables(engine, &insert_args(&listing, pool)).await {
        Ok(_) => Outcome::Added,
        Err(e) => Outcome::Unavailable(e),
    }
}

/// Whether the commands luma runs "on the host" reach the engine's host: always over SSH;
/// for the local engine, only when `docker_host` (`DOCKER_HOST`) is unset or a unix socket.
fn firewall_is_the_engines(
    transport: &Transport,
    docker_host: Option<String>,
) -> Result<(), String> {
    match (transport, docker_host) {
        (Transport::Local, Some(h)) if !h.is_empty() && !h.starts_with("unix://") => Err(format!(
            "the engine is at DOCKER_HOST={h}, not on this machine, so its firewall is not \
             this machine's; name that server in luma.yml's `servers` to reach it over SSH, \
             where luma can keep them"
        )),
        _ => Ok(()),
    }
}

/// `iptables -w 5 ARGS` on the engine's host, as the user luma runs as there.
async fn iptables(engine: &Engine, args: &[String]) -> Result<String, String> {
    let mut argv = vec!["iptables", "-w", "5"];
    argv.extend(args.iter().map(String::as_str));
    engine.host_output(&argv, LIMIT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Cidr {
        Cidr::parse("10.210.0.0/16").unwrap()
    }

    #[test]
    fn the_rule_is_scoped_to_the_pool_one_bridge_and_established_flows() {
        assert_eq!(
            rule(&pool()).join(" "),
            "-s 10.210.0.0/16 -d 10.210.0.0/16 -m physdev --physdev-is-bridged -m conntrack \
             --ctstate RELATED,ESTABLISHED -m comment --comment luma fast path 10.210.0.0/16 \
             -j ACCEPT"
        );
    }

    #[test]
    fn the_rule_is_known_by_its_comment_in_the_listing() {
        let with = "-N DOCKER-USER\n-A DOCKER-USER -s 10.210.0.0/16 -d 10.210.0.0/16 -m physdev \
                    --physdev-is-bridged -m conntrack --ctstate RELATED,ESTABLISHED -m comment \
                    --comment \"luma fast path 10.210.0.0/16\" -j ACCEPT\n-A DOCKER-USER -j RETURN\n";
        assert!(listed(with, &pool()));
        assert!(!listed(with, &Cidr::parse("10.211.0.0/16").unwrap()));
        assert!(!listed(
            "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n",
            &pool()
        ));
    }

    #[test]
    fn it_goes_before_dockers_final_return_after_the_operators_rules() {
        let docker = "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n";
        assert_eq!(
            insert_args(docker, &pool())[..3],
            ["-I", "DOCKER-USER", "1"]
        );
        let operator = "-N DOCKER-USER\n-A DOCKER-USER -i eth0 -j DROP\n-A DOCKER-USER -j RETURN\n";
        assert_eq!(
            insert_args(operator, &pool())[..3],
            ["-I", "DOCKER-USER", "2"]
        );
        // A rule an operator appended after Docker's RETURN is never reached; ours goes
        // before the RETURN all the same.
        let after = "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n-A DOCKER-USER -i eth0 -j DROP\n";
        assert_eq!(insert_args(after, &pool())[..3], ["-I", "DOCKER-USER", "1"]);
        // No final RETURN (an operator removed it): the end of the chain is reached anyway.
        let bare = "-N DOCKER-USER\n-A DOCKER-USER -i eth0 -j DROP\n";
        assert_eq!(insert_args(bare, &pool())[..2], ["-A", "DOCKER-USER"]);
        assert_eq!(
            insert_args("-N DOCKER-USER\n", &pool())[..2],
            ["-A", "DOCKER-USER"]
        );
    }

    #[test]
    fn the_firewall_is_touched_only_where_the_engine_is() {
        let here =
            |h: Option<&str>| firewall_is_the_engines(&Transport::Local, h.map(String::from));
        assert_eq!(here(None), Ok(()));
        assert_eq!(here(Some("")), Ok(()));
        assert_eq!(here(Some("unix:///var/run/docker.sock")), Ok(()));
        let e = here(Some("tcp://10.0.0.5:2376")).unwrap_err();
        assert!(
            e.contains("DOCKER_HOST=tcp://10.0.0.5:2376, not on this machine"),
            "{e}"
        );
        assert!(here(Some("ssh://deploy@app1")).is_err());
    }

    #[test]
    fn the_setting_is_on_unless_turned_off() {
        let env = |v: Option<&'static str>| move |_: &str| v.map(String::from);
        assert_eq!(enabled(env(None)), Ok(true));
        assert_eq!(enabled(env(Some("on"))), Ok(true));
        assert_eq!(enabled(env(Some(""))), Ok(true));
        assert_eq!(enabled(env(Some("off"))), Ok(false));
        assert_eq!(enabled(env(Some(" 0 "))), Ok(false));
        assert_eq!(enabled(env(Some("OFF"))), Ok(false));
        let e = enabled(env(Some("no"))).unwrap_err();
        assert!(
            e.starts_with("LUMA_HOST_FAST_PATH=\"no\": expected `on` or `off`"),
            "{e}"
        );
    }
}
