//! An optional sink for protocol conformance checking: when configured, every message an
//! adapter sends to a provider is also written, as JSON, to `<dir>/<protocol>/<Type>/<n>.json`,
//! where `../shared/tools/conform` validates it against the official schemas. Messages of
//! protocols that publish no schema but whose official SDKs type them (the keyed APIs' OpenAI and
//! Anthropic requests) go to a separate folder, [`ConformanceSink::sdk_test_dir`], which
//! `scripts/conform-sdk` checks against those SDKs' request types.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct ConformanceSink {
    dirs: Vec<Arc<PathBuf>>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl ConformanceSink {
    /// A sink that writes nothing (production).
    pub fn disabled() -> ConformanceSink {
        ConformanceSink { dirs: Vec::new() }
    }

    pub fn to_dir(dir: impl Into<PathBuf>) -> ConformanceSink {
        ConformanceSink { dirs: vec![Arc::new(dir.into())] }
    }

    /// Records into `dir` as well.
    pub fn also_to(mut self, dir: impl Into<PathBuf>) -> ConformanceSink {
        self.dirs.push(Arc::new(dir.into()));
        self
    }

    /// Where tests record what they send, for `../shared/tools/conform`:
    /// `$SPENDCAP_CONFORMANCE_DIR`, or the workspace's `target/conformance`.
    pub fn test_dir() -> PathBuf {
        std::env::var_os("SPENDCAP_CONFORMANCE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/conformance"))
    }

    /// Where tests record messages checked by `scripts/conform-sdk` rather than by
    /// `../shared/tools/conform` (which refuses folders it has no schema for):
    /// `$SPENDCAP_CONFORMANCE_SDK_DIR`, or the workspace's `target/conformance-sdk`.
    pub fn sdk_test_dir() -> PathBuf {
        std::env::var_os("SPENDCAP_CONFORMANCE_SDK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/conformance-sdk"))
    }

    /// Records one message. Failures to write are ignored: conformance capture must never change
    /// what the daemon does.
    pub fn record(&self, protocol: &str, message_type: &str, message: &serde_json::Value) {
        let Ok(text) = serde_json::to_string_pretty(message) else { return };
        for dir in &self.dirs {
            let folder = dir.join(protocol).join(message_type);
            if std::fs::create_dir_all(&folder).is_err() {
                continue;
            }
            // Process id + counter: unique across the test binaries that write here at once.
            let name = format!("{}-{}.json", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
            let _ = std::fs::write(folder.join(name), &text);
        }
    }
}
