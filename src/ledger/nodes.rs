//! Where the ledger's Redis nodes are: every address of `SPENDCAP_REDIS_URL` as configured and as
//! resolved, and with a cluster every node `CLUSTER NODES` names. The daemon refuses these as
//! outbound destinations (see `protocols::reserved`).

use std::net::SocketAddr;

use redis::{ConnectionAddr, IntoConnectionInfo};

use super::RedisConfig;

/// Every address a Redis node of `config` answers on, as far as start-up can tell. Best effort:
/// the ledger is already connected, so a node that cannot be asked here is one it reached anyway.
pub async fn addresses(config: &RedisConfig) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for url in config.url.split(',').map(str::trim).filter(|url| !url.is_empty()) {
        let Ok(info) = url.into_connection_info() else { continue };
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
            // A Unix socket has no network address an outbound client could reach.
            _ => continue,
        };
        found.extend(resolve(&host, port).await);
        if config.cluster {
            for (host, port) in cluster_nodes(info, config.timeout).await {
                found.extend(resolve(&host, port).await);
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

async fn resolve(host: &str, port: u16) -> Vec<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => addresses.collect(),
        Err(err) => {
            tracing::warn!(%host, error = %err, "cannot resolve a Redis node's address to reserve it");
            Vec::new()
        }
    }
}

/// The `host:port` of every node in the cluster one node knows about (its endpoint, and its
/// announced hostname when it has one).
async fn cluster_nodes(info: redis::ConnectionInfo, timeout: std::time::Duration) -> Vec<(String, u16)> {
    let ask = async {
        let client = redis::Client::open(info).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut conn).await.ok()
    };
    let Ok(Some(text)) = tokio::time::timeout(timeout, ask).await else { return Vec::new() };
    parse_cluster_nodes(&text)
}

/// `<id> <ip:port@cport[,hostname]> <flags> …` per line.
fn parse_cluster_nodes(text: &str) -> Vec<(String, u16)> {
    let mut nodes = Vec::new();
    for line in text.lines() {
        let Some(endpoint) = line.split_whitespace().nth(1) else { continue };
        let (address, hostname) = endpoint.split_once(',').map_or((endpoint, None), |(a, h)| (a, Some(h)));
        let address = address.split('@').next().unwrap_or_default();
        let Some((ip, port)) = address.rsplit_once(':') else { continue };
        let Ok(port) = port.parse::<u16>() else { continue };
        if port == 0 {
            continue;
        }
        if !ip.is_empty() {
            nodes.push((ip.to_owned(), port));
        }
        if let Some(hostname) = hostname.filter(|h| !h.is_empty()) {
            nodes.push((hostname.to_owned(), port));
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_every_endpoint() {
        let text = "07c3 127.0.0.1:30004@31004,redis-4.local slave e7d1 0 1426238317239 4 connected\n\
                    67ed ::1:30002@31002 master - 0 1426238316232 2 connected 5461-10922\n\
                    8a1b :0@0 handshake - 0 0 0 disconnected\n";
        assert_eq!(
            parse_cluster_nodes(text),
            vec![("127.0.0.1".to_owned(), 30004), ("redis-4.local".to_owned(), 30004), ("::1".to_owned(), 30002)]
        );
    }
}
