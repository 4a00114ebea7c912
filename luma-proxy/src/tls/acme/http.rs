//! instant-acme's HTTP client, on hyper and tokio-rustls with roots and a resolver we control.
//!
//! - Roots: the public web roots (webpki-roots, compiled in: the image has no CA bundle) plus
//!   the operator's extra roots (`--acme-ca-root`), for a private or test CA.
//! - Names: an IP literal is dialled as is; a name is asked of the proxy's DNS server
//!   (`--dns`, Docker's 127.0.0.11 in the container, which knows container names and forwards
//!   the rest), never the system resolver.
//! - Bounds: a connect timeout per address, and one deadline for the whole request, response
//!   body included (capped at [`MAX_BODY`]). One connection per request: ACME traffic is a
//!   handful of requests per order.

use crate::resolve::Resolver;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HOST;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest ACME response read (a certificate chain is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct AcmeHttp {
    tls: tokio_rustls::TlsConnector,
    resolver: Arc<Resolver>,
}

fn other(msg: String) -> Error {
    Error::Other(msg.into())
}

impl AcmeHttp {
    /// `extra_roots_pem`: more trusted roots, PEM (the operator's CA root file).
    pub fn new(resolver: Arc<Resolver>, extra_roots_pem: Option<&str>) -> Result<AcmeHttp, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(pem) = extra_roots_pem {
            let mut n = 0;
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| format!("ACME CA root: not valid PEM ({e})"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("ACME CA root: not a usable certificate ({e})"))?;
                n += 1;
            }
            if n == 0 {
                return Err("ACME CA root: the PEM holds no CERTIFICATE block".into());
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(AcmeHttp {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            resolver,
        })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let tls = self.tls.clone();
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let uri = req.uri().to_string();
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, resolver, req)).await {
                Ok(r) => r,
                Err(_) => Err(other(format!(
                    "no answer from {uri} within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ))),
            }
        })
    }
}

async fn connect(
    resolver: &Resolver,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, Error> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ips: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => resolver.lookup_name(bare).await.map_err(other)?,
    };
    if ips.is_empty() {
        return Err(other(format!(
            "{host} has no address (asked the proxy's DNS server)"
        )));
    }
    let mut last = String::new();
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("connect {addr}: {e}"),
            Err(_) => last = format!("connect {addr}: timed out"),
        }
    }
    Err(other(last))
}

async fn send(
    tls: tokio_rustls::TlsConnector,
    resolver: Arc<Resolver>,
    req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, Error> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(other(format!("{uri}: the ACME client speaks https only")));
    }
    let host = uri
        .host()
        .ok_or_else(|| other(format!("{uri}: no host")))?
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = connect(&resolver, &host, port).await?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(bare).map_err(|e| other(format!("{host}: {e}")))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| other(format!("TLS with {host}:{port}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other(format!("HTTP with {host}:{port}: {e}")))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    if let Some(auth) = uri.authority() {
        if let Ok(v) = hyper::header::HeaderValue::from_str(auth.as_str()) {
            parts.headers.insert(HOST, v);
        }
    }
    parts.uri = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|e| other(format!("{uri}: {e}")))?;
    let rsp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| other(format!("{uri}: {e}")));
    let rsp = match rsp {
        Ok(r) => r,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    let (parts, body) = rsp.into_parts();
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| other(format!("{uri}: reading the answer: {e}")))?
        .to_bytes();
    conn.abort();
    Ok(BytesResponse::from(Response::from_parts(
        parts,
        Full::new(bytes),
    )))
}
