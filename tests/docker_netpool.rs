//! Project networks from Luma's address pool, against the real engine and this host's real
//! routing table: a new project network gets the first subnet of the pool that no Docker
//! network and no host route overlaps, and serves through the proxy; a pool with nothing
//! free fails the deploy naming the setting to change where it is set; a network that exists
//! already (made without a pool subnet, as older luma did) is used as it is. And the engine
//! side of the repair of two networks of one name (Docker before API 1.44 makes them).
//!
//! The pool is a /26 under 10.240-10.249 that this host uses nowhere (checked when it is
//! chosen, starting from this process's ID), so parallel runs and other tests never meet it.
//! One scenario, one proxy: each deploy costs seconds. It adds a blackhole route for part of
//! the pool (root, like tests/servers/up.sh) and removes it at the end, also on failure.

use luma_cli::engine::{Engine, Transport};
use luma_cli::netpool::{keeper, parse_routes, Cidr};
use luma_integration_tests::*;
use std::net::Ipv4Addr;

/// What the test makes besides luma's own objects, undone on drop (also when it fails).
#[derive(Default)]
struct Extras {
    networks: Vec<String>,
    routes: Vec<String>,
    /// Rules of DOCKER-USER, as the arguments after the chain name.
    rules: Vec<Vec<String>>,
}

impl Drop for Extras {
    fn drop(&mut self) {
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        for r in &self.routes {
            let _ = std::process::Command::new("ip")
                .args(["route", "del", "blackhole", r])
                .status();
        }
        for r in &self.rules {
            while iptables(
                &[
                    &["-D", "DOCKER-USER"],
                    &r.iter().map(String::as_str).collect::<Vec<_>>()[..],
                ]
                .concat(),
            )
            .is_ok()
            {}
        }
    }
}

/// `ip ARGS` (iproute2; these tests run as root), failing the test with its stderr unless it
/// succeeds.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} (this test runs as root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every range in use on this host: its routes and every Docker network's IPv4 subnets.
fn in_use() -> Vec<Cidr> {
    let table = std::fs::read_to_string("/proc/net/route").expect("/proc/net/route");
    let mut used: Vec<Cidr> = parse_routes(&table)
        .expect("the routing table")
        .into_iter()
        .map(|t| t.net)
        .collect();
    let ids = docker(&["network", "ls", "-q"]).expect("docker network ls");
    for id in ids.lines() {
        // A network may go between the list and the inspect: it then uses nothing.
        if let Ok(subnets) = docker(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            id,
        ]) {
            used.extend(subnets.split_whitespace().filter_map(Cidr::from_engine));
        }
    }
    used
}

/// A /26 in 10.240.0.0-10.249.255.255 that nothing on this host overlaps, the search starting
/// at a place derived from this process's ID and `test` (tests of this file run at once, and
/// each needs a pool of its own).
fn free_pool(test: usize) -> Cidr {
    let used = in_use();
    let slots = 10 * 256 * 4;
    let start = (std::process::id() as usize + test * slots / 2) % slots;
    (0..slots)
        .map(|i| (start + i) % slots)
        .map(|s| {
            let addr = Ipv4Addr::new(
                10,
                240 + (s / 1024) as u8,
                (s / 4 % 256) as u8,
                (s % 4 * 64) as u8,
            );
            Cidr::new(addr, 26).expect("a /26")
        })
        .find(|c| !used.iter().any(|u| u.overlaps(c)))
        .expect("no free /26 in 10.240.0.0-10.249.255.255 on this host")
}

/// The `i`th /28 of a /26 pool.
fn sub28(pool: &Cidr, i: u8) -> String {
    let [a, b, c, d] = pool.addr().octets();
    format!("{}/28", Ipv4Addr::new(a, b, c, d + 16 * i))
}

fn app(host: &str, network: &str) -> String {
    format!(
        "{network}apps:\n  web:\n    image: {}\n    health_check: {{path: /up, interval: 200ms}}\n    proxy: {{hosts: [{host}], app_port: 3000, ssl: false}}\n",
        demo_image()
    )
}

