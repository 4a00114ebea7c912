//! A real ACME server for the HTTPS tests: pebble (Let's Encrypt's test CA) and its DNS server
//! pebble-challtestsrv, in one container on a network of the test's own.
//!
//! The image is built from the host's Debian packages by `docker/pebble/image.sh` (nothing is
//! pulled). Each [`Pebble`] gets its own network, its own CA for pebble's HTTPS listener, and
//! its own config; pebble validates challenges against the ports of the proxy container it is
//! told about (by default 8080 and 8443, the proxy's own ports, since the proxy is connected to
//! the same network). challtestsrv answers every name with the address a test sets, so the
//! test hosts (`*.test`) resolve to the proxy. Dropping a [`Pebble`] removes the container,
//! disconnects whatever it connected, and removes the network, also when a test panics.

use crate::tls::{roots, Https, TestCa};
use crate::{docker, wait_for, Http};
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long pebble may take to answer its directory after the container starts.
const START_LIMIT: Duration = Duration::from_secs(30);

/// What pebble is configured with.
#[derive(Clone, Debug)]
pub struct PebbleOptions {
    /// The port pebble connects to for HTTP-01 (the proxy's HTTP port in its container).
    pub http_port: u16,
    /// The port pebble connects to for TLS-ALPN-01 (the proxy's HTTPS port).
    pub tls_port: u16,
    /// `certificateValidityPeriod` in seconds (pebble's default, 5 years, when None).
    pub validity_secs: Option<u64>,
}

impl Default for PebbleOptions {
    fn default() -> Self {
        PebbleOptions {
            http_port: 8080,
            tls_port: 8443,
            validity_secs: None,
        }
    }
}

/// The tag of the pebble image, built once per content (and once per test process).
pub fn pebble_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/pebble/image.sh");
            let out = std::process::Command::new(&script)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .clone()
}

/// One pebble + challtestsrv container on its own network.
pub struct Pebble {
    /// The network pebble is on; containers joined with [`Pebble::connect`] reach it by name.
    pub network: String,
    /// The container's name, which is also pebble's name on the network.
    pub container: String,
    dir: PathBuf,
    ca_pem: String,
    listener_roots: Arc<RootCertStore>,
    acme_addr: String,
    management_addr: String,
    dns_addr: String,
    connected: Mutex<Vec<String>>,
}

