//! HTTPS test helpers: a test CA (rcgen), and clients that say which certificate they got.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A CA that signs leaf certificates for tests.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate as a deploy sends it.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    pub sha256: String,
}

impl Leaf {
    pub fn custom(&self) -> luma_api::tls::CustomCertificate {
        luma_api::tls::CustomCertificate {
            chain_pem: self.chain_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        TestCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_valid(names, None)
    }

    /// A leaf valid between the given dates (year, month, day), or the default validity.
    pub fn leaf_valid(&self, names: &[&str], validity: Option<(Day, Day)>) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some(((y1, m1, d1), (y2, m2, d2))) = validity {
            params.not_before = rcgen::date_time_ymd(y1, m1, d1);
            params.not_after = rcgen::date_time_ymd(y2, m2, d2);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: sha256_hex(cert.der()),
        }
    }
}

impl TestCa {
    /// A leaf valid from long ago until `left` from now.
    pub fn leaf_for(&self, names: &[&str], left: Duration) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + left);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: sha256_hex(cert.der()),
        }
    }
}

/// (year, month, day).
pub type Day = (i32, u8, u8);

pub fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A client that trusts `roots_pem` only and offers `alpn`.
pub fn client_config(roots_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

/// A TLS connection with `sni`, verified against `roots_pem`. Err: the handshake failed.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    roots_pem: &str,
    alpn: &[&[u8]],
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(client_config(roots_pem, alpn)).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())
}

/// The SHA-256 of the leaf the server presented.
pub fn peer_sha256(s: &TlsStream<TcpStream>) -> String {
    let certs = s.get_ref().1.peer_certificates().unwrap();
    sha256_hex(certs[0].as_ref())
}

pub struct HttpsReply {
    pub status: u16,
    pub body: String,
    pub headers: hyper::HeaderMap,
    /// The ALPN protocol negotiated.
    pub alpn: Option<Vec<u8>>,
    pub peer_sha256: String,
}

/// One GET over HTTPS (h2 when `h2`, else HTTP/1.1), SNI and Host both `host`.
pub async fn https_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    roots_pem: &str,
    h2: bool,
) -> Result<HttpsReply, String> {
    let alpn: &[&[u8]] = if h2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    let s = connect(addr, host, roots_pem, alpn).await?;
    let negotiated = s.get_ref().1.alpn_protocol().map(|a| a.to_vec());
    let peer = peer_sha256(&s);
    let (status, headers, body) = send_get(s, host, path).await?;
    Ok(HttpsReply {
        status,
        body,
        headers,
        alpn: negotiated,
        peer_sha256: peer,
    })
}

/// Polls `f` until it returns Some or `secs` pass.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Accepts any server certificate and records the leaf it was shown: a test asks which
/// certificate (if any) the server presented, whatever the client would have made of it.
#[derive(Debug)]
struct Recorder {
    leaf: std::sync::Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap() = Some(sha256_hex(end_entity.as_ref()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SHA-256 of the leaf the server presents for `sni` (None: the handshake failed before
/// any certificate was shown, as for an unknown name). An IP literal sends no SNI.
pub async fn presented_leaf(addr: SocketAddr, sni: &str) -> Option<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        leaf: std::sync::Mutex::new(None),
        provider: provider.clone(),
    });
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(c)).connect(name, tcp),
    )
    .await
    .expect("handshake timed out");
    let leaf = recorder.leaf.lock().unwrap().clone();
    leaf
}

/// One GET over an established TLS stream (h2 when negotiated), with `host` as the Host (or
/// :authority). Err: the connection ended before a response.
pub async fn get_on(
    s: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let (status, _, body) = send_get(s, host, path).await?;
    Ok((status, body))
}

/// The one GET over an established TLS stream: h2 when negotiated (`host` as :authority),
/// else HTTP/1.1 (`host` as Host). Returns status, headers and body.
async fn send_get(
    s: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<(u16, hyper::HeaderMap, String), String> {
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    let resp = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        tx.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        tx.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// A TLS connection made with a given client configuration (one whose session store keeps
/// tickets between connections).
pub async fn connect_with(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())
}

/// Unpadded base64url (RFC 4648 section 5), written here apart from the proxy's own.
pub fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for &b in bytes {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(A[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(A[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

/// The RFC 7638 thumbprint of a P-256 PKCS#8 PEM key's public JWK: what an HTTP-01 answer
/// ends with for that account.
pub fn jwk_thumbprint(pkcs8_pem: &str) -> String {
    use ring::signature::KeyPair;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes()).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let point = pair.public_key().as_ref();
    // RFC 7638: the required members only, in lexical order, no whitespace.
    let jwk = format!(
        "{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
        base64url(&point[1..33]),
        base64url(&point[33..65])
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes());
    base64url(digest.as_ref())
}
