//! Networking a provider client takes from the daemon without knowing why: a DNS resolver that
//! refuses addresses no provider may be reached at (the ledger's Redis, the daemon itself).

use std::sync::Arc;

/// A DNS resolver for a provider client. The daemon's refuses reserved addresses when the client
/// connects, so that a provider's name re-pointed after start-up cannot reach them.
#[derive(Clone)]
pub struct DnsResolver(pub Arc<dyn reqwest::dns::Resolve>);

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver(..)")
    }
}

impl reqwest::dns::Resolve for DnsResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.0.resolve(name)
    }
}

/// `builder` with `resolver` installed, when there is one.
pub fn with_resolver(builder: reqwest::ClientBuilder, resolver: Option<&DnsResolver>) -> reqwest::ClientBuilder {
    match resolver {
        // The client takes a sized resolver: the wrapper, which forwards to the shared one.
        Some(resolver) => builder.dns_resolver(Arc::new(resolver.clone())),
        None => builder,
    }
}
