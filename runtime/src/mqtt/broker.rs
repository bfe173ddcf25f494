//! The embedded broker: rumqttd inside runnel, for gateways with no broker
//! of their own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts a broker listening on `listen` for MQTT 5 (`v5`) or MQTT 3.1.1,
/// and returns once it accepts connections.
///
/// One version only: rumqttd 0.20 forwards an MQTT 5 publish's properties
/// to 3.1.1 subscribers as they are, and its 3.1.1 side panics writing them.
pub fn start(listen: SocketAddr, v5: bool) -> Result<(), String> {
    // rumqttd reports a taken port only in its own log, from its own thread;
    // binding first turns that into an error runnel can show.
    TcpListener::bind(listen)
        .map_err(|e| format!("the embedded broker cannot listen on {listen}: {e}"))?;
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
        v4: (!v5).then(|| server("mqtt-3.1.1", listen)),
        v5: v5.then(|| server("mqtt-5", listen)),
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
    tracing::info!(
        %listen,
        protocol = if v5 { "5" } else { "3.1.1" },
        "embedded broker started"
    );
    Ok(())
}
