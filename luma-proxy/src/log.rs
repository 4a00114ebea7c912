//! Structured logs: one JSON object per line. Events go to stderr, access lines to stdout.
//!
//! Nothing secret is ever passed here: the admin token is only compared, never formatted.

use serde::Serialize;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

fn ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn event(level: &str, msg: &str, fields: serde_json::Value) {
    let mut line = serde_json::json!({"ts": ts(), "level": level, "msg": msg});
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    // eprintln! (not a raw stderr handle) so test harnesses capture it.
    eprintln!("{line}");
}

pub fn info(msg: &str, fields: serde_json::Value) {
    event("info", msg, fields)
}

pub fn warn(msg: &str, fields: serde_json::Value) {
    event("warn", msg, fields)
}

pub fn error(msg: &str, fields: serde_json::Value) {
    event("error", msg, fields)
}

#[derive(Serialize)]
pub struct AccessLine<'a> {
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_us: u64,
    pub route: Option<String>,
    pub backend: Option<String>,
    pub client: String,
}

pub fn access(line: &AccessLine<'_>) {
    #[derive(Serialize)]
    struct Stamped<'a> {
        ts: f64,
        #[serde(flatten)]
        line: &'a AccessLine<'a>,
    }
    if let Ok(s) = serde_json::to_string(&Stamped { ts: ts(), line }) {
        let _ = writeln!(std::io::stdout().lock(), "{s}");
    }
}
