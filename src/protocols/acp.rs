//! The acp payment endpoint (see the acp issue): not yet wired; it serves no routes.

use axum::Router;
use clap::Args;

use super::ConfigError;
use crate::api::SharedState;

#[derive(Args, Debug, Clone, Default)]
pub struct AcpArgs {}

#[derive(Debug, Default)]
pub struct AcpConfig {}

impl AcpConfig {
    pub fn from_args(_args: &AcpArgs) -> Result<AcpConfig, ConfigError> {
        Ok(AcpConfig {})
    }
}

pub struct AcpService {}

impl AcpService {
    pub fn build(_config: AcpConfig) -> Result<AcpService, ConfigError> {
        Ok(AcpService {})
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
}
