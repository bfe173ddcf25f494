//! The embedded broker: rumqttd inside runnel, for gateways with no broker
//! of their own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Size of each of the segments rumqttd keeps messages in; it keeps
/// `backlog_mb` worth of them per topic filter.
const SEGMENT_BYTES: usize = 4 << 20;

/// What the embedded broker takes, from its `[mqtt.NAME]` table.
pub struct BrokerLimits {
    /// Largest message a client may publish.
    pub max_payload: usize,
    /// Messages kept for a subscriber that reads slower than they come.
    pub backlog_mb: usize,
}

/// Starts a broker listening on `listen` for MQTT 5 (`v5`) or MQTT 3.1.1,
/// and returns once it accepts connections.
///
/// One version only: rumqttd 0.20 forwards an MQTT 5 publish's properties
/// to 3.1.1 subscribers as they are, and its 3.1.1 side panics writing them.
///
/// rumqttd keeps what was published in a log of bounded size per topic
/// filter and has no way to slow a publisher down: when a subscriber
/// (runnel's source) falls further behind than the backlog, the oldest
/// messages are dropped for it, acknowledged to their publishers or not.
/// rumqttd logs each such drop as a warning ("Read cursor start jumped"),
/// which runnel's log shows.
pub fn start(listen: SocketAddr, v5: bool, limits: &BrokerLimits) -> Result<(), String> {
    // rumqttd reports a taken port only in its own log, from its own thread;
    // binding first turns that into an error runnel can show.
    TcpListener::bind(listen)
        .map_err(|e| format!("the embedded broker cannot listen on {listen}: {e}"))?;
    let backlog_bytes = limits.backlog_mb.saturating_mul(1 << 20);
    // rumqttd keeps whole segments: a backlog below one is one that size.
    let segment_bytes = SEGMENT_BYTES.min(backlog_bytes).max(1 << 10);
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
                    max_payload_size: limits.max_payload,
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
            // subscriber has read them; segments are made as they fill, so
            // an idle gateway holds one.
            max_segment_size: segment_bytes,
            max_segment_count: backlog_bytes.div_ceil(segment_bytes).max(1),
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
