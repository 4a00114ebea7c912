//! One deploy per project at a time, across processes: the lock is a created (never started)
//! container named after the project. Docker refuses a second container with the same name, so
//! taking the lock is atomic on the engine. A lock older than [`STALE_AFTER_S`] is taken over.

use crate::engine::{ContainerSpec, Engine};
use crate::names;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

pub const STALE_AFTER_S: u64 = 3600;

pub struct Lock {
    name: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Lock {
    pub async fn acquire(engine: &Engine, project: &str, image: &str) -> Result<Lock, String> {
        let name = names::lock_container(project);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string();
        let spec = ContainerSpec {
            name: name.clone(),
            image: image.to_string(),
            cmd: Some(vec!["lock".into()]),
            labels: HashMap::from([
                (names::LABEL_ROLE.to_string(), names::ROLE_LOCK.to_string()),
                (names::LABEL_PROJECT.to_string(), project.to_string()),
                ("luma.lock.pid".to_string(), std::process::id().to_string()),
                ("luma.lock.host".to_string(), host),
                ("luma.lock.since".to_string(), now().to_string()),
            ]),
            ..Default::default()
        };
        for _ in 0..2 {
            if engine.create(&spec).await? {
                return Ok(Lock { name });
            }
            let holder = engine.inspect(&name).await?;
            let labels = holder
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .unwrap_or_default();
            let since: u64 = labels
                .get("luma.lock.since")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let age = now().saturating_sub(since);
            if age > STALE_AFTER_S {
                engine.remove(&name).await?;
                continue;
            }
            return Err(format!(
                "another deploy of project {project:?} is running (pid {} on {}, for {age}s); wait for it to finish. If it died, remove its lock with `docker rm {name}`",
                labels.get("luma.lock.pid").map(String::as_str).unwrap_or("?"),
                labels.get("luma.lock.host").map(String::as_str).unwrap_or("?"),
            ));
        }
        Err(format!("could not take the deploy lock {name}"))
    }

    pub async fn release(self, engine: &Engine) {
        let _ = engine.remove(&self.name).await;
    }
}
