//! The host fast path: one firewall rule per network pool, so packets of connections that are
//! already established inside Luma's networks skip Docker's per-network rules.
//!
//! Why: Docker puts about five rules into the host's FORWARD chains for every bridge network,
//! and with `br_netfilter` (which Docker turns on) the kernel walks them for every packet
//! between two containers of one network: the proxy and its backends. At 200 project networks
//! that is about 1,000 rules per packet. Measured on one engine (docs/scale.md), 200 networks
//! the proxy was not even on cut the requests through one host to 0.67x and raised the
//! proxy's CPU per request 1.7x; with this rule both came back to the 1-network figures.
//!
//! The rule goes into `DOCKER-USER`, the chain Docker keeps for its users and never rewrites:
//!
//! ```text
//! -s POOL -d POOL -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "luma fast path POOL" -j ACCEPT
//! ```
//!
//! It gives the verdict Docker's own rules give. A connection is ESTABLISHED only once its
//! first packet was accepted, and that first packet still walks all of Docker's rules,
//! including the isolation between networks, so no project reaches another through it. It is
//! inserted before the chain's final `RETURN`, so the operator's own rules there still come
//! first.
//!
//! Every deploy and setup makes sure it is there (a reboot empties `DOCKER-USER`); that is one
//! `iptables -S` and one `-C` on the host. It needs root on the host, or sudo without a
//! password. When it cannot be added the deploy goes on and says why: it is only speed.
//! `LUMA_HOST_FAST_PATH=off` turns it off (the environment, like the pool: it belongs to the
//! servers).

use crate::engine::Engine;
use crate::netpool::Cidr;
use std::time::Duration;

pub const ENV: &str = "LUMA_HOST_FAST_PATH";

/// The chain Docker leaves to its users; FORWARD jumps to it before any of Docker's rules.
const CHAIN: &str = "DOCKER-USER";

/// Each iptables call: waits up to 5 s for the xtables lock (Docker takes it too), and is
/// killed after this.
const LIMIT: Duration = Duration::from_secs(20);

/// Whether the fast path is on, from `LUMA_HOST_FAST_PATH` (`var` looks a variable up):
/// unset, empty, `on`, `1`, `true` are on; `off`, `0`, `false` are off.
pub fn enabled(var: impl Fn(&str) -> Option<String>) -> Result<bool, String> {
    match var(ENV).as_deref().map(str::trim) {
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
/// (`iptables -S DOCKER-USER`): before its final `-j RETURN` (Docker ends the chain with one),
/// else at its end.
pub fn insert_args(listing: &str, pool: &Cidr) -> Vec<String> {
    let rules: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&format!("-A {CHAIN} ")))
        .collect();
    let mut args = match rules.last() {
        Some(last) if *last == format!("-A {CHAIN} -j RETURN") => {
            vec!["-I".to_string(), CHAIN.into(), rules.len().to_string()]
        }
        _ => vec!["-A".to_string(), CHAIN.into()],
    };
    args.extend(rule(pool));
    args
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

/// Makes sure the host of `engine` has the fast-path rule for `pool`. Never fails the deploy:
/// a host without it is slower, not broken.
pub async fn ensure(engine: &Engine, pool: &Cidr) -> Outcome {
    let ipt = Iptables { engine };
    let listing = match ipt.run(&["-S", CHAIN]).await {
        Ok(l) => l,
        Err(e) => return Outcome::Unavailable(e),
    };
    let mut check = vec!["-C".to_string(), CHAIN.into()];
    check.extend(rule(pool));
    if ipt.run_owned(&check).await.is_ok() {
        return Outcome::Present;
    }
    match ipt.run_owned(&insert_args(&listing, pool)).await {
        Ok(_) => Outcome::Added,
        Err(e) => Outcome::Unavailable(e),
    }
}

/// `iptables` on the engine's host: as the user luma runs as there, then through `sudo -n`
/// when that user may not.
struct Iptables<'a> {
    engine: &'a Engine,
}

impl Iptables<'_> {
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut argv = vec!["iptables", "-w", "5"];
        argv.extend_from_slice(args);
        match self.engine.host_output(&argv, LIMIT).await {
            Ok(out) => Ok(out),
            Err(e) if not_permitted(&e) => {
                let mut sudo = vec!["sudo", "-n"];
                sudo.extend_from_slice(&argv);
                self.engine
                    .host_output(&sudo, LIMIT)
                    .await
                    .map_err(|s| format!("{e}; with sudo: {s}"))
            }
            Err(e) => Err(e),
        }
    }

    async fn run_owned(&self, args: &[String]) -> Result<String, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args).await
    }
}

fn not_permitted(err: &str) -> bool {
    let e = err.to_ascii_lowercase();
    e.contains("permission denied") || e.contains("must be root")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Cidr {
        Cidr::parse("10.210.0.0/16").unwrap()
    }

    #[test]
    fn the_rule_is_scoped_to_the_pool_and_established_flows() {
        assert_eq!(
            rule(&pool()).join(" "),
            "-s 10.210.0.0/16 -d 10.210.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED \
             -m comment --comment luma fast path 10.210.0.0/16 -j ACCEPT"
        );
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
        // No final RETURN (an operator removed it): the end of the chain is reached anyway.
        let bare = "-N DOCKER-USER\n-A DOCKER-USER -i eth0 -j DROP\n";
        assert_eq!(insert_args(bare, &pool())[..2], ["-A", "DOCKER-USER"]);
        assert_eq!(
            insert_args("-N DOCKER-USER\n", &pool())[..2],
            ["-A", "DOCKER-USER"]
        );
    }

    #[test]
    fn the_setting_is_on_unless_turned_off() {
        let env = |v: Option<&'static str>| move |_: &str| v.map(String::from);
        assert_eq!(enabled(env(None)), Ok(true));
        assert_eq!(enabled(env(Some("on"))), Ok(true));
        assert_eq!(enabled(env(Some(""))), Ok(true));
        assert_eq!(enabled(env(Some("off"))), Ok(false));
        assert_eq!(enabled(env(Some(" 0 "))), Ok(false));
        let e = enabled(env(Some("no"))).unwrap_err();
        assert!(
            e.starts_with("LUMA_HOST_FAST_PATH=\"no\": expected `on` or `off`"),
            "{e}"
        );
    }

    #[test]
    fn a_refusal_for_lack_of_rights_is_told_from_other_failures() {
        assert!(not_permitted(
            "`iptables -w 5 -S DOCKER-USER` on local failed (exit status: 4): iptables v1.8.9 \
             (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
        ));
        assert!(!not_permitted(
            "`iptables -w 5 -S DOCKER-USER` on local failed (exit status: 1): iptables: No chain/target/match by that name."
        ));
    }
}
