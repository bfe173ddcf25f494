//! One shape over rumqttc's MQTT 3.1.1 and MQTT 5 clients, so the rest of
//! runnel deals with a single connection type and a single event type.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5 as m5;
use rumqttc::{Outgoing, QoS};

/// What the connection needs to know of a message to acknowledge it.
#[derive(Debug, Clone)]
pub enum Delivery {
    V4(rumqttc::Publish),
    V5(m5::mqttbytes::v5::Publish),
}

/// A message from the broker, protocol details gone.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 user properties; empty on 3.1.1.
    pub properties: Vec<(String, String)>,
    /// For the acknowledgement; `None` at QoS 0.
    pub delivery: Option<Delivery>,
}

/// An event of the connection, as runnel cares about it.
#[derive(Debug)]
pub enum LinkEvent {
    Connected {
        session_present: bool,
        /// The largest packet the broker takes (MQTT 5 brokers may say).
        broker_max_packet: Option<usize>,
    },
    Message(Box<Message>),
    /// A publish left with this packet id (0 at QoS 0).
    Sent(u16),
    /// A publish is held back until the broker frees this packet id.
    AwaitingId(u16),
    /// The broker took the publish with this packet id, or refused it.
    Acked(u16, Result<(), String>),
    /// The broker answered a subscription; these filters it refused.
    Subscribed {
        refused: Vec<usize>,
    },
    Other,
}

/// Why the connection dropped, and whether trying again can help.
#[derive(Debug)]
pub struct LinkError {
    pub message: String,
    /// Refused credentials or authorization: retrying cannot help.
    pub fatal: bool,
}

/// What a publish carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outbound {
    pub topic: String,
    #[serde(with = "payload_b64")]
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<(String, String)>,
}

impl Outbound {
    /// Its size as a PUBLISH packet, fixed header included: what a broker's
    /// or this client's packet limit is measured against.
    pub fn packet_size(&self, v5: bool) -> usize {
        publish_size(
            &self.topic,
            self.payload.len(),
            self.qos,
            &self.properties,
            v5,
        )
    }
}

/// MQTT's own ceiling on a packet: a remaining length of at most
/// 268,435,455 bytes behind a fixed header of at most 5.
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// The size of a PUBLISH packet, fixed header included.
pub fn publish_size(
    topic: &str,
    payload: usize,
    qos: u8,
    properties: &[(String, String)],
    v5: bool,
) -> usize {
    let packet_id = if qos > 0 { 2 } else { 0 };
    let mut remaining = 2 + topic.len() + packet_id + payload;
    if v5 {
        // Each user property: its identifier byte and two length-prefixed strings.
        let props: usize = properties
            .iter()
            .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
            .sum();
        remaining += varint_len(props) + props;
    }
    1 + varint_len(remaining) + remaining
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

mod payload_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> m5::mqttbytes::QoS {
    match level {
        0 => m5::mqttbytes::QoS::AtMostOnce,
        1 => m5::mqttbytes::QoS::AtLeastOnce,
        _ => m5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Settings both protocols share.
#[derive(Clone)]
pub struct LinkOptions {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub clean_start: bool,
    pub credentials: Option<(String, String)>,
    pub tls: Option<rumqttc::TlsConfiguration>,
    pub max_packet_bytes: usize,
    pub inflight: u16,
    /// Requests the client may queue before the event loop takes them.
    pub request_capacity: usize,
}

/// The client half, cheap to clone, used from any task.
#[derive(Clone)]
pub enum LinkClient {
    V4(rumqttc::AsyncClient),
    V5(m5::AsyncClient),
}

/// The event-loop half, polled by the connection's own task.
pub enum LinkLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<m5::EventLoop>),
}

pub fn connect(options: LinkOptions, v5: bool) -> (LinkClient, LinkLoop) {
    let transport = match options.tls {
        Some(tls) => rumqttc::Transport::Tls(tls),
        None => rumqttc::Transport::Tcp,
    };
    if v5 {
        let mut o = m5::MqttOptions::new(options.client_id, options.host, options.port);
        o.set_keep_alive(options.keep_alive)
            .set_clean_start(options.clean_start)
            .set_manual_acks(true)
            .set_transport(transport)
            // Any message the broker holds is read, so one over
            // `max_packet_bytes` is dead-lettered by the source rather than
            // dropped by the broker unseen.
            .set_max_packet_size(Some(MQTT_MAX_PACKET as u32))
            .set_outgoing_inflight_upper_limit(options.inflight)
            .set_request_channel_capacity(options.request_capacity);
        o.set_network_options(network_options());
        if !options.clean_start {
            // MQTT 5 ends a session when its connection closes unless an
            // expiry is set; a day rides out any gateway outage worth riding.
            o.set_session_expiry_interval(Some(86_400));
        }
        if let Some((user, password)) = options.credentials {
            o.set_credentials(user, password);
        }
        let (client, eventloop) = m5::AsyncClient::new(o, options.request_capacity);
        (LinkClient::V5(client), LinkLoop::V5(Box::new(eventloop)))
    } else {
        let mut o = rumqttc::MqttOptions::new(options.client_id, options.host, options.port);
        o.set_keep_alive(options.keep_alive)
            .set_clean_session(options.clean_start)
            .set_manual_acks(true)
            .set_transport(transport)
            // Any message the broker sends is read: refusing one would drop
            // the connection, and the broker would send it again at once.
            // The source dead-letters those over `max_packet_bytes`.
            .set_max_packet_size(MQTT_MAX_PACKET, options.max_packet_bytes)
            .set_inflight(options.inflight)
            .set_request_channel_capacity(options.request_capacity);
        if let Some((user, password)) = options.credentials {
            o.set_credentials(user, password);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, options.request_capacity);
        eventloop.set_network_options(network_options());
        (LinkClient::V4(client), LinkLoop::V4(Box::new(eventloop)))
    }
}

/// Nagle's algorithm off: acknowledgements and publishes are small and an
/// input is acknowledged only after its outputs were, so holding a packet
/// back for the peer's delayed ACK stalls the whole pipeline by tens of ms.
fn network_options() -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network
}

