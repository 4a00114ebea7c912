//! TLS for the HTTPS tests: a test CA that issues certificates (for pebble's own listener and
//! for custom certificates), a handshake probe that reports which certificate a server
//! presented (even when the handshake then fails), and a keep-alive HTTPS/1.1 client for
//! 127.0.0.1.
//!
//! The probe records the leaf the server sent before verifying it, so a test can tell "the
//! handshake failed before any certificate was sent" (an unknown SNI) from "a certificate was
//! sent but it is not valid for this name" (another host's certificate leaking).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, StreamOwned};
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connect, read and write limits of every TLS connection the tests open.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate authority of the test's own (ECDSA P-256), never trusted by anything else.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A leaf certificate and its key, as PEM, and the leaf's DER (what a server presents).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate (what a client trusts).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid from 2020 to 2099.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Parses PEM certificates (a bundle) into a root store; panics on none.
pub fn roots(pem: &str) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        store
            .add(der.expect("PEM certificate"))
            .expect("a usable root certificate");
    }
    assert!(!store.is_empty(), "no certificate in the roots PEM");
    Arc::new(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies like webpki with the given roots, and remembers the leaf the server presented.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client config trusting `roots`, offering `alpn`, recording the presented leaf in `seen`.
fn config(
    roots: &Arc<RootCertStore>,
    alpn: &[&str],
    seen: Arc<Mutex<Option<Vec<u8>>>>,
) -> Arc<ClientConfig> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .expect("verifier");
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording { inner, seen }))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// The name sent as SNI: a DNS name, or none at all when `sni` is None (rustls sends no SNI
/// for an IP address).
fn server_name(sni: Option<&str>) -> ServerName<'static> {
    match sni {
        Some(host) => ServerName::try_from(host.to_string()).expect("a valid DNS name"),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    }
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    assert!(
        addr.starts_with("127.0.0.1:"),
        "tests only talk to loopback"
    );
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let s = TcpStream::connect_timeout(&sock, IO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    s.set_write_timeout(Some(IO_TIMEOUT)).ok();
    s.set_nodelay(true).ok();
    Ok(s)
}

/// What one TLS handshake showed.
#[derive(Debug)]
pub struct Handshake {
    /// The leaf the server presented, if it got that far (also when verification failed).
    pub leaf: Option<Vec<u8>>,
    /// The protocol ALPN agreed on.
    pub alpn: Option<String>,
    /// Why the handshake failed; None when it completed and the certificate verified.
    pub error: Option<String>,
}

impl Handshake {
    /// Completed, and the certificate verified for the name sent.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// One TLS handshake with `addr` sending `sni` (None: no SNI), verifying against `roots`.
pub fn handshake(
    addr: &str,
    sni: Option<&str>,
    roots: &Arc<RootCertStore>,
    alpn: &[&str],
) -> Handshake {
    let seen = Arc::new(Mutex::new(None));
    let cfg = config(roots, alpn, seen.clone());
    let result = (|| {
        let tcp = connect(addr)?;
        let conn = ClientConnection::new(cfg, server_name(sni)).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        Ok::<_, String>(
            tls.conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        )
    })();
    let leaf = seen.lock().unwrap().take();
    match result {
        Ok(alpn) => Handshake {
            leaf,
            alpn,
            error: None,
        },
        Err(e) => Handshake {
            leaf,
            alpn: None,
            error: Some(e),
        },
    }
}

/// The leaf certificate `addr` serves for `host`, verified against `roots`.
pub fn served_leaf(addr: &str, host: &str, roots: &Arc<RootCertStore>) -> Result<Vec<u8>, String> {
    let h = handshake(addr, Some(host), roots, &["http/1.1"]);
    match (h.error, h.leaf) {
        (None, Some(leaf)) => Ok(leaf),
        (Some(e), _) => Err(e),
        (None, None) => Err("handshake completed without a certificate".into()),
    }
}

/// A keep-alive HTTPS/1.1 client for one 127.0.0.1 address and one host (SNI and Host, unless
/// built with [`Https::with_sni`]).
pub struct Https {
    addr: String,
    sni: String,
    host: String,
    config: Arc<ClientConfig>,
    conn: Option<BufReader<StreamOwned<ClientConnection, TcpStream>>>,
}

impl Https {
    pub fn new(addr: &str, host: &str, roots: &Arc<RootCertStore>) -> Https {
        Https::with_sni(addr, host, host, roots)
    }