fn subnets_of(network: &str) -> String {
    docker(&[
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        network,
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn project_of(lab: &CliLab, host: &str) -> (u16, String) {
    let (status, body) = Http::new(&lab.http_addr())
        .get(host, "/")
        .unwrap_or_else(|e| panic!("{host}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    (
        status,
        v["project"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn project_networks_come_from_the_pool_skip_what_is_taken_and_say_when_it_is_full() {
    let lab = CliLab::new("netpool");
    let mut extras = Extras::default();
    // Four /28s: the 1st taken by a network made here, the 3rd and 4th by a host route. Only
    // the 2nd is free.
    let pool = free_pool(0);
    let taken_net = format!("{}-taken", lab.prefix);
    extras.networks.push(taken_net.clone());
    docker(&[
        "network",
        "create",
        "--label",
        "luma.test=1",
        "--subnet",
        &sub28(&pool, 0),
        &taken_net,
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let [a, b, c, d] = pool.addr().octets();
    let route = format!("{}/27", Ipv4Addr::new(a, b, c, d + 32));
    extras.routes.push(route.clone());
    ip(&["route", "add", "blackhole", &route]);

    // The pool from luma.yml: the free /28 is taken, and serves.
    let shop_host = format!("shop.{}.test", lab.prefix);
    let (shop_dir, shop) = lab.project(
        "shop",
        &app(
            &shop_host,
            &format!("network:\n  pool: {pool}\n  subnet_size: 28\n"),
        ),
    );
    let (ok, out, err) = lab.luma(&shop_dir, &["deploy"]);
    assert!(ok, "deploy shop:\n{out}\n{err}");
    let free = sub28(&pool, 1);
    assert_eq!(subnets_of(&format!("{shop}-network")), free);
    assert!(
        err.contains(&format!("create network {shop}-network in pool {pool}"))
            && err.contains(&format!("network {shop}-network ({free})")),
        "the step shows the pool and the subnet:\n{err}"
    );
    assert_eq!(project_of(&lab, &shop_host), (200, shop.clone()));

    // The same pool from the environment (it wins over the file's roomy one): nothing is free,
    // and the error says what takes it and what to set.
    let roomy = "network: {pool: 10.0.0.0/8}\n";
    let blog_host = format!("blog.{}.test", lab.prefix);
    let (blog_dir, blog) = lab.project("blog", &app(&blog_host, roomy));
    let full_pool = pool.to_string();
    let full = [
        ("LUMA_NETWORK_POOL", full_pool.as_str()),
        ("LUMA_NETWORK_SUBNET_SIZE", "28"),
    ];
    let run = lab.luma_run(&blog_dir, &["deploy"], &full);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let e = run.stderr;
    for want in [
        format!("server local: no free subnet for network {blog}-network: the pool {pool} (LUMA_NETWORK_POOL) has 4 subnets of /28 (LUMA_NETWORK_SUBNET_SIZE)"),
        format!("Docker networks {taken_net} ({}), {shop}-network ({free})", sub28(&pool, 0)),
        format!("host routes {route} dev *"),
        // The pool is set in the environment, so that is what to change: the file's
        // `network.pool` is overridden.
        format!(
            "Set LUMA_NETWORK_POOL (it is set in the environment, which wins over `network.pool` \
             in {}) to a larger range or another one, inside 10.0.0.0/8, 172.16.0.0/12 or \
             192.168.0.0/16, that server local does not use",
            blog_dir.join("luma.yml").display()
        ),
    ] {
        assert!(e.contains(&want), "the error does not say {want:?}:\n{e}");
    }
    // Subnets are at their smallest (/28): no advice to shrink them; and no concrete range,
    // which might itself be taken.
    assert!(
        !e.contains("smaller subnet") && !e.contains("pool: "),
        "{e}"
    );
    assert!(
        docker(&["network", "inspect", &format!("{blog}-network")]).is_err(),
        "a network was created from a full pool"
    );
    assert!(project_containers(&blog, &[]).is_empty());

    // A network made without a pool subnet (Docker's default pools, as older luma did) is
    // used as it is, even with the full pool: never recreated.
    let old_host = format!("old.{}.test", lab.prefix);
    let (old_dir, old) = lab.project("old", &app(&old_host, ""));
    let old_net = format!("{old}-network");
    let id = docker(&["network", "create", &old_net]).unwrap_or_else(|e| panic!("{e}"));
    let old_subnet = subnets_of(&old_net);
    assert!(
        !Cidr::from_engine(&old_subnet).is_some_and(|s| s.overlaps(&pool)),
        "{old_subnet}"
    );
    let run = lab.luma_run(&old_dir, &["deploy"], &full);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains(&format!("network {old_net} ({old_subnet})"))
            && !run.stderr.contains("create network"),
        "{}",
        run.stderr
    );
    assert_eq!(
        docker(&["network", "inspect", "--format", "{{.Id}}", &old_net]).unwrap(),
        id
    );
    assert_eq!(project_of(&lab, &old_host), (200, old));
    assert_eq!(project_of(&lab, &shop_host), (200, shop));
}

/// `POST /networks/create` straight to the engine, without the CLI's duplicate check (what a
/// second luma run does through bollard): the created network's ID, or the engine's refusal.
fn create_unchecked(name: &str) -> Result<String, String> {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    let body = serde_json::json!({"Name": name, "Labels": {"luma.test": "1"}}).to_string();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            &socket,
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", &body, "http://localhost/networks/create"])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    match reply["Id"].as_str() {
        Some(id) => Ok(id.to_string()),
        None => Err(reply.to_string()),
    }
}

#[tokio::test]
async fn networks_of_one_name_are_found_by_their_whole_name_and_the_first_made_stays() {
    let lab = Lab::new("netdup");
    let mut extras = Extras::default();
    let name = format!("{}-network", lab.prefix);
    // Names that contain it, which the engine's name filter also matches.
    for other in [format!("{name}-more"), format!("x{name}")] {
        let id = create_unchecked(&other).unwrap_or_else(|e| panic!("{other}: {e}"));
        extras.networks.push(id);
    }
    let first = create_unchecked(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
    extras.networks.push(first.clone());
    // An engine before API 1.44 makes a second one (with a warning); a newer one refuses.
    let second = create_unchecked(&name);
    if let Ok(id) = &second {
        extras.networks.push(id.clone());
    }
    let engine = Engine::connect(Transport::Local, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let all = engine
        .networks_named(&name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = all.iter().map(|n| n.id.as_str()).collect();
    let mut want = vec![first.as_str()];
    want.extend(second.as_deref().ok());
    let mut sorted = ids.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "{all:?}");
    assert!(all.iter().all(|n| n.subnets.len() == 1), "{all:?}");
    // The engine's Created times order them: the first made stays, whichever the list shows
    // first.
    let order: Vec<(&str, &str)> = all
        .iter()
        .map(|n| (n.id.as_str(), n.created.as_str()))
        .collect();
    let kept = keeper(&order).map(|i| order[i].0);
    assert_eq!(kept, Some(first.as_str()), "{all:?}");
    let reversed: Vec<(&str, &str)> = order.iter().rev().copied().collect();
    assert_eq!(
        keeper(&reversed).map(|i| reversed[i].0),
        Some(first.as_str())
    );
}

/// `iptables -w 5 ARGS` on this host (the tests run as root): stdout, or why it failed.
fn iptables(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(|e| format!("run iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Taken by each test that turns luma's fast path on, for its whole run. The edge rules a
/// deploy adds name every uplink of the host, the other test's client link too, and the first
/// rule in the chain takes the packets: counters read by one test would move with the other's
/// rules coming and going.
static FIREWALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lines of `iptables -v -S DOCKER-USER` (each with `-c PACKETS BYTES`).
fn docker_user() -> Vec<String> {
    iptables(&["-v", "-S", "DOCKER-USER"])
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .filter(|l| l.starts_with("-A DOCKER-USER "))
        .map(String::from)
        .collect()
}

/// The packets the rule with this comment has matched, per line of it in DOCKER-USER.
fn fast_path_packets(comment: &str) -> Vec<u64> {
    docker_user()
        .iter()
        .filter(|l| l.contains(&format!("\"{comment}\"")))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "-c").expect("-c in -v -S");
            words[at + 1].parse().expect("a packet count")
        })
        .collect()
}

#[test]
fn the_host_fast_path_carries_established_traffic_inside_the_pool() {
    let _alone = FIREWALL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CliLab::new("fastpath");
    let mut extras = Extras::default();
    // Its deploys add edge rules for its proxy too (tested below, in the edge test).
    let _edges = ProxyEdgeRules(lab.proxy.clone());
    let pool = free_pool(1);
    let rule = luma_cli::hostpath::rule(&pool);
    // Removed at the end even if the test fails; this pool is this test's alone.
    extras.rules.push(rule.clone());
    let comment = format!("luma fast path {pool}");
    let host = format!("fast.{}.test", lab.prefix);
    let (dir, project) = lab.project(
        "fast",
        &app(
            &host,
            &format!("network:\n  pool: {pool}\n  subnet_size: 28\n"),
        ),
    );
    let on = [("LUMA_HOST_FAST_PATH", "on")];

    let run = luma_ok(&lab, &dir, &["deploy"], &on);
    assert!(
        run.stderr.contains(&format!(
            "host fast path for pool {pool}: established traffic"
        )),
        "the deploy says it added the rule:\n{}",
        run.stderr
    );
    // Exactly the rule, once, before Docker's RETURN, the first bare one (after it, it would never be
    // reached), so rules an operator put in DOCKER-USER before it still come first.
    assert_eq!(fast_path_packets(&comment).len(), 1, "{:?}", docker_user());
    let lines = docker_user();
    let ours = lines.iter().position(|l| l.contains(&comment)).unwrap();
    if let Some(ret) = lines.iter().position(|l| l.ends_with("-j RETURN")) {
        assert!(
            ours < ret,
            "the rule comes before the first bare RETURN: {lines:?}"
        );
    }
    let check: Vec<&str> = ["-C", "DOCKER-USER"]
        .into_iter()
        .chain(rule.iter().map(String::as_str))
        .collect();
    iptables(&check).unwrap_or_else(|e| panic!("the rule luma_cli::hostpath::rule gives: {e}"));

    // Requests through the proxy to the app travel established connections between two
    // addresses of the pool: the rule sees their packets.
    let before: u64 = fast_path_packets(&comment).iter().sum();
    for _ in 0..20 {
        assert_eq!(project_of(&lab, &host), (200, project.clone()));
    }
    let after: u64 = fast_path_packets(&comment).iter().sum();
    assert!(
        after >= before + 20,
        "20 requests through the proxy: the rule matched {} packets",
        after - before
    );

    // Setup again: the rule is there, so nothing is added and nothing is said.
    let again = luma_ok(&lab, &dir, &["setup"], &on);
    assert!(
        !again.stderr.contains("host fast path for pool"),
        "{}",
        again.stderr
    );
    assert_eq!(fast_path_packets(&comment).len(), 1, "{:?}", docker_user());

    // Off: a deploy neither adds it nor needs it.
    iptables(&[&["-D", "DOCKER-USER"], &check[2..]].concat()).unwrap_or_else(|e| panic!("{e}"));
    luma_ok(&lab, &dir, &["setup"], &[("LUMA_HOST_FAST_PATH", "off")]);
    assert!(
        fast_path_packets(&comment).is_empty(),
        "{:?}",
        docker_user()
    );
    assert_eq!(project_of(&lab, &host), (200, project.clone()));

    // A value that is neither on nor off stops luma before it does anything, naming the fix.
    let bad = lab.luma_run(&dir, &["setup"], &[("LUMA_HOST_FAST_PATH", "maybe")]);
    assert_ne!(bad.code, Some(0));
    assert!(
        bad.stderr
            .contains("LUMA_HOST_FAST_PATH=\"maybe\": expected `on` or `off`"),
        "{}",
        bad.stderr
    );
}

/// A network namespace standing in for a client on another machine: a veth pair on a free
/// 198.19.N.M/30 (RFC 2544's benchmarking range; `benches/scale.py` uses 198.18), the host's
/// end `.1`, the client's `.2`. Its requests reach a port published on the host's end
/// through Docker's DNAT and the host's FORWARD chain, as a remote client's do. Removed on
/// drop, also when the test fails (deleting the namespace deletes both ends of the pair).
struct ClientNs {
    ns: String,
    host_if: String,
    host_ip: Ipv4Addr,
}

impl ClientNs {
    fn new(tag: &str) -> ClientNs {
        let used = in_use();
        let start = std::process::id() as usize % 16384;
        let net = (0..16384)
            .map(|i| (start + i) % 16384)
            .map(|s| Ipv4Addr::new(198, 19, (s / 64) as u8, (s % 64 * 4) as u8))
            .map(|a| Cidr::new(a, 30).expect("a /30"))
            .find(|c| !used.iter().any(|u| u.overlaps(c)))
            .expect("no free /30 in 198.19.0.0/16 on this host");
        let [a, b, c, d] = net.addr().octets();
        let id = format!("{:x}{tag}", std::process::id());
        let me = ClientNs {
            ns: format!("lumait-{tag}-{}", std::process::id()),
            // Interface names are at most 15 bytes.
            host_if: format!("li{}", &id[..id.len().min(12)]),
            host_ip: Ipv4Addr::new(a, b, c, d + 1),
        };
        let client_ip = Ipv4Addr::new(a, b, c, d + 2);
        let peer = format!("{}c", &me.host_if[..me.host_if.len().min(14)]);
        for args in [
            vec!["netns", "add", &me.ns],
            vec![
                "link",
                "add",
                &me.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &me.ns,
            ],
            vec![
                "addr",
                "add",
                &format!("{}/30", me.host_ip),
                "dev",
                &me.host_if,
            ],
            vec!["link", "set", &me.host_if, "up"],
            vec![
                "-n",
                &me.ns,
                "addr",
                "add",
                &format!("{client_ip}/30"),
                "dev",
                &peer,
            ],
            vec!["-n", &me.ns, "link", "set", &peer, "up"],
            vec!["-n", &me.ns, "link", "set", "lo", "up"],
            vec![
                "-n",
                &me.ns,
                "route",
                "add",
                "default",
                "via",
                &me.host_ip.to_string(),
            ],
        ] {
            ip(&args);
        }
        // A loose reverse-path filter on this link (the kernel takes the larger of `all` and
        // the link's): the spoofing check needs the host to let a spoofed SYN in, as it does
        // by default, and must not pass because a strict filter dropped it first.
        let rp = format!("/proc/sys/net/ipv4/conf/{}/rp_filter", me.host_if);
        std::fs::write(&rp, "2").unwrap_or_else(|e| panic!("write 2 to {rp}: {e}"));
        me
    }

    /// GET / with `Host: host` from the namespace to `port` on the host's end: (status,
    /// project the demo app names).
    fn project_of(&self, port: u16, host: &str) -> (u16, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "10"])
            .args(["-H", &format!("Host: {host}"), "-w", "\n%{http_code}"])
            .arg(format!("http://{}:{port}/", self.host_ip))
            .output()
            .expect("run curl in the client namespace");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        (
            status.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "curl from {}: {text} {}",
                    self.ns,
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
            v["project"].as_str().unwrap_or_default().to_string(),
        )
    }
}

impl ClientNs {
    /// Whether a GET from the namespace with source address `from` (added to the client's
    /// end of the pair for this) got any answer within 2 s.
    fn curl_from(&self, from: Ipv4Addr, port: u16, host: &str) -> bool {
        let peer = format!("{}c", &self.host_if[..self.host_if.len().min(14)]);
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{from}/32"),
            "dev",
            &peer,
        ]);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "2"])
            .args(["--interface", &from.to_string()])
            .args(["-H", &format!("Host: {host}"), "-o", "/dev/null"])
            .arg(format!("http://{}:{port}/", self.host_ip))
            .output()
            .expect("run curl in the client namespace");
        out.status.success()
    }
}

impl Drop for ClientNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Deletes, on drop, every edge rule luma made for this proxy (each names its proxy, so these
/// are the test's own): the firewall outlives the test.
struct ProxyEdgeRules(String);

impl Drop for ProxyEdgeRules {
    fn drop(&mut self) {
        let Ok(listing) = iptables(&["-S", "DOCKER-USER"]) else {
            return;
        };
        for l in luma_cli::hostpath::edge::listed(&listing) {
            if l.rule.is_some_and(|r| r.proxy == self.0) {
                let args: Vec<&str> = ["-D", "DOCKER-USER"]
                    .into_iter()
                    .chain(l.args.iter().map(String::as_str))
                    .collect();
                let _ = iptables(&args);
            }
        }
    }
}

/// Runs luma in `dir` and fails the test, with both streams, unless it exits 0.
fn luma_ok(lab: &CliLab, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let run = lab.luma_run(dir, args, env);
    assert_eq!(
        run.code,
        Some(0),
        "luma {}:\n{}\n{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run
}

/// The packets Docker's isolation dropped on their way into `bridge` (its rule in
/// DOCKER-ISOLATION-STAGE-2).
fn isolation_drops(bridge: &str) -> u64 {
    iptables(&["-v", "-S", "DOCKER-ISOLATION-STAGE-2"])
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .filter(|l| l.contains(&format!("-o {bridge} ")) && l.ends_with("-j DROP"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "-c").expect("-c in -v -S");
            words[at + 1].parse::<u64>().expect("a packet count")
        })
        .sum()
}

/// Over every proxy's edge rules whose comment starts with `prefix` (`luma edge in|out UPLINK
/// BRIDGE `): the packets they matched, and how many lines are `proxy`'s. Every proxy's: the
/// other test of this file makes rules for the same interfaces for its own proxy, and the
/// first in the chain takes the packets.
fn edge_packets(prefix: &str, proxy: &str) -> (u64, usize) {
    let mut sum = 0;
    let mut mine = 0;
    for l in docker_user() {
        let Some(comment) = l
            .split_once(&format!("--comment \"{prefix}"))
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(owner, _)| owner)
        else {
            continue;
        };
        let words: Vec<&str> = l.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "-c").expect("-c in -v -S");
        sum += words[at + 1].parse::<u64>().expect("a packet count");
        mine += usize::from(comment == proxy);
    }
    (sum, mine)
}

/// Sends 20 requests from the client, each on a connection of its own, all answered by
/// `project`, and checks that the edge rules `inward` and `outward` (comment prefixes, as for
/// [`edge_packets`]) carried them: one rule of this lab's proxy each way, and at least two
/// packets of every connection matched each way.
fn twenty_counted(
    client: &ClientNs,
    lab: &CliLab,
    host: &str,
    project: &str,
    inward: &str,
    outward: &str,
) {
    let ((in0, lines_in), (out0, lines_out)) = (
        edge_packets(inward, &lab.proxy),
        edge_packets(outward, &lab.proxy),
    );
    assert_eq!((lines_in, lines_out), (1, 1), "{:?}", docker_user());
    for _ in 0..20 {
        assert_eq!(
            client.project_of(lab.http_port, host),
            (200, project.to_string())
        );
    }
    let (in1, out1) = (
        edge_packets(inward, &lab.proxy).0,
        edge_packets(outward, &lab.proxy).0,
    );
    assert!(
        in1 >= in0 + 40 && out1 >= out0 + 40,
        "20 requests from the client: {inward}*, {outward}* matched {} packets in and {} out",
        in1.saturating_sub(in0),
        out1.saturating_sub(out0)
    );
}

#[test]
fn the_edge_fast_path_carries_clients_connections_and_follows_the_proxys_ports() {
    let _alone = FIREWALL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = CliLab::new("edge");
    let mut extras = Extras::default();
    let client = ClientNs::new("edge");
    let _edges = ProxyEdgeRules(lab.proxy.clone());
    let pool = free_pool(2);
    extras.rules.push(luma_cli::hostpath::rule(&pool));
    let host = format!("edge.{}.test", lab.prefix);
    let (dir, project) = lab.project(
        "edge",
        &app(
            &host,
            &format!("network:\n  pool: {pool}\n  subnet_size: 28\n"),
        ),
    );
    // The proxy's HTTP port is published on the client's link, not on loopback (which
    // Docker serves through its userland proxy, with no DNAT and no FORWARD).
    let published = format!("{}:{}", client.host_ip, lab.http_port);
    let env = [
        ("LUMA_HOST_FAST_PATH", "on"),
        ("LUMA_HTTP_PORT", published.as_str()),
    ];
    let run = luma_ok(&lab, &dir, &["deploy"], &env);
    let pair = format!("{} <-> docker0", client.host_if);
    assert!(
        run.stderr.contains("host fast path for clients") && run.stderr.contains(&pair),
        "the deploy says it added the edge rules for {pair}:\n{}",
        run.stderr
    );
    let inward = format!("luma edge in {} docker0 ", client.host_if);
    let outward = format!("luma edge out {} docker0 ", client.host_if);
    // Every proxy's reply rules, for any uplink: whichever comes first would take the SYN-ACK.
    let replies = "luma edge out ";
    // First, before any client traffic (a connection's last packets may still be on their way
    // after curl exits, and would count): a client that spoofs a source address inside a
    // network the proxy is not on. The SYN is DNATed to the proxy, whose SYN-ACK is routed
    // towards that network's bridge. The reply rule is pinned to the client's link, so it does
    // not match, and Docker's isolation drops the SYN-ACK. The client's next SYN may match the
    // inward rule: the SYN-ACK made the connection ESTABLISHED before it was dropped, and
    // Docker's own rules accept such a packet into the bridge too.
    let other = format!("{}-other", lab.prefix);
    docker(&["network", "create", &other]).unwrap_or_else(|e| panic!("{e}"));
    extras.networks.push(other.clone());
    let other_id = docker(&["network", "inspect", "--format", "{{.Id}}", &other])
        .unwrap_or_else(|e| panic!("{e}"));
    let other_bridge = format!("br-{}", &other_id.trim()[..12]);
    let spoofed = {
        let subnet = subnets_of(&other);
        let net = Cidr::from_engine(subnet.trim()).expect("the other network's subnet");
        let [a, b, c, d] = net.addr().octets();
        Ipv4Addr::new(a, b, c, d + 200)
    };
    let ours_before = edge_packets(replies, &lab.proxy).0;
    let drops_before = isolation_drops(&other_bridge);
    let spoof = client.curl_from(spoofed, lab.http_port, &host);
    assert!(!spoof, "a connection from a spoofed {spoofed} was answered");
    assert_eq!(
        edge_packets(replies, &lab.proxy).0,
        ours_before,
        "a reply rule accepted the SYN-ACK to a spoofed client: {:?}",
        docker_user()
    );
    // The SYN-ACK was sent, and dropped where Docker drops it: the check above saw a reply.
    assert!(
        isolation_drops(&other_bridge) > drops_before,
        "the SYN-ACK to the spoofed {spoofed} was not dropped by Docker's isolation into \
         {other_bridge}"
    );

    // 20 connections from the client: after each handshake, its packets to the proxy and the
    // proxy's replies (the SYN-ACK on) are established and DNATed, and match.
    twenty_counted(&client, &lab, &host, &project, &inward, &outward);

    // Docker moves the proxy's published ports to another of its networks when it leaves
    // `bridge`. The rules for docker0 then match nothing, and requests still go through
    // Docker's own rules.
    docker(&["network", "disconnect", "bridge", &lab.proxy]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        client.project_of(lab.http_port, &host),
        (200, project.clone())
    );
    let id = docker(&[
        "network",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{project}-network"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let bridge = format!("br-{}", &id.trim()[..12]);
    // The next setup follows them: the rules name the project network's bridge, and the
    // docker0 ones are gone.
    let again = luma_ok(&lab, &dir, &["setup"], &env);
    let pair = format!("{} <-> {bridge}", client.host_if);
    assert!(again.stderr.contains(&pair), "{}", again.stderr);
    assert_eq!(
        edge_packets(&inward, &lab.proxy).1,
        0,
        "{:?}",
        docker_user()
    );
    assert_eq!(
        edge_packets(&outward, &lab.proxy).1,
        0,
        "{:?}",
        docker_user()
    );
    let inward = format!("luma edge in {} {bridge} ", client.host_if);
    let outward = format!("luma edge out {} {bridge} ", client.host_if);
    twenty_counted(&client, &lab, &host, &project, &inward, &outward);

    // Setup again with nothing moved: nothing added, nothing removed, nothing said.
    let still = luma_ok(&lab, &dir, &["setup"], &env);
    assert!(
        !still.stderr.contains("host fast path for clients"),
        "{}",
        still.stderr
    );
    assert_eq!(
        edge_packets(&inward, &lab.proxy).1,
        1,
        "{:?}",
        docker_user()
    );
}
