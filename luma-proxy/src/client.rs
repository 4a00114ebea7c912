//! The admin API client used by `luma-proxy call|deploy|check|remove|list|flush|status|metrics`.
//!
//! Every failure becomes an [`ApiError`] whose kind says what the caller may assume: the API
//! could not be reached (`unreachable`: nothing was sent), it answered no (the reply's own kind:
//! nothing changed), or the request went out and no reply came (`no_reply`: unknown, ask again).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use luma_api::{ApiError, ErrorKind, Operation};
use std::net::SocketAddr;
use std::time::Duration;

pub struct AdminClient {
    pub addr: SocketAddr,
    pub token: String,
    /// Bound on the whole call; past it the outcome is unknown.
    pub timeout: Duration,
}

/// A reply: HTTP status and body text (JSON for every endpoint but /metrics).
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as the typed reply, or the typed error it carries.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.ok() {
            serde_json::from_str(&self.body).map_err(|e| {
                ApiError::new(
                    ErrorKind::NoReply,
                    format!("unreadable admin reply ({e}): {}", self.body.trim()),
                )
            })
        } else {
            Err(
                serde_json::from_str::<ApiError>(&self.body).unwrap_or_else(|_| {
                    ApiError::new(
                        ErrorKind::Internal,
                        format!("admin API answered {}: {}", self.status, self.body.trim()),
                    )
                }),
            )
        }
    }
}

impl AdminClient {
    /// One typed operation.
    pub async fn op<O: Operation>(&self, op: &O) -> Result<O::Reply, ApiError> {
        let method = Method::from_bytes(O::METHOD.as_bytes())
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let body = (method != Method::GET).then(|| serde_json::to_value(op).unwrap_or_default());
        self.call(method, O::PATH, body).await?.decode()
    }

    /// A raw call (for `/metrics` and `luma-proxy call`).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Reply, ApiError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let unreachable = |e: String| ApiError::new(ErrorKind::Unreachable, e);
        let no_reply = |e: String| ApiError::new(ErrorKind::NoReply, e);
        let connected = tokio::time::timeout_at(deadline, async {
            let stream = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| {
                unreachable(format!("cannot reach the luma-proxy admin API at {}: {e}. Is luma-proxy running (and are you inside its container)?", self.addr))
            })?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(format!("admin handshake: {e}")))?;
            tokio::spawn(conn);
            Ok::<_, ApiError>(sender)
        })
        .await
        .map_err(|_| unreachable(format!("the admin API at {} did not accept a connection", self.addr)))?;
        let mut sender = connected?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.addr.to_string())
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| unreachable(format!("build request: {e}")))?;
        // From here on the request may have reached the proxy: a failure is "no reply".
        tokio::time::timeout_at(deadline, async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| no_reply(format!("admin request failed: {e}")))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| no_reply(format!("read admin reply: {e}")))?
                .to_bytes();
            Ok(Reply {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        })
        .await
        .map_err(|_| {
            no_reply(format!(
                "the admin API did not answer within {:?}",
                self.timeout
            ))
        })?
    }
}