    /// A client whose handshake sends `sni` (and verifies the certificate for it) while its
    /// requests say `Host: host`: what a client reusing one name's connection for another
    /// name does.
    pub fn with_sni(addr: &str, sni: &str, host: &str, roots: &Arc<RootCertStore>) -> Https {
        Https {
            addr: addr.to_string(),
            sni: sni.to_string(),
            host: host.to_string(),
            config: config(roots, &["http/1.1"], Arc::new(Mutex::new(None))),
            conn: None,
        }
    }

    /// Any method, optionally with `Connection: close` (then the next request opens a new
    /// connection and handshake); returns (status, body).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
        close: bool,
    ) -> Result<(u16, String), String> {
        if self.conn.is_none() {
            let tcp = connect(&self.addr)?;
            let conn = ClientConnection::new(self.config.clone(), server_name(Some(&self.sni)))
                .map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::new(StreamOwned::new(conn, tcp)));
        }
        let r = self.conn.as_mut().unwrap();
        let head = crate::request_head(method, &self.host, path, body, close);
        let res = crate::exchange(r, &head);
        let server_closes = matches!(res, Ok((_, _, true)));
        if close || server_closes || res.is_err() {
            if let Some(mut c) = self.conn.take() {
                // A clean close_notify; errors do not matter, the connection is dropped.
                c.get_mut().conn.send_close_notify();
                let _ = c.get_mut().flush();
            }
        }
        res.map(|(status, body, _)| (status, body))
    }

    /// GET with keep-alive.
    pub fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.request("GET", path, "", false)
    }
}

/// `curl` over HTTPS to `https://host:port/path` with `host` resolved to 127.0.0.1, trusting
/// only `cacert`, offering h2: returns (status, HTTP version as curl reports it: "2", "1.1").
pub fn curl_https(
    host: &str,
    port: u16,
    path: &str,
    cacert: &std::path::Path,
) -> Result<(u16, String), String> {
    curl_https_as(host, None, port, path, cacert)
}

/// [`curl_https`] with the handshake for `sni` (SNI and the name verified) and, when given,
/// the request for another `host` (`Host`, or `:authority` over h2).
pub fn curl_https_as(
    sni: &str,
    host: Option<&str>,
    port: u16,
    path: &str,
    cacert: &std::path::Path,
) -> Result<(u16, String), String> {
    let resolve = format!("{sni}:{port}:127.0.0.1");
    let url = format!("https://{sni}:{port}{path}");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--http2", "-m", "10", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{http_version}", "--cacert"])
        .arg(cacert)
        .args(["--resolve", &resolve, &url]);
    if let Some(host) = host {
        cmd.arg("-H").arg(format!("Host: {host}"));
    }
    let (status, rest) = curl_status(cmd, &url)?;
    Ok((
        status,
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// A plain-HTTP GET through curl (no redirects followed): (status, Location or "").
pub fn curl_http_location(addr: &str, host: &str, path: &str) -> Result<(u16, String), String> {
    let url = format!("http://{addr}{path}");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-m", "10", "-o", "/dev/null", "-H"])
        .arg(format!("Host: {host}"))
        .args(["-w", "%{http_code} %{redirect_url}", &url]);
    let (status, rest) = curl_status(cmd, &url)?;
    Ok((status, rest.trim().to_string()))
}

/// Runs curl whose `-w` output starts with the status code: (status, the rest of the output).
fn curl_status(mut cmd: std::process::Command, url: &str) -> Result<(u16, String), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run curl (apt-get install curl): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl {url}: {} {}",
            text,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (status, rest) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let status = status
        .trim()
        .parse()
        .map_err(|_| format!("curl {url}: unexpected output {text:?}"))?;
    Ok((status, rest.to_string()))
}