impl LinkClient {
    pub fn is_v5(&self) -> bool {
        matches!(self, LinkClient::V5(_))
    }

    /// Queues a publish without waiting; fails only when the queue is full
    /// or the event loop is gone.
    pub fn try_publish(&self, out: &Outbound) -> Result<(), String> {
        let payload = Bytes::copy_from_slice(&out.payload);
        match self {
            LinkClient::V4(c) => c
                .try_publish(out.topic.as_str(), qos(out.qos), out.retain, payload)
                .map_err(|e| e.to_string()),
            LinkClient::V5(c) => {
                let properties = m5::mqttbytes::v5::PublishProperties {
                    user_properties: out.properties.clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    out.topic.as_str(),
                    qos5(out.qos),
                    out.retain,
                    payload,
                    properties,
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Queues an acknowledgement; `false` when the queue is full.
    pub fn try_ack(&self, delivery: &Delivery) -> bool {
        match (self, delivery) {
            (LinkClient::V4(c), Delivery::V4(p)) => c.try_ack(p).is_ok(),
            (LinkClient::V5(c), Delivery::V5(p)) => c.try_ack(p).is_ok(),
            // A delivery always comes from its own connection's client.
            _ => true,
        }
    }

    pub fn try_subscribe(&self, filters: &[String], level: u8) -> Result<(), String> {
        match self {
            LinkClient::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos(level))),
                )
                .map_err(|e| e.to_string()),
            LinkClient::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| m5::mqttbytes::v5::Filter {
                    // runnel subscribes again on every reconnect; a
                    // retained message already taken must not come
                    // back each time the session is resumed.
                    retain_forward_rule: m5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe,
                    ..m5::mqttbytes::v5::Filter::new(f.clone(), qos5(level))
                }))
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn disconnect(&self) {
        // A connection already down has nothing to close.
        match self {
            LinkClient::V4(c) => drop(c.disconnect().await),
            LinkClient::V5(c) => drop(c.disconnect().await),
        }
    }
}

impl LinkLoop {
    pub async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        match self {
            LinkLoop::V4(l) => l.poll().await.map(event_v4).map_err(error_v4),
            LinkLoop::V5(l) => l.poll().await.map(event_v5).map_err(error_v5),
        }
    }

    /// Takes the events rumqttc read or made but has not yet handed out;
    /// `poll` returns them one at a time, even after a reconnect.
    pub fn take_buffered(&mut self) -> Vec<LinkEvent> {
        match self {
            LinkLoop::V4(l) => l.state.events.drain(..).map(event_v4).collect(),
            LinkLoop::V5(l) => l.state.events.drain(..).map(event_v5).collect(),
        }
    }

    /// Forgets requests the client queued but the broker never took, so a
    /// reconnect does not send them behind runnel's back: the connection
    /// resends or spools them itself, in order.
    ///
    /// That includes a publish held back for a packet id the broker had not
    /// freed: rumqttc's `clean` keeps it, and while it is kept the event loop
    /// takes no new request, so a drop at that moment would stall every
    /// publish after the reconnect.
    pub fn forget_pending(&mut self) {
        match self {
            LinkLoop::V4(l) => {
                l.clean();
                l.pending.clear();
                l.state.collision = None;
            }
            LinkLoop::V5(l) => {
                l.clean();
                l.pending.clear();
                l.state.collision = None;
            }
        }
    }
}