impl Pebble {
    /// Starts pebble and returns once its directory answers over HTTPS.
    pub fn start(opts: PebbleOptions) -> Pebble {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let image = pebble_image();
        let unique = format!(
            "{}-{}-{:04x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            crate::fastrand_u16()
        );
        let network = format!("luma-t-acme-{unique}");
        let container = format!("{network}-pebble");
        let dir = std::env::temp_dir().join(&network);
        // From here on, Drop cleans up whatever was created.
        let mut pebble = Pebble {
            network: network.clone(),
            container: container.clone(),
            dir: dir.clone(),
            ca_pem: String::new(),
            listener_roots: Arc::new(RootCertStore::empty()),
            acme_addr: String::new(),
            management_addr: String::new(),
            dns_addr: String::new(),
            connected: Mutex::new(Vec::new()),
        };
        docker(&["network", "create", "--label", "luma.test=1", &network])
            .unwrap_or_else(|e| panic!("{e}"));

        // Pebble's own HTTPS (directory and management) needs a certificate; the package
        // ships none. The proxy reaches it by container name, the tests by 127.0.0.1.
        let ca = TestCa::new(&format!("luma test pebble listener CA {unique}"));
        let leaf = ca.leaf(&[&container, "localhost", "127.0.0.1"]);
        pebble.ca_pem = ca.pem().to_string();
        pebble.listener_roots = roots(ca.pem());
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).expect("pebble temp dir");
        write_private(&etc.join("cert.pem"), &leaf.cert_pem);
        write_private(&etc.join("key.pem"), &leaf.key_pem);
        let mut config = serde_json::json!({
            "listenAddress": "0.0.0.0:14000",
            "managementListenAddress": "0.0.0.0:15000",
            "certificate": "/etc/pebble/cert.pem",
            "privateKey": "/etc/pebble/key.pem",
            "httpPort": opts.http_port,
            "tlsPort": opts.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(secs) = opts.validity_secs {
            config["certificateValidityPeriod"] = secs.into();
        }
        write_private(
            &etc.join("config.json"),
            &serde_json::json!({ "pebble": config }).to_string(),
        );

        docker(&[
            "create",
            "--name",
            &container,
            "--label",
            "luma.test=1",
            "--network",
            &network,
            "-p",
            "127.0.0.1::14000",
            "-p",
            "127.0.0.1::15000",
            "-p",
            "127.0.0.1::8055",
            // No validation sleeps, no rejected nonces, and no reuse of a valid authorization,
            // so an order shows its challenge: almost. Pebble 2.4 reuses one unless
            // `rand.Intn(100) > percent`, so 1 order in 100 that has a valid authorization to
            // reuse still does at 0 (the proxy's issued event then says "reused").
            "-e",
            "PEBBLE_VA_NOSLEEP=1",
            "-e",
            "PEBBLE_WFE_NONCEREJECT=0",
            "-e",
            "PEBBLE_AUTHZREUSE=0",
            &image,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let etc_src = format!("{}/.", etc.display());
        docker(&["cp", &etc_src, &format!("{container}:/etc/pebble/")])
            .unwrap_or_else(|e| panic!("{e}"));
        docker(&["start", &container]).unwrap_or_else(|e| panic!("{e}"));
        pebble.acme_addr = published(&container, "14000");
        pebble.management_addr = published(&container, "15000");
        pebble.dns_addr = published(&container, "8055");

        let ready = wait_for(START_LIMIT, || {
            let mut c = Https::new(&pebble.acme_addr, &container, &pebble.listener_roots);
            match c.get("/dir") {
                Ok((200, body)) if body.contains("newOrder") => Some(()),
                _ => None,
            }
        });
        if ready.is_none() {
            panic!(
                "pebble's directory never answered over HTTPS:\n{}",
                pebble.logs()
            );
        }
        wait_for(START_LIMIT, || {
            Http::new(&pebble.dns_addr)
                .request("GET", "challtestsrv", "/", "", true)
                .ok()
        })
        .unwrap_or_else(|| panic!("challtestsrv never answered:\n{}", pebble.logs()));
        pebble
    }

    /// The ACME directory, as a container on the pebble network reaches it (by name).
    pub fn directory_url(&self) -> String {
        format!("https://{}:14000/dir", self.container)
    }

    /// The CA certificate of pebble's own HTTPS listener (`proxy.acme.ca_root` in luma.yml).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes [`Pebble::ca_pem`] to `path` (e.g. beside a test's luma.yml).
    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, &self.ca_pem).expect("write pebble CA");
    }

    /// 127.0.0.1:port of the directory (port 14000), for tests that talk to pebble directly.
    pub fn acme_addr(&self) -> &str {
        &self.acme_addr
    }

    /// A GET on pebble's HTTPS management interface; (status, body).
    pub fn management_get(&self, path: &str) -> Result<(u16, String), String> {
        Https::new(&self.management_addr, &self.container, &self.listener_roots).get(path)
    }

    /// The root that signs the certificates pebble issues (new on every pebble start).
    pub fn issuing_root(&self) -> String {
        match self.management_get("/roots/0") {
            Ok((200, pem)) if pem.contains("BEGIN CERTIFICATE") => pem,
            other => panic!("pebble's /roots/0: {other:?}"),
        }
    }

    /// The trust store of the certificates pebble issues.
    pub fn issuing_roots(&self) -> Arc<RootCertStore> {
        roots(&self.issuing_root())
    }

    /// Connects `container` to the pebble network; returns its IPv4 address there.
    pub fn connect(&self, container: &str) -> String {
        docker(&["network", "connect", &self.network, container]).unwrap_or_else(|e| panic!("{e}"));
        self.connected.lock().unwrap().push(container.to_string());
        self.ip_of(container)
    }

    /// The IPv4 address of `container` on the pebble network.
    pub fn ip_of(&self, container: &str) -> String {
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip =
            docker(&["inspect", "--format", &fmt, container]).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !ip.is_empty(),
            "{container} has no address on {}",
            self.network
        );
        ip
    }

