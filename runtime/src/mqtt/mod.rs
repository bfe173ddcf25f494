//! MQTT: connections to brokers (or one embedded in runnel), the source and
//! sink that use them, and the spool that holds messages for a broker out of
//! reach.

mod broker;
mod conn;
mod link;
mod spool;
mod topic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use conn::{Connection, Gauges, Inbound, Subscription};
pub use link::{publish_size, Delivery, Message, Outbound};
pub use spool::{SpoolConfig, WhenFull, SPOOL_FILE};
pub use topic::{check_filter, filter_matches, refused_text, KeyPattern, TopicTemplate};

/// Default listener of the embedded broker.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// One `[mqtt.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// `"embedded"`, `"mqtt://host:port"` or `"mqtts://host:port"`.
    pub broker: Spanned<String>,
    /// Where the embedded broker listens for MQTT 3.1.1.
    pub listen: Option<Spanned<String>>,
    /// Where the embedded broker listens for MQTT 5, if at all.
    pub listen_v5: Option<Spanned<String>>,
    /// Stable across restarts, so a persistent session finds its messages.
    pub client_id: Option<Spanned<String>>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Start a fresh session each time instead of resuming the last one.
    #[serde(default)]
    pub clean_start: bool,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub cert_file: Option<Spanned<PathBuf>>,
    pub key_file: Option<Spanned<PathBuf>>,
    /// Names of environment variables holding the user name and password,
    /// so neither is written in the file.
    pub username_env: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    /// Publishes awaiting the broker's acknowledgement at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Largest message sent or received, in KiB.
    #[serde(default = "default_max_packet_kb")]
    pub max_packet_kb: usize,
    /// Embedded broker only: MB of messages kept per topic filter for a
    /// subscriber that falls behind.
    pub backlog_mb: Option<Spanned<usize>>,
    /// Store-and-forward for this broker.
    pub spool: Option<SpoolConfig>,
}

fn default_keep_alive_s() -> u64 {
    30
}
fn default_inflight() -> u16 {
    100
}
fn default_max_packet_kb() -> usize {
    1024
}

/// How far runnel's source may fall behind the embedded broker's
/// publishers before the broker drops the oldest messages for it.
pub const DEFAULT_BACKLOG_MB: usize = 64;

/// MQTT protocol version: `"3.1.1"` (the default) or `"5"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    V311,
    V5,
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(5) => Ok(Protocol::V5),
            Raw::Int(4) => Ok(Protocol::V311),
            Raw::Text(t) if t == "5" || t == "5.0" => Ok(Protocol::V5),
            Raw::Text(t) if t == "3.1.1" || t == "4" => Ok(Protocol::V311),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "protocol must be \"3.1.1\" or \"5\", not {n}"
            ))),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "protocol must be \"3.1.1\" or \"5\", not \"{t}\""
            ))),
        }
    }
}

/// Where a connection goes, parsed from `broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddress {
    Embedded,
    Remote { host: String, port: u16, tls: bool },
}

