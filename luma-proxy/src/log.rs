//! Structured logs: one JSON object per line on stderr. Access lines go to stdout (`access`).
//!
//! Nothing secret is ever passed here: the admin token is only compared, never formatted.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as every log line stamps it (0 before 1970).
pub(crate) fn ts() -> f64 {
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