    /// pebble's own address on its network (nothing listens there on the proxy's ports).
    pub fn ip(&self) -> String {
        self.ip_of(&self.container)
    }

    /// The address challtestsrv answers for every name without an explicit record.
    pub fn set_default_ip(&self, ip: &str) {
        self.dns_post("/set-default-ipv4", serde_json::json!({ "ip": ip }));
    }

    /// An A record for one host, overriding the default.
    pub fn add_a(&self, host: &str, ip: &str) {
        self.dns_post(
            "/add-a",
            serde_json::json!({ "host": host, "addresses": [ip] }),
        );
    }

    fn dns_post(&self, path: &str, body: serde_json::Value) {
        let res = Http::new(&self.dns_addr).request(
            "POST",
            "challtestsrv",
            path,
            &body.to_string(),
            true,
        );
        match res {
            Ok((200, _)) => {}
            other => panic!("challtestsrv POST {path} {body}: {other:?}"),
        }
    }

    /// Everything pebble and challtestsrv logged so far.
    pub fn logs(&self) -> String {
        match std::process::Command::new("docker")
            .args(["logs", &self.container])
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker logs failed: {e})"),
        }
    }

    /// The challenge validations pebble ran for `host`, in order, read from its log (pebble
    /// 2.4): a task line naming the host opens one, `Attempting to validate w/ HTTP: <url>`
    /// lines name the host for HTTP-01 (TLS-ALPN-01 logs no such line), and `authz .. set
    /// VALID|INVALID` closes it. The outcome line does not name the host, so a validation
    /// that overlaps another host's cannot be attributed: that is an error, not a guess.
    pub fn validations(&self, host: &str) -> Result<Vec<Validation>, String> {
        const HTTP: &str = "Attempting to validate w/ HTTP: ";
        let task = format!("Value:\"{host}\"");
        let http_url = format!("http://{host}:");
        let mut done: Vec<Validation> = Vec::new();
        // The validations running, of any host: Some(index into `done`) for the host's own.
        let mut open: Vec<Option<usize>> = Vec::new();
        for line in self.logs().lines() {
            if line.contains("Pulled a task from the Tasks queue") {
                let ours = line.contains(&task).then(|| {
                    done.push(Validation {
                        http_urls: Vec::new(),
                        valid: None,
                    });
                    done.len() - 1
                });
                open.push(ours);
            } else if let Some(url) = line.split_once(HTTP).map(|(_, url)| url) {
                if !url.starts_with(&http_url) {
                    continue;
                }
                match open.iter().flatten().collect::<Vec<_>>().as_slice() {
                    [i] => done[**i].http_urls.push(url.to_string()),
                    _ => return Err(format!("cannot attribute pebble's line: {line}")),
                }
            } else if line.contains(" by completed challenge ") {
                if open.len() > 1 && open.iter().any(Option::is_some) {
                    return Err(format!("overlapping validations at pebble's line: {line}"));
                }
                if let Some(Some(i)) = open.pop() {
                    done[i].valid = Some(line.contains(" set VALID "));
                }
            }
        }
        Ok(done)
    }

    /// How many certificates pebble has issued so far (one log line each).
    pub fn issued_count(&self) -> usize {
        self.logs().matches("Issued certificate serial").count()
    }
}

/// One challenge validation of a host, as pebble logged it ([`Pebble::validations`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    /// The URLs pebble fetched (HTTP-01); empty for TLS-ALPN-01, which pebble does not log.
    pub http_urls: Vec<String>,
    /// Whether the authorization became valid; None while the validation runs.
    pub valid: Option<bool>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in self.connected.lock().unwrap().iter() {
            let _ = docker(&["network", "disconnect", "-f", &self.network, c]);
        }
        let _ = docker(&["rm", "-f", "-v", &self.container]);
        let _ = docker(&["network", "rm", &self.network]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a file only its owner can read (pebble's listener key is among them).
fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::Write::write_all(&mut f, text.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The 127.0.0.1 address a container port is published on.
fn published(container: &str, port: &str) -> String {
    let out = docker(&["port", container, port]).unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{container}:{port} not published on 127.0.0.1: {out}"))
        .to_string()
}
