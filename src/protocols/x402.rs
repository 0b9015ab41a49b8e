//! The x402 payment endpoint (see the x402 issue): not yet wired; it serves no routes.

use axum::Router;
use clap::Args;

use super::ConfigError;
use crate::api::SharedState;

#[derive(Args, Debug, Clone, Default)]
pub struct X402Args {}

#[derive(Debug, Default)]
pub struct X402Config {}

impl X402Config {
    pub fn from_args(_args: &X402Args) -> Result<X402Config, ConfigError> {
        Ok(X402Config {})
    }
}

pub struct X402Service {}

impl X402Service {
    pub fn build(_config: X402Config) -> Result<X402Service, ConfigError> {
        Ok(X402Service {})
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
}