fn outgoing(out: Outgoing) -> LinkEvent {
    match out {
        Outgoing::Publish(pkid) => LinkEvent::Sent(pkid),
        Outgoing::AwaitAck(pkid) => LinkEvent::AwaitingId(pkid),
        _ => LinkEvent::Other,
    }
}

fn event_v4(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
            session_present: ack.session_present,
            broker_max_packet: None,
        },
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message(Box::new(Message {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            properties: Vec::new(),
            delivery: (p.qos != QoS::AtMostOnce).then(|| Delivery::V4(p)),
        })),
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked(ack.pkid, Ok(())),
        Event::Incoming(Packet::SubAck(ack)) => LinkEvent::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .map(|(i, _)| i)
                .collect(),
        },
        Event::Outgoing(out) => outgoing(out),
        Event::Incoming(_) => LinkEvent::Other,
    }
}

fn event_v5(event: m5::Event) -> LinkEvent {
    use m5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use m5::Event;
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
            session_present: ack.session_present,
            broker_max_packet: ack
                .properties
                .as_ref()
                .and_then(|p| p.max_packet_size)
                .map(|max| max as usize),
        },
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message(Box::new(Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.clone(),
            properties: p
                .properties
                .as_ref()
                .map(|props| props.user_properties.clone())
                .unwrap_or_default(),
            delivery: (p.qos != m5::mqttbytes::QoS::AtMostOnce).then(|| Delivery::V5(p)),
        })),
        Event::Incoming(Packet::PubAck(ack)) => {
            let result = match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                reason => Err(format!(
                    "the broker refused the message: {reason:?}{}",
                    ack.properties
                        .and_then(|p| p.reason_string)
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )),
            };
            LinkEvent::Acked(ack.pkid, result)
        }
        Event::Incoming(Packet::SubAck(ack)) => LinkEvent::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| !matches!(c, SubscribeReasonCode::Success(_)))
                .map(|(i, _)| i)
                .collect(),
        },
        Event::Outgoing(out) => outgoing(out),
        Event::Incoming(_) => LinkEvent::Other,
    }
}

fn error_v4(err: rumqttc::ConnectionError) -> LinkError {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E};
    let login = matches!(
        err,
        E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized)
    );
    let fatal = login
        || matches!(err, E::ConnectionRefused(C::BadClientId))
        || matches!(&err, E::Tls(tls) if tls_is_fatal(tls));
    link_error(&err, fatal, certificate_alert(&err), login)
}

fn error_v5(err: m5::ConnectionError) -> LinkError {
    use m5::mqttbytes::v5::ConnectReturnCode as C;
    use m5::ConnectionError as E;
    let login = matches!(
        err,
        E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized)
    );
    let fatal = login
        || matches!(
            err,
            E::ConnectionRefused(
                C::ClientIdentifierNotValid
                    | C::BadClientId
                    | C::Banned
                    | C::BadAuthenticationMethod
            )
        )
        || matches!(&err, E::Tls(tls) if tls_is_fatal(tls));
    link_error(&err, fatal, certificate_alert(&err), login)
}

/// `login`: the broker refused the user name and password, or what the
/// client may do.
fn link_error(
    err: &dyn std::error::Error,
    fatal: bool,
    certificate_alert: bool,
    login: bool,
) -> LinkError {
    let mut message = describe(err);
    if login {
        message.push_str(
            ": check the user name and password the connection's username_env and \
             password_env name, and what the broker lets that user or client id do \
             (on AWS IoT Core, the certificate's policy)",
        );
    }
    if certificate_alert {
        message.push_str(
            ": the broker refused the TLS session over a certificate: it may want a client \
             certificate (cert_file and key_file), or not trust the one given",
        );
    }
    LinkError {
        message,
        fatal: fatal || certificate_alert,
    }
}

/// The broker ended the TLS session with an alert about certificates: with
/// TLS 1.3 that comes after the handshake, as an I/O error somewhere down
/// the error's causes, and the same files will meet it again.
fn certificate_alert(err: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut next = Some(err);
    while let Some(cause) = next {
        let tls = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            tls,
            Some(rustls::Error::AlertReceived(
                A::CertificateRequired
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
            ))
        ) {
            return true;
        }
        next = cause.source();
    }
    false
}

/// A TLS failure other than I/O is a matter of certificates and names:
/// the same files will fail the same way next time.
/// A refused certificate reaches here as I/O of kind `InvalidData`.
fn tls_is_fatal(err: &rumqttc::TlsError) -> bool {
    match err {
        rumqttc::TlsError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => true,
    }
}

/// The error with its causes, which for I/O and TLS say what actually failed.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
