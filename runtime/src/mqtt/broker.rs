//! The embedded broker: rumqttd inside runnel, for gateways with no broker
//! of their own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts a broker listening on `listen` (MQTT 3.1.1) and, if given,
/// `listen_v5` (MQTT 5), and returns once it accepts connections.
pub fn start(listen: SocketAddr, listen_v5: Option<SocketAddr>) -> Result<(), String> {
    // rumqttd reports a taken port only in its own log, from its own thread;
    // binding first turns that into an error runnel can show.
    for addr in std::iter::once(listen).chain(listen_v5) {
        TcpListener::bind(addr)
            .map_err(|e| format!("the embedded broker cannot listen on {addr}: {e}"))?;
    }
    let server = |name: &str, addr: SocketAddr| {
        let mut servers = HashMap::new();
        servers.insert(
            name.to_string(),
            ServerSettings {
                name: name.to_string(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 1,
                connections: ConnectionSettings {
                    connection_timeout_ms: 60_000,
                    max_payload_size: 1 << 20,
                    max_inflight_count: 1000,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            },
        );
        servers
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 1000,
            // Messages sit in segments per topic filter until every
            // subscriber has read them; a few small segments keep an idle
            // gateway's memory low.
            max_segment_size: 4 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(server("mqtt-3.1.1", listen)),
        v5: listen_v5.map(|addr| server("mqtt-5", addr)),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("runnel-broker".into())
        .spawn(move || {
            if let Err(err) = broker.start() {
                tracing::error!("the embedded broker stopped: {err}");
            }
        })
        .map_err(|e| format!("cannot start the embedded broker: {e}"))?;
    let started = Instant::now();
    while TcpStream::connect(listen).is_err() {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "the embedded broker did not start listening on {listen}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::info!(%listen, listen_v5 = ?listen_v5, "embedded broker started");
    Ok(())
}
