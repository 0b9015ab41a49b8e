//! Addresses no agent may reach through the daemon, whatever `SPENDCAP_X402_ALLOW_PRIVATE` says:
//! every Redis node of the ledger and the daemon's own listen address.
//!
//! An agent that could make the daemon connect to Redis could speak Redis's text protocol there
//! (an HTTP request line is a Redis command too) and rewrite the ledger; one that could reach the
//! daemon itself could call the admin API from inside. The allow-list exists for providers on
//! private networks, and those never share an address *and port* with Redis or the daemon, so the
//! refusal is by address and port: `127.0.0.0/8` may be allow-listed for a local provider while
//! `127.0.0.1:6379` stays out of reach.
//!
//! A reserved address on loopback (or the unspecified address, `0.0.0.0` / `::`) covers every
//! loopback and unspecified address on its port (`127.0.0.2`, `[::1]`, `0.0.0.0` and
//! `[::ffff:127.0.0.1]` all reach a server bound to all local addresses), and an unspecified listen
//! address covers every address on its port.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

/// The reserved addresses, shared by every outbound client. Filled in at start-up: the Redis
/// nodes once the ledger is connected, the listen address once the listener is bound.
#[derive(Clone, Debug, Default)]
pub struct Reserved(Arc<RwLock<Vec<SocketAddr>>>);

impl Reserved {
    pub fn add(&self, address: SocketAddr) {
        let address = SocketAddr::new(canonical(address.ip()), address.port());
        if let Ok(mut addresses) = self.0.write() {
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
    }

    /// Every reserved address, for logs and tests.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.0.read().map(|addresses| addresses.clone()).unwrap_or_default()
    }

    /// Whether a connection to `ip` on `port` could reach a reserved address. A poisoned lock
    /// (a panic while adding) refuses everything: fail closed.
    pub fn covers(&self, ip: IpAddr, port: u16) -> bool {
        let Ok(addresses) = self.0.read() else { return true };
        let ip = canonical(ip);
        addresses.iter().any(|reserved| reserved.port() == port && same_host(reserved.ip(), ip))
    }

    /// Whether any reserved address has this port (a connection to another port reaches none).
    pub fn has_port(&self, port: u16) -> bool {
        self.0.read().map(|addresses| addresses.iter().any(|a| a.port() == port)).unwrap_or(true)
    }
}

/// A provider client's resolver: refuses a name that resolves to a reserved address on the port
/// of the client's base URL, when the client connects (a provider's name re-pointed at Redis after
/// start-up, say). IP literals never reach a resolver; start-up checks those
/// ([`first_reserved_url`]).
pub struct ReservedResolver {
    pub reserved: Reserved,
    pub port: u16,
}

impl ReservedResolver {
    /// The resolver for a client of `base_url` (`None`: the URL has no port; nothing to check).
    pub fn for_url(reserved: &Reserved, base_url: &str) -> Option<adapters::net::DnsResolver> {
        let port = reqwest::Url::parse(base_url).ok()?.port_or_known_default()?;
        Some(adapters::net::DnsResolver(Arc::new(ReservedResolver { reserved: reserved.clone(), port })))
    }
}

impl reqwest::dns::Resolve for ReservedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (reserved, port, host) = (self.reserved.clone(), self.port, name.as_str().to_owned());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            if let Some(addr) = addrs.iter().find(|addr| reserved.covers(addr.ip(), port)) {
                let refused = std::io::Error::other(format!(
                    "{host} resolves to {addr}, a Redis node of the ledger or this daemon: never fetched for an agent"
                ));
                return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The first configured provider URL (ACP merchants and PSP, AP2 Credential Provider, merchants
/// and v0.1 processor) whose host, as resolved now, is a reserved address on the URL's port, with
/// that address. Start-up refuses such a configuration.
pub async fn first_reserved_url(urls: &[String], reserved: &Reserved) -> Option<(String, SocketAddr)> {
    for text in urls {
        let Ok(url) = reqwest::Url::parse(text) else { continue };
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { continue };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(addresses) = tokio::net::lookup_host((host, port)).await else { continue };
        for address in addresses {
            if reserved.covers(address.ip(), port) {
                return Some((text.clone(), address));
            }
        }
    }
    None
}

fn same_host(reserved: IpAddr, ip: IpAddr) -> bool {
    reserved == ip || reserved.is_unspecified() || (is_local(reserved) && is_local(ip))
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are the IPv4 address they map.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn a_loopback_reservation_covers_every_local_spelling_on_its_port_only() {
        let reserved = Reserved::default();
        reserved.add(at("127.0.0.1:6379"));
        for covered in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"] {
            let ip: IpAddr = covered.parse().expect("ip");
            assert!(reserved.covers(ip, 6379), "{covered}:6379 is Redis");
            assert!(!reserved.covers(ip, 6380), "{covered}:6380 is not");
        }
        assert!(!reserved.covers("10.0.0.1".parse().expect("ip"), 6379));
        assert!(reserved.has_port(6379) && !reserved.has_port(80));
    }

    #[tokio::test]
    async fn a_provider_name_that_resolves_to_a_reserved_address_is_refused_when_connecting() {
        use reqwest::dns::Resolve;
        let reserved = Reserved::default();
        reserved.add(at("127.0.0.1:6390"));
        let name = |text: &str| text.parse::<reqwest::dns::Name>().expect("a name");
        let on_redis_port = ReservedResolver { reserved: reserved.clone(), port: 6390 };
        assert!(on_redis_port.resolve(name("localhost")).await.is_err(), "localhost:6390 is Redis");
        let elsewhere = ReservedResolver { reserved, port: 8443 };
        let addrs: Vec<SocketAddr> = elsewhere.resolve(name("localhost")).await.expect("another port").collect();
        assert!(addrs.iter().all(|a| a.port() == 8443 && a.ip().is_loopback()), "{addrs:?}");
    }

    #[test]
    fn an_unspecified_listen_address_covers_its_port_everywhere() {
        let reserved = Reserved::default();
        reserved.add(at("0.0.0.0:8402"));
        reserved.add(at("10.1.2.3:6379"));
        assert!(reserved.covers("203.0.113.9".parse().expect("ip"), 8402));
        assert!(reserved.covers("10.1.2.3".parse().expect("ip"), 6379));
        assert!(reserved.covers("::ffff:10.1.2.3".parse().expect("ip"), 6379));
        assert!(!reserved.covers("10.1.2.4".parse().expect("ip"), 6379));
    }
}
