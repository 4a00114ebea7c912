//! The admin API client used by `luma-proxy deploy|check|remove|list|flush|status|metrics`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

pub struct AdminClient {
    pub addr: SocketAddr,
    pub token: String,
    pub timeout: Duration,
}

/// A reply: HTTP status and body text (JSON for every endpoint but /metrics).
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| serde_json::json!({"error": self.body.trim()}))
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl AdminClient {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Reply, String> {
        let fut = async {
            let stream = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| {
                format!("cannot reach the luma-proxy admin API at {}: {e}. Is luma-proxy running (and are you inside its container)?", self.addr)
            })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("admin handshake: {e}"))?;
            tokio::spawn(conn);
            let payload = body.map(|b| b.to_string()).unwrap_or_default();
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, self.addr.to_string())
                .header(AUTHORIZATION, format!("Bearer {}", self.token))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(payload)))
                .map_err(|e| format!("build request: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("admin request failed: {e}"))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("read admin reply: {e}"))?
                .to_bytes();
            Ok(Reply {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| format!("the admin API did not answer within {:?}", self.timeout))?
    }
}
