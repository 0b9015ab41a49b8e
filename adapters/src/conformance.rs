//! An optional sink for protocol conformance checking: when configured, every message an
//! adapter sends to a provider is also written, as JSON, to `<dir>/<protocol>/<Type>/<n>.json`,
//! where `../shared/tools/conform` validates it against the official schemas.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct ConformanceSink {
    dir: Option<Arc<PathBuf>>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl ConformanceSink {
    /// A sink that writes nothing (production).
    pub fn disabled() -> ConformanceSink {
        ConformanceSink { dir: None }
    }

    pub fn to_dir(dir: impl Into<PathBuf>) -> ConformanceSink {
        ConformanceSink { dir: Some(Arc::new(dir.into())) }
    }

    /// Records one message. Failures to write are ignored: conformance capture must never change
    /// what the daemon does.
    pub fn record(&self, protocol: &str, message_type: &str, message: &serde_json::Value) {
        let Some(dir) = &self.dir else { return };
        let folder = dir.join(protocol).join(message_type);
        if std::fs::create_dir_all(&folder).is_err() {
            return;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{n}.json",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        if let Ok(text) = serde_json::to_string_pretty(message) {
            let _ = std::fs::write(folder.join(name), text);
        }
    }
}
