//! The ap2 payment endpoint (see the ap2 issue): not yet wired; it serves no routes.

use axum::Router;
use clap::Args;

use super::ConfigError;
use crate::api::SharedState;

#[derive(Args, Debug, Clone, Default)]
pub struct Ap2Args {}

#[derive(Debug, Default)]
pub struct Ap2Config {}

impl Ap2Config {
    pub fn from_args(_args: &Ap2Args) -> Result<Ap2Config, ConfigError> {
        Ok(Ap2Config {})
    }
}

pub struct Ap2Service {}

impl Ap2Service {
    pub fn build(_config: Ap2Config) -> Result<Ap2Service, ConfigError> {
        Ok(Ap2Service {})
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
}