impl BrokerAddress {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(BrokerAddress::Embedded);
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("mqtt://") {
            (false, rest)
        } else if text.contains("://") {
            return Err(format!(
                "broker `{text}`: the scheme must be mqtt:// or mqtts://"
            ));
        } else {
            (false, text)
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || !port.is_empty() => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("broker `{text}`: `{port}` is not a port"))?;
                (host, port)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(format!(
                "broker `{text}` is not `embedded`, `mqtt://host:port` or `mqtts://host:port`"
            ));
        }
        Ok(BrokerAddress::Remote {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// A setting that cannot work, with the place in the file to point at.
#[derive(Debug)]
pub struct SettingError {
    pub span: std::ops::Range<usize>,
    pub message: String,
}

impl ConnectionConfig {
    /// Checks what can be checked without connecting.
    pub fn check(&self, name: &str, base_dir: &Path) -> Result<(), SettingError> {
        let at = |span: std::ops::Range<usize>, message: String| SettingError {
            span,
            message: format!("mqtt.{name}: {message}"),
        };
        let address =
            BrokerAddress::parse(self.broker.get_ref()).map_err(|m| at(self.broker.span(), m))?;
        let tls = matches!(address, BrokerAddress::Remote { tls: true, .. });
        if address != BrokerAddress::Embedded {
            if let Some(listen) = self.listen.as_ref().or(self.listen_v5.as_ref()) {
                return Err(at(
                    listen.span(),
                    "listen is for broker = \"embedded\"".into(),
                ));
            }
            if let Some(backlog) = &self.backlog_mb {
                return Err(at(
                    backlog.span(),
                    "backlog_mb is for broker = \"embedded\"".into(),
                ));
            }
        } else {
            for listen in [&self.listen, &self.listen_v5].into_iter().flatten() {
                listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                    at(
                        listen.span(),
                        format!(
                            "`{}` is not an address like 127.0.0.1:1883",
                            listen.get_ref()
                        ),
                    )
                })?;
            }
            if let Some(backlog) = self.backlog_mb.as_ref().filter(|b| *b.get_ref() == 0) {
                return Err(at(backlog.span(), "backlog_mb must be above 0".into()));
            }
            if let (Some(_), Some(v5)) = (&self.listen, &self.listen_v5) {
                return Err(at(
                    v5.span(),
                    "give listen (MQTT 3.1.1) or listen_v5 (MQTT 5), not both: the embedded \
                     broker (rumqttd 0.20) stops serving its 3.1.1 clients when an MQTT 5 \
                     client publishes with properties; for both versions at once, use an \
                     external broker such as mosquitto"
                        .into(),
                ));
            }
            match (self.protocol, &self.listen_v5) {
                (Protocol::V5, None) => {
                    return Err(at(
                        self.broker.span(),
                        "protocol = \"5\" with the embedded broker needs listen_v5".into(),
                    ))
                }
                (Protocol::V311, Some(v5)) => {
                    return Err(at(
                        v5.span(),
                        "with listen_v5 the embedded broker speaks MQTT 5 only: set \
                         protocol = \"5\""
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        const CERT: &str = "-----BEGIN CERTIFICATE-----";
        const KEY: &str = "PRIVATE KEY-----";
        let files = [
            (&self.ca_file, CERT),
            (&self.cert_file, CERT),
            (&self.key_file, KEY),
        ];
        for (file, wanted) in files {
            let Some(file) = file else { continue };
            if !tls {
                return Err(at(
                    file.span(),
                    "certificate files need an mqtts:// broker".into(),
                ));
            }
            let path = base_dir.join(file.get_ref());
            let text = std::fs::read_to_string(&path)
                .map_err(|e| at(file.span(), format!("cannot read {}: {e}", path.display())))?;
            if !text.contains(wanted) {
                return Err(at(
                    file.span(),
                    format!(
                        "{} holds no PEM `{}`",
                        path.display(),
                        wanted.trim_matches('-')
                    ),
                ));
            }
        }
        if let Some(file) = &self.cert_file {
            let path = base_dir.join(file.get_ref());
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(version @ 1..=2) = first_certificate_version(&text) {
                return Err(at(
                    file.span(),
                    format!(
                        "{} is an X.509 v{version} certificate, and TLS here (rustls) takes \
                         only v3 as a client certificate: issue it again with extensions, \
                         e.g. openssl x509 -req ... -extfile FILE, FILE holding \
                         extendedKeyUsage = clientAuth",
                        path.display()
                    ),
                ));
            }
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let cert_path = base_dir.join(cert.get_ref());
            let key_path = base_dir.join(key.get_ref());
            if let Err(reason) = key_fits_certificate(&cert_path, &key_path) {
                return Err(at(key.span(), reason));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let span = self
                .cert_file
                .as_ref()
                .or(self.key_file.as_ref())
                .map_or(0..0, |f| f.span());
            return Err(at(
                span,
                "a client certificate needs both cert_file and key_file".into(),
            ));
        }
        if self.username_env.is_none() && self.password_env.is_some() {
            let span = self.password_env.as_ref().map_or(0..0, |p| p.span());
            return Err(at(span, "password_env needs username_env".into()));
        }
        if self.inflight == 0 {
            return Err(at(self.broker.span(), "inflight must be above 0".into()));
        }
        if let Some(id) = self.client_id.as_ref().filter(|id| id.get_ref().is_empty()) {
            if !self.clean_start {
                return Err(at(
                    id.span(),
                    "client_id is empty, and a broker keeps a session (clean_start = false) \
                     only for a named client: leave client_id out for the default \
                     (runnel-HOST-PIPELINE-CONNECTION), or set clean_start = true"
                        .into(),
                ));
            }
        }
        if let Some(spool) = &self.spool {
            if spool.max_mb == 0 {
                return Err(at(
                    self.broker.span(),
                    "spool.max_mb must be above 0".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Whether the private key in `key_path` belongs to the first certificate in
/// `cert_path`; the TLS handshake would otherwise fail with a bare
/// "KeyMismatch" that names neither file. A key or certificate that cannot
/// be read here is left for the handshake to judge.
fn key_fits_certificate(cert_path: &Path, key_path: &Path) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Ok(certs), Ok(key)) = (
        CertificateDer::pem_file_iter(cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>()),
        PrivateKeyDer::from_pem_file(key_path),
    ) else {
        return Ok(());
    };
    let provider = rustls::crypto::ring::default_provider();
    let Ok(signing_key) = provider.key_provider.load_private_key(key) else {
        return Err(format!(
            "{} holds a private key of a kind TLS here cannot use (RSA, ECDSA P-256 or \
             P-384, or Ed25519 are)",
            key_path.display()
        ));
    };
    match rustls::sign::CertifiedKey::new(certs, signing_key).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(format!(
                "the private key in {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ))
        }
        _ => Ok(()),
    }
}

/// The X.509 version (1 to 3) of the first certificate in PEM text; `None`
/// when there is none or it cannot be read, which the TLS library reports.
fn first_certificate_version(pem: &str) -> Option<u8> {
    use base64::Engine as _;
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let body: String = body.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    // (absent for v1) ... } ... }: skip two SEQUENCE headers.
    let mut rest = der.as_slice();
    for _ in 0..2 {
        let (&tag, after) = rest.split_first()?;
        if tag != 0x30 {
            return None;
        }
        let (&len, after) = after.split_first()?;
        // A long-form length: its first byte counts the bytes that follow.
        let skip = if len & 0x80 == 0 {
            0
        } else {
            usize::from(len & 0x7f)
        };
        rest = after.get(skip..)?;
    }
    match rest {
        // [0] EXPLICIT INTEGER: version number minus one.
        [0xa0, 0x03, 0x02, 0x01, v, ..] => v.checked_add(1),
        [0xa0, ..] => None,
        _ => Some(1),
    }
}

/// A source's subscription, to be made on its connection.
pub struct SourceNeeds<'a> {
    pub connection: &'a str,
    pub subscription: Subscription,
}

/// Every connection of a pipeline, by name and role.
///
/// A `[mqtt.NAME]` that both feeds the source and takes outputs opens two
/// client connections: one subscribes, one publishes. On one connection the
/// two wait on each other (inputs are acknowledged only after their outputs
/// are), and a broker that holds back a client's acknowledgements while
/// deliveries to it are unacknowledged (rumqttd does) would stall both.
#[derive(Default)]
pub struct Connections {
    subscribers: BTreeMap<String, Arc<Connection>>,
    publishers: BTreeMap<String, Arc<Connection>>,
}

impl Connections {
    /// Starts every connection (and embedded broker) the file declares;
    /// `publishing` names those a sink or the dead letter publishes on.
    pub fn open(
        configs: &BTreeMap<String, ConnectionConfig>,
        pipeline_name: &str,
        base_dir: &Path,
        source: Option<SourceNeeds<'_>>,
        publishing: &[&str],
    ) -> Result<Self, String> {
        let mut connections = Connections::default();
        // rustls takes its crypto from a process-wide provider; an error
        // only says one is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        for (name, config) in configs {
            let subscription = source
                .as_ref()
                .filter(|s| s.connection == name)
                .map(|s| s.subscription.clone());
            let publishes = publishing.contains(&name.as_str());
            let (subscriber, publisher) = open_one(
                name,
                config,
                pipeline_name,
                base_dir,
                subscription,
                publishes,
            )?;
            if let Some(conn) = subscriber {
                connections.subscribers.insert(name.clone(), conn);
            }
            if let Some(conn) = publisher {
                connections.publishers.insert(name.clone(), conn);
            }
        }
        Ok(connections)
    }

    /// Every client connection with its role (`subscribe` or `publish`).
    pub fn with_roles(&self) -> impl Iterator<Item = (&'static str, &Arc<Connection>)> {
        let subscribers = self.subscribers.values().map(|c| ("subscribe", c));
        subscribers.chain(self.publishers.values().map(|c| ("publish", c)))
    }

    /// Messages full `drop-oldest` spools dropped, since the start.
    pub fn spool_dropped(&self) -> u64 {
        self.publishers
            .values()
            .map(|c| {
                c.gauges()
                    .spool_dropped
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }

    /// The connection a source reads `name`'s messages from.
    pub fn subscriber(&self, name: &str) -> Option<Arc<Connection>> {
        self.subscribers.get(name).cloned()
    }

    /// The connection sinks publish to `name` on.
    pub fn publisher(&self, name: &str) -> Option<Arc<Connection>> {
        self.publishers.get(name).cloned()
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Connection>> {
        self.subscribers.values().chain(self.publishers.values())
    }

    /// Resolves with the first connection's failure that retrying cannot mend.
    pub async fn failed(&self) -> String {
        let waits: Vec<_> = self
            .all()
            .map(|c| Box::pin(async move { c.failed().await }))
            .collect();
        if waits.is_empty() {
            return std::future::pending().await;
        }
        futures_select_all(waits.into_iter()).await
    }

    pub async fn disconnect(&self) {
        for conn in self.all() {
            conn.disconnect().await;
        }
    }
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future<Output = String> + Unpin>(
    futures: impl Iterator<Item = F>,
) -> String {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn default_client_id(pipeline: &str, connection: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("runnel-{host}-{pipeline}-{connection}")
}

fn read_env(name: &str, connection: &str, var: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| unset_env(connection, name, var))
}

/// Why a credential variable a connection names cannot be read.
pub fn unset_env(connection: &str, field: &str, var: &str) -> String {
    format!(
        "mqtt.{connection}: {field} names the environment variable {var}, which is not set \
         or is not UTF-8"
    )
}

/// A connection's subscribing and publishing clients, where used.
type Roles = (Option<Arc<Connection>>, Option<Arc<Connection>>);

fn open_one(
    name: &str,
    config: &ConnectionConfig,
    pipeline_name: &str,
    base_dir: &Path,
    subscription: Option<Subscription>,
    publishes: bool,
) -> Result<Roles, String> {
    let address = BrokerAddress::parse(config.broker.get_ref())?;
    let (host, port, tls) = match address {
        BrokerAddress::Embedded => {
            // One listener: `check` refuses both, as rumqttd cannot serve
            // MQTT 5 publishes to 3.1.1 subscribers.
            let (listen, v5, field) = match &config.listen_v5 {
                Some(l) => (l.get_ref().as_str(), true, "listen_v5"),
                None => (
                    config
                        .listen
                        .as_ref()
                        .map_or(DEFAULT_LISTEN, |l| l.get_ref().as_str()),
                    false,
                    "listen",
                ),
            };
            let listen: SocketAddr = listen
                .parse()
                .map_err(|_| format!("mqtt.{name}: bad {field} address"))?;
            // The broker takes more than the source does, so a message over
            // max_packet_kb reaches the source and goes to the dead letter
            // with the reason; the broker refuses only far larger ones.
            let limits = broker::BrokerLimits {
                max_payload: config
                    .max_packet_kb
                    .saturating_mul(1024)
                    .saturating_mul(4)
                    .max(1 << 20),
                backlog_mb: config
                    .backlog_mb
                    .as_ref()
                    .map_or(DEFAULT_BACKLOG_MB, |b| *b.get_ref()),
            };
            broker::start(listen, v5, &limits).map_err(|e| format!("mqtt.{name}: {e}"))?;
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            (host, listen.port(), false)
        }
        BrokerAddress::Remote { host, port, tls } => (host, port, tls),
    };
    let credentials = match &config.username_env {
        Some(user_var) => {
            let user = read_env("username_env", name, user_var.get_ref())?;
            let password = match &config.password_env {
                Some(var) => read_env("password_env", name, var.get_ref())?,
                None => String::new(),
            };
            Some((user, password))
        }
        None => None,
    };
    let tls = if tls {
        let read = |file: &Option<Spanned<PathBuf>>| -> Result<Option<Vec<u8>>, String> {
            file.as_ref()
                .map(|f| {
                    let path = base_dir.join(f.get_ref());
                    std::fs::read(&path)
                        .map_err(|e| format!("mqtt.{name}: cannot read {}: {e}", path.display()))
                })
                .transpose()
        };
        let ca = match read(&config.ca_file)? {
            Some(ca) => ca,
            None => system_roots().map_err(|e| format!("mqtt.{name}: no ca_file, and {e}"))?,
        };
        let client_auth = match (read(&config.cert_file)?, read(&config.key_file)?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        };
        Some(rumqttc::TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        })
    } else {
        None
    };
    let client_id = config
        .client_id
        .as_ref()
        .map(|id| id.get_ref().clone())
        .unwrap_or_else(|| default_client_id(pipeline_name, name));
    let spool = match config.spool.as_ref().filter(|_| publishes) {
        Some(s) => Some(
            spool::Spool::open(&base_dir.join(&s.path), s.max_mb, s.when_full)
                .map_err(|e| format!("mqtt.{name}: {e}"))?,
        ),
        None => None,
    };
    if let Some(spool) = &spool {
        if !spool.is_empty() {
            tracing::info!(
                connection = name,
                spooled_messages = spool.count(),
                "messages spooled by an earlier run will be sent first"
            );
        }
    }
    let url = format!(
        "{}://{host}:{port}",
        if config.tls_wanted() { "mqtts" } else { "mqtt" }
    );
    let inflight = config.inflight;
    let options = link::LinkOptions {
        client_id,
        host,
        port,
        keep_alive: Duration::from_secs(config.keep_alive_s.max(5)),
        clean_start: config.clean_start,
        credentials,
        tls,
        max_packet_bytes: config.max_packet_kb.saturating_mul(1024),
        inflight,
        request_capacity: usize::from(inflight) * 4 + 1024,
    };
    let v5 = config.protocol == Protocol::V5;
    let limits = conn::Limits {
        window: usize::from(inflight) * 2,
        max_packet: options.max_packet_bytes,
    };
    let both = subscription.is_some() && publishes;
    let subscriber = subscription.map(|subscription| {
        let (client, link) = link::connect(options.clone(), v5);
        Connection::start(
            name.to_string(),
            url.clone(),
            client,
            link,
            Some(subscription),
            None,
            limits,
        )
    });
    let publisher = publishes.then(|| {
        let mut options = options;
        if both {
            options.client_id.push_str("-pub");
        }
        let (client, link) = link::connect(options, v5);
        Connection::start(name.to_string(), url, client, link, None, spool, limits)
    });
    Ok((subscriber, publisher))
}

impl ConnectionConfig {
    fn tls_wanted(&self) -> bool {
        matches!(
            BrokerAddress::parse(self.broker.get_ref()),
            Ok(BrokerAddress::Remote { tls: true, .. })
        )
    }
}

/// The system's CA bundle, for mqtts:// without a `ca_file`.
fn system_roots() -> Result<Vec<u8>, String> {
    const BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];
    BUNDLES
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| format!("no system CA bundle in {}", BUNDLES.join(", ")))
}

/// Resolves a connection name: the one given, or the only one declared.
pub fn pick_connection<'a>(
    configs: &'a BTreeMap<String, ConnectionConfig>,
    wanted: Option<&'a str>,
) -> Result<&'a str, String> {
    match wanted {
        Some(name) if configs.contains_key(name) => Ok(name),
        Some(name) => Err(format!(
            "connection `{name}` is not declared; declared: {}",
            declared(configs)
        )),
        None if configs.len() == 1 => Ok(configs.keys().next().map_or("", String::as_str)),
        None if configs.is_empty() => {
            Err("no [mqtt.NAME] table declares a broker to connect to".into())
        }
        None => Err(format!(
            "several connections are declared ({}); say which with connection = \"NAME\"",
            declared(configs)
        )),
    }
}

fn declared(configs: &BTreeMap<String, ConnectionConfig>) -> String {
    if configs.is_empty() {
        return "none".into();
    }
    configs
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        assert_eq!(
            BrokerAddress::parse("embedded"),
            Ok(BrokerAddress::Embedded)
        );
        assert_eq!(
            BrokerAddress::parse("mqtt://10.0.0.2:1884"),
            Ok(BrokerAddress::Remote {
                host: "10.0.0.2".into(),
                port: 1884,
                tls: false
            })
        );
        assert_eq!(
            BrokerAddress::parse("mqtts://a1-ats.iot.eu-west-1.amazonaws.com"),
            Ok(BrokerAddress::Remote {
                host: "a1-ats.iot.eu-west-1.amazonaws.com".into(),
                port: 8883,
                tls: true
            })
        );
        assert!(BrokerAddress::parse("http://x").is_err());
        assert!(BrokerAddress::parse("mqtt://x:99999").is_err());
        assert!(BrokerAddress::parse("mqtt://").is_err());
    }
}
