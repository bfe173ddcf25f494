//! One MQTT connection: a task that polls the broker and reconnects with
//! backoff, and a task that publishes with at-least-once tracking, spooling
//! to disk when the broker is out of reach.
//!
//! rumqttc reports a publish's packet id only as an event, in the order the
//! publishes were queued, so the publisher matches ids to messages by that
//! order. When the connection drops, rumqttc's own resend queue is cleared
//! and the publisher resends (or spools) what was not acknowledged itself,
//! so a message is never in two queues that could disagree.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::link::{Delivery, LinkClient, LinkEvent, LinkLoop, Message, Outbound};
use super::spool::{Spool, SpoolError};

/// A message from the broker, with the connection it came on.
#[derive(Debug)]
pub struct Inbound {
    pub message: Message,
    /// Which connection (they count up) delivered it; an acknowledgement
    /// is only valid on that same connection.
    pub generation: u64,
    pub arrived_ms: i64,
}

/// Per message of a publish: `Err` when the broker refused it.
pub type PublishOutcome = Vec<Result<(), String>>;

/// Why a connection took no more work: its fatal error, if it had one.
fn stopped_reason(fatal: &watch::Receiver<Option<String>>, name: &str) -> String {
    fatal
        .borrow()
        .clone()
        .unwrap_or_else(|| format!("connection `{name}` has stopped"))
}

enum Command {
    Publish(
        Vec<Outbound>,
        oneshot::Sender<Result<PublishOutcome, String>>,
    ),
}

/// What the poller tells the publisher.
enum Note {
    Connected {
        broker_max_packet: Option<usize>,
    },
    Link(LinkEvent),
    /// The connection dropped; the publisher answers once it has taken
    /// back what was in flight.
    Disconnected(oneshot::Sender<()>),
    Fatal(String),
}

/// A connection to one broker, shared by the sources and sinks that use it.
pub struct Connection {
    name: String,
    url: String,
    max_packet: usize,
    closing: Arc<AtomicBool>,
    client: LinkClient,
    commands: mpsc::UnboundedSender<Command>,
    inbound: Mutex<Option<mpsc::UnboundedReceiver<Inbound>>>,
    generation: Arc<Mutex<u64>>,
    fatal: watch::Receiver<Option<String>>,
    gauges: Arc<Gauges>,
}

/// A connection's state for the metrics endpoint, kept by its publisher.
#[derive(Debug, Default)]
pub struct Gauges {
    pub connected: AtomicBool,
    pub spooled_messages: AtomicU64,
    pub spooled_bytes: AtomicU64,
    /// Messages a `drop-oldest` spool dropped to make room, since the start.
    pub spool_dropped: AtomicU64,
}

/// How much a connection's publisher takes at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages handed to rumqttc at once.
    pub window: usize,
    /// Largest packet sent or received (`max_packet_kb`).
    pub max_packet: usize,
}

/// Topic filters to subscribe to on every (re)connect.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub filters: Vec<String>,
    pub qos: u8,
}

impl Connection {
    /// Starts the connection's tasks; it connects in the background.
    pub fn start(
        name: String,
        url: String,
        client: LinkClient,
        link: LinkLoop,
        subscription: Option<Subscription>,
        spool: Option<Spool>,
        limits: Limits,
    ) -> Arc<Self> {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (notes, note_rx) = mpsc::unbounded_channel();
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let (fatal_tx, fatal) = watch::channel(None);
        let generation = Arc::new(Mutex::new(0u64));
        let gauges = Arc::new(Gauges::default());
        let closing = Arc::new(AtomicBool::new(false));
        let poller = Poller {
            closing: closing.clone(),
            name: name.clone(),
            url: url.clone(),
            link,
            client: client.clone(),
            notes,
            inbound: inbound_tx,
            generation: generation.clone(),
            subscription,
            fatal: fatal_tx,
        };
        tokio::spawn(poller.run());
        let publisher = Publisher {
            name: name.clone(),
            client: client.clone(),
            connected: false,
            fatal: None,
            seq: 0,
            queue: VecDeque::new(),
            unassigned: VecDeque::new(),
            inflight: HashMap::new(),
            parked: HashMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            spool,
            replay: None,
            window: limits.window.max(1),
            max_packet: limits.max_packet,
            broker_max_packet: None,
            spool_logged: None,
            spool_full_logged: None,
            gauges: gauges.clone(),
        };
        tokio::spawn(publisher.run(command_rx, note_rx));
        Arc::new(Connection {
            name,
            url,
            max_packet: limits.max_packet,
            closing,
            client,
            commands,
            inbound: Mutex::new(Some(inbound_rx)),
            generation,
            fatal,
            gauges,
        })
    }

    /// Connected or not, and how much waits in the spool.
    pub fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Largest message, as a packet, this connection sends or takes in.
    pub fn max_packet(&self) -> usize {
        self.max_packet
    }

    pub fn is_v5(&self) -> bool {
        self.client.is_v5()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The messages the broker delivers; only one source may take them.
    pub fn take_inbound(&self) -> Option<mpsc::UnboundedReceiver<Inbound>> {
        self.inbound.lock().ok()?.take()
    }

    /// Queues messages for publishing, in order after those queued before,
    /// and returns what becomes of each: settled once the broker
    /// acknowledged it (QoS 1), it was written (QoS 0) or spooled. The
    /// caller may queue more before that.
    pub fn start_publish(
        &self,
        messages: Vec<Outbound>,
    ) -> impl std::future::Future<Output = Result<PublishOutcome, String>> + Send + 'static {
        let (done, answer) = oneshot::channel();
        let queued = if messages.is_empty() {
            let _ = done.send(Ok(Vec::new()));
            true
        } else {
            self.commands.send(Command::Publish(messages, done)).is_ok()
        };
        let fatal = self.fatal.clone();
        let name = self.name.clone();
        async move {
            let stopped = || stopped_reason(&fatal, &name);
            if !queued {
                return Err(stopped());
            }
            answer.await.map_err(|_| stopped())?
        }
    }

    fn stopped(&self) -> String {
        stopped_reason(&self.fatal, &self.name)
    }

    /// Acknowledges a message, unless the connection it came on is gone: the
    /// broker then delivers it again, and an ack now could hit another
    /// message that reuses its packet id.
    pub async fn ack(&self, generation: u64, delivery: &Delivery) -> Result<(), String> {
        loop {
            {
                let current = self
                    .generation
                    .lock()
                    .map_err(|_| "connection state poisoned".to_string())?;
                if *current != generation {
                    return Ok(());
                }
                if self.client.try_ack(delivery) {
                    return Ok(());
                }
            }
            if self.fatal.borrow().is_some() {
                return Err(self.stopped());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Resolves with the reason once the connection has failed for good
    /// (refused credentials, a refused subscription).
    pub async fn failed(&self) -> String {
        let mut fatal = self.fatal.clone();
        let reason = match fatal.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    pub async fn disconnect(&self) {
        // The drop that follows is asked for: not a fault to log and retry.
        self.closing.store(true, Ordering::Relaxed);
        self.client.disconnect().await;
    }
}

struct Poller {
    name: String,
    url: String,
    link: LinkLoop,
    client: LinkClient,
    notes: mpsc::UnboundedSender<Note>,
    inbound: mpsc::UnboundedSender<Inbound>,
    generation: Arc<Mutex<u64>>,
    subscription: Option<Subscription>,
    fatal: watch::Sender<Option<String>>,
    /// Set once runnel itself disconnects.
    closing: Arc<AtomicBool>,
}

/// A warning about a connection's spool, with how much it holds.
fn log_spool(connection: &str, spool: &Spool, message: &str) {
    tracing::warn!(
        connection,
        spooled_messages = spool.count(),
        spooled_kib = spool.bytes() / 1024,
        max_mib = spool.max_mb(),
        "{message}"
    );
}

/// A connection that lasts this long was not refused or taken over.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);

impl Poller {
    /// Which of a connection's clients this is, for the log: one that both
    /// feeds the source and takes outputs has two.
    fn role(&self) -> &'static str {
        if self.subscription.is_some() {
            "subscribe"
        } else {
            "publish"
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut ever_connected = false;
        // When the last connection opened, and how many in a row closed
        // soon after: a broker closes the older of two connections with one
        // client id, and two clients sharing one take turns for good.
        let mut connected_at: Option<Instant> = None;
        let mut quick_drops = 0u32;
        loop {
            match self.link.poll().await {
                Ok(LinkEvent::Connected {
                    session_present,
                    broker_max_packet,
                }) => {
                    connected_at = Some(Instant::now());
                    tracing::info!(
                        connection = %self.name,
                        role = self.role(),
                        broker = %self.url,
                        session_present,
                        "{}",
                        if ever_connected { "reconnected" } else { "connected" }
                    );
                    ever_connected = true;
                    if let Some(sub) = &self.subscription {
                        // Only this connection's own subscription goes through
                        // its queue, so a failure here is the request itself.
                        if let Err(err) = self.client.try_subscribe(&sub.filters, sub.qos) {
                            let reason = format!(
                                "connection `{}` ({}): cannot subscribe to {}: {err}",
                                self.name,
                                self.url,
                                sub.filters.join(", ")
                            );
                            self.fail(reason);
                            return;
                        }
                    }
                    if self
                        .notes
                        .send(Note::Connected { broker_max_packet })
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(event) => {
                    if !self.handle(event) {
                        return;
                    }
                }
                Err(err) => {
                    // What rumqttc read or sent before the error belongs to
                    // the connection that dropped: it is told first, under
                    // that connection's generation. Left buffered, a publish
                    // sent on the old connection would be reported after the
                    // reconnect and matched to the wrong message.
                    for event in self.link.take_buffered() {
                        if !self.handle(event) {
                            return;
                        }
                    }
                    self.take_back_requests();
                    if self.closing.load(Ordering::Relaxed) {
                        tracing::debug!(connection = %self.name,
                        role = self.role(), "disconnected: {}", err.message);
                        return;
                    }
                    let mut reason =
                        format!("connection `{}` ({}): {}", self.name, self.url, err.message);
                    if err.fatal {
                        self.fail(reason);
                        return;
                    }
                    // Backing off again only after a connection that held.
                    match connected_at.take().map(|at| at.elapsed()) {
                        Some(lasted) if lasted < STABLE_CONNECTION => quick_drops += 1,
                        Some(_) => {
                            quick_drops = 0;
                            backoff.reset();
                        }
                        None => {}
                    }
                    if quick_drops >= 3 {
                        reason.push_str(
                            " (closed soon after connecting, again and again: does another \
                             client use this connection's client_id? the broker's log says \
                             why it closed it)",
                        );
                    }
                    let delay = backoff.next();
                    tracing::warn!(
                        connection = %self.name,
                        role = self.role(),
                        broker = %self.url,
                        retry_in_ms = delay.as_millis() as u64,
                        "{reason}"
                    );
                    let (answer, answered) = oneshot::channel();
                    if self.notes.send(Note::Disconnected(answer)).is_err() {
                        return;
                    }
                    let _ = answered.await;
                    // Publishes queued while the publisher was learning of
                    // the drop go too; it resends them itself.
                    self.take_back_requests();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Passes on one event of the connection; `false` once the connection
    /// is done for (refused subscription, or nobody listens any more).
    fn handle(&mut self, event: LinkEvent) -> bool {
        match event {
            LinkEvent::Message(message) => {
                let generation = self.generation.lock().map_or(0, |g| *g);
                let inbound = Inbound {
                    message: *message,
                    generation,
                    arrived_ms: crate::run::now_ms(),
                };
                // Nobody reads when no source uses this connection.
                let _ = self.inbound.send(inbound);
                true
            }
            LinkEvent::Subscribed { refused } if refused.is_empty() => {
                if let Some(sub) = &self.subscription {
                    tracing::info!(
                        connection = %self.name,
                        role = self.role(),
                        filters = %sub.filters.join(", "),
                        qos = sub.qos,
                        "subscribed"
                    );
                }
                true
            }
            LinkEvent::Subscribed { refused } => {
                let filters: Vec<&str> = refused
                    .iter()
                    .filter_map(|&i| {
                        self.subscription
                            .as_ref()
                            .and_then(|s| s.filters.get(i))
                            .map(String::as_str)
                    })
                    .collect();
                let reason = format!(
                    "connection `{}` ({}): the broker refused the subscription to {}",
                    self.name,
                    self.url,
                    filters.join(", ")
                );
                self.fail(reason);
                false
            }
            // A connack is only ever returned by `poll` itself.
            LinkEvent::Other | LinkEvent::Connected { .. } => true,
            event => self.notes.send(Note::Link(event)).is_ok(),
        }
    }

    /// Empties rumqttc's queues under the generation lock, and moves to the
    /// next generation so no acknowledgement of the old connection is sent.
    fn take_back_requests(&mut self) {
        let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        self.link.forget_pending();
    }

    fn fail(&mut self, reason: String) {
        tracing::error!("{reason}");
        let _ = self.notes.send(Note::Fatal(reason.clone()));
        let _ = self.fatal.send(Some(reason));
    }
}

/// Reconnect delays: doubling from 200 ms to 30 s, each with up to a
/// quarter of jitter so many gateways do not return in step.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        base + jitter
    }
}

struct Pending {
    seq: u64,
    message: Outbound,
    batch: u64,
    index: usize,
}

enum Waiter {
    Caller(oneshot::Sender<Result<PublishOutcome, String>>),
    /// Replay from the spool: commit up to this offset once all are sent.
    Spool {
        end: u64,
    },
}

struct BatchState {
    waiter: Waiter,
    outcome: PublishOutcome,
    remaining: usize,
}

struct Publisher {
    name: String,
    client: LinkClient,
    connected: bool,
    fatal: Option<String>,
    seq: u64,
    /// Not yet handed to rumqttc.
    queue: VecDeque<Pending>,
    /// Handed to rumqttc, packet id not yet known.
    unassigned: VecDeque<Pending>,
    inflight: HashMap<u16, Pending>,
    /// Waiting for the broker to free a packet id.
    parked: HashMap<u16, Pending>,
    batches: HashMap<u64, BatchState>,
    next_batch: u64,
    spool: Option<Spool>,
    /// The spool batch being replayed.
    replay: Option<u64>,
    /// Most messages handed to rumqttc at once.
    window: usize,
    /// `max_packet_kb`, in bytes.
    max_packet: usize,
    /// The broker's own limit, when it gave one.
    broker_max_packet: Option<usize>,
    spool_logged: Option<Instant>,
    /// When the spool's being full was last logged.
    spool_full_logged: Option<Instant>,
    gauges: Arc<Gauges>,
}

impl Publisher {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut notes: mpsc::UnboundedReceiver<Note>,
    ) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Publish(messages, done)) => self.publish(messages, done),
                    None => return,
                },
                note = notes.recv() => match note {
                    Some(note) => self.note(note),
                    None => {
                        // The poller is gone: nothing can be sent again.
                        self.fail_all("the connection's event loop stopped".into());
                        while let Some(Command::Publish(_, done)) = commands.recv().await {
                            let _ = done.send(Err(self.fatal.clone().unwrap_or_default()));
                        }
                        return;
                    }
                },
            }
            self.pump();
            self.report();
        }
    }

    fn report(&self) {
        let gauges = &self.gauges;
        gauges.connected.store(self.connected, Ordering::Relaxed);
        let (messages, bytes) = self
            .spool
            .as_ref()
            .map_or((0, 0), |s| (s.count(), s.bytes()));
        gauges.spooled_messages.store(messages, Ordering::Relaxed);
        gauges.spooled_bytes.store(bytes, Ordering::Relaxed);
        let dropped = self.spool.as_ref().map_or(0, |s| s.dropped);
        gauges.spool_dropped.store(dropped, Ordering::Relaxed);
    }

    fn spooling(&self) -> bool {
        self.spool
            .as_ref()
            .is_some_and(|s| !self.connected || !s.is_empty() || self.replay.is_some())
    }

    fn publish(
        &mut self,
        messages: Vec<Outbound>,
        done: oneshot::Sender<Result<PublishOutcome, String>>,
    ) {
        if let Some(reason) = &self.fatal {
            let _ = done.send(Err(reason.clone()));
            return;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        // A message no broker of this connection would take is refused here,
        // on its own: handed to rumqttc it would drop the connection, and
        // every reconnect would try it again.
        let mut outcome: PublishOutcome = vec![Ok(()); messages.len()];
        let mut fitting = Vec::with_capacity(messages.len());
        for (index, message) in messages.into_iter().enumerate() {
            match self.too_large(&message) {
                Some(reason) => outcome[index] = Err(reason),
                None => fitting.push((index, message)),
            }
        }
        if fitting.is_empty() {
            let _ = done.send(Ok(outcome));
            return;
        }
        if self.spooling() && self.queue.is_empty() {
            let messages: Vec<Outbound> = fitting.iter().map(|(_, m)| m.clone()).collect();
            match self.spool_append(&messages) {
                Ok(()) => {
                    let _ = done.send(Ok(outcome));
                    return;
                }
                // Waits in the queue, its input unacknowledged.
                Err(err) if err.is_full() => self.log_spool_full(&err),
                Err(err) => {
                    let _ = done.send(Err(err.to_string()));
                    return;
                }
            }
        }
        self.batches.insert(
            id,
            BatchState {
                waiter: Waiter::Caller(done),
                outcome,
                remaining: fitting.len(),
            },
        );
        for (index, message) in fitting {
            self.seq += 1;
            self.queue.push_back(Pending {
                seq: self.seq,
                message,
                batch: id,
                index,
            });
        }
    }

    /// Why `message` cannot be sent on this connection, if it cannot.
    fn too_large(&self, message: &Outbound) -> Option<String> {
        let size = message.packet_size(self.client.is_v5());
        let (limit, whose) = match self.broker_max_packet {
            Some(broker) if broker < self.max_packet => {
                (broker, "the broker's maximum packet size")
            }
            _ => (self.max_packet, "the connection's max_packet_kb"),
        };
        (size > limit).then(|| {
            format!(
                "connection `{}`: the message is {size} bytes as an MQTT packet, over {whose} ({limit} bytes)",
                self.name
            )
        })
    }

    fn spool_append(&mut self, messages: &[Outbound]) -> Result<(), SpoolError> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(());
        };
        let dropped_before = spool.dropped;
        spool.append(messages)?;
        if spool.dropped > dropped_before {
            tracing::warn!(
                connection = %self.name,
                dropped = spool.dropped - dropped_before,
                "spool full: dropped the oldest messages to make room"
            );
        }
        let due = self
            .spool_logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        if due {
            let why = if self.connected {
                "the spool is replaying: new messages go in behind it"
            } else {
                "broker out of reach: messages are spooled"
            };
            log_spool(&self.name, spool, why);
            self.spool_logged = Some(Instant::now());
        }
        Ok(())
    }

    /// At most every few seconds while the spool is full: with `refuse-new`,
    /// outputs then wait in memory and their inputs at their broker.
    fn log_spool_full(&mut self, err: &SpoolError) {
        if self
            .spool_full_logged
            .is_some_and(|at| at.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.spool_full_logged = Some(Instant::now());
        if let Some(spool) = &self.spool {
            let why = match err {
                SpoolError::NoSpace { .. } => format!(
                    "{err}: new outputs wait, and their inputs stay unacknowledged, until \
                     the spool drains or room is made on the disk (max_mb is more than it has)"
                ),
                _ => "spool full: new outputs wait, and their inputs stay unacknowledged, \
                      until it drains"
                    .to_string(),
            };
            log_spool(&self.name, spool, &why);
        }
    }

    fn note(&mut self, note: Note) {
        match note {
            Note::Connected { broker_max_packet } => {
                self.connected = true;
                self.broker_max_packet = broker_max_packet;
                tracing::debug!(
                    connection = %self.name,
                    queued = self.queue.len(),
                    batches = self.batches.len(),
                    "publishing resumes"
                );
            }
            Note::Link(LinkEvent::Sent(pkid)) => self.sent(pkid),
            Note::Link(LinkEvent::AwaitingId(pkid)) => {
                if let Some(p) = self.unassigned.pop_front() {
                    self.parked.insert(pkid, p);
                }
            }
            Note::Link(LinkEvent::Acked(pkid, result)) => match self.inflight.remove(&pkid) {
                Some(p) => self.complete(p, result),
                None => {
                    tracing::debug!(connection = %self.name, pkid, "ack for no message in flight")
                }
            },
            Note::Link(_) => {}
            Note::Disconnected(answer) => {
                self.connected = false;
                self.take_back();
                let _ = answer.send(());
            }
            Note::Fatal(reason) => self.fail_all(reason),
        }
    }

    fn sent(&mut self, pkid: u16) {
        if pkid == 0 {
            if let Some(p) = self.unassigned.pop_front() {
                self.complete(p, Ok(()));
            }
        } else if self.inflight.contains_key(&pkid) {
            // rumqttc resending on its own; the first send is still tracked.
        } else if let Some(p) = self.parked.remove(&pkid) {
            self.inflight.insert(pkid, p);
        } else if let Some(p) = self.unassigned.pop_front() {
            self.inflight.insert(pkid, p);
        } else {
            tracing::debug!(connection = %self.name, pkid, "sent with no message waiting for it");
        }
    }

    /// After a drop: everything not acknowledged goes back to the front of
    /// the queue in its first order, or to the spool.
    fn take_back(&mut self) {
        let mut back: Vec<Pending> = self
            .unassigned
            .drain(..)
            .chain(self.inflight.drain().map(|(_, p)| p))
            .chain(self.parked.drain().map(|(_, p)| p))
            .collect();
        back.sort_by_key(|p| p.seq);
        for p in back.into_iter().rev() {
            self.queue.push_front(p);
        }
        // A spool replay is simply read again later.
        if self.replay.take().is_some() {
            if let Some(spool) = self.spool.as_mut() {
                spool.replaying(None);
            }
            let queue = std::mem::take(&mut self.queue);
            self.queue = queue.into_iter().filter(|p| !self.is_replayed(p)).collect();
            self.batches
                .retain(|_, b| !matches!(b.waiter, Waiter::Spool { .. }));
        }
        if self.spool.is_some() {
            self.spool_queue_from(0);
        }
    }

    fn complete(&mut self, p: Pending, result: Result<(), String>) {
        let Some(batch) = self.batches.get_mut(&p.batch) else {
            return;
        };
        if let Err(reason) = result {
            if let Some(slot) = batch.outcome.get_mut(p.index) {
                *slot = Err(reason);
            }
        }
        batch.remaining = batch.remaining.saturating_sub(1);
        if batch.remaining > 0 {
            return;
        }
        let Some(batch) = self.batches.remove(&p.batch) else {
            return;
        };
        match batch.waiter {
            Waiter::Caller(done) => {
                let _ = done.send(Ok(batch.outcome));
            }
            Waiter::Spool { end } => {
                self.replay = None;
                for (i, outcome) in batch.outcome.iter().enumerate() {
                    if let Err(reason) = outcome {
                        // Its input was acknowledged when it was spooled; the
                        // log is the last place this message is seen.
                        tracing::error!(
                            connection = %self.name,
                            message = i,
                            "a spooled message was refused by the broker and is lost: {reason}"
                        );
                    }
                }
                let delivered = batch.outcome.len() as u64;
                if let Some(spool) = self.spool.as_mut() {
                    if let Err(err) = spool.commit(end, delivered) {
                        tracing::error!(connection = %self.name, "{err}");
                    } else if spool.is_empty() {
                        tracing::info!(connection = %self.name, "spool drained: every spooled message was delivered");
                    }
                }
                self.spool_waiting();
            }
        }
    }

    fn outstanding(&self) -> usize {
        self.unassigned.len() + self.inflight.len() + self.parked.len()
    }

    /// Hands queued messages to rumqttc while connected and under the window,
    /// replaying the spool first.
    fn pump(&mut self) {
        if !self.connected || self.fatal.is_some() {
            return;
        }
        self.start_replay();
        // While the spool holds messages, what waits behind it (messages the
        // full spool refused) waits for them, chunk after chunk: they are
        // older. Each chunk replayed makes room to spool the waiting ones.
        let spool_busy =
            self.replay.is_some() || self.spool.as_ref().is_some_and(|s| !s.is_empty());
        while self.outstanding() < self.window {
            if spool_busy && self.queue.front().is_some_and(|p| !self.is_replayed(p)) {
                break;
            }
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            // The broker may have lowered its limit on a reconnect, or the
            // message come back from the spool.
            if let Some(reason) = self.too_large(&p.message) {
                self.complete(p, Err(reason));
                continue;
            }
            if let Err(err) = self.client.try_publish(&p.message) {
                tracing::debug!(connection = %self.name, "publish queue busy: {err}");
                self.queue.push_front(p);
                break;
            }
            self.unassigned.push_back(p);
        }
    }

    /// Messages a full spool refused, which wait in the queue behind what it
    /// replays, go into it once a replayed chunk made room: at its end, so
    /// in order, and their inputs need not wait for the whole replay.
    fn spool_waiting(&mut self) {
        let Some(at) = self.queue.iter().position(|p| !self.is_replayed(p)) else {
            return;
        };
        if self.spool.as_ref().is_none_or(|s| s.is_empty()) && self.replay.is_none() {
            // Nothing to wait behind: they go out as they are.
            return;
        }
        self.spool_queue_from(at);
    }

    /// Moves the queue from `at` on into the spool, each message done once
    /// spooled; all stay queued if the spool cannot take them all.
    fn spool_queue_from(&mut self, at: usize) {
        if at >= self.queue.len() {
            return;
        }
        let queued: Vec<Pending> = self.queue.drain(at..).collect();
        let messages: Vec<Outbound> = queued.iter().map(|p| p.message.clone()).collect();
        match self.spool_append(&messages) {
            Ok(()) => {
                for p in queued {
                    self.complete(p, Ok(()));
                }
            }
            Err(err) => {
                if err.is_full() {
                    self.log_spool_full(&err);
                } else {
                    tracing::error!(connection = %self.name, "{err}");
                }
                self.queue.extend(queued);
            }
        }
    }

    /// Whether a queued message comes from the spool.
    fn is_replayed(&self, p: &Pending) -> bool {
        matches!(self.batches.get(&p.batch), Some(b) if matches!(b.waiter, Waiter::Spool { .. }))
    }

    fn start_replay(&mut self) {
        if self.replay.is_some() || self.outstanding() > 0 {
            return;
        }
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        if spool.is_empty() {
            return;
        }
        let peeked = match spool.peek(self.window) {
            Ok(p) => p,
            Err(err) => {
                tracing::error!(connection = %self.name, "{err}");
                return;
            }
        };
        if peeked.messages.is_empty() {
            // Only unreadable lines were left; they were logged.
            let _ = spool.commit(peeked.end, 0);
            return;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        let count = peeked.messages.len();
        self.batches.insert(
            id,
            BatchState {
                waiter: Waiter::Spool { end: peeked.end },
                outcome: vec![Ok(()); count],
                remaining: count,
            },
        );
        spool.replaying(Some(peeked.end));
        self.replay = Some(peeked.end);
        // Replayed messages go before anything queued.
        for (index, message) in peeked.messages.into_iter().enumerate().rev() {
            self.queue.push_front(Pending {
                seq: 0,
                message,
                batch: id,
                index,
            });
        }
    }

    fn fail_all(&mut self, reason: String) {
        self.fatal = Some(reason.clone());
        for (_, batch) in self.batches.drain() {
            if let Waiter::Caller(done) = batch.waiter {
                let _ = done.send(Err(reason.clone()));
            }
        }
        self.queue.clear();
        self.unassigned.clear();
        self.inflight.clear();
        self.parked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::link::{connect, LinkOptions};
    use bytes::BytesMut;
    use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// The broker's end of one connection, driven packet by packet so a test
    /// can ack out of order and drop the connection at a chosen moment.
    struct BrokerEnd {
        stream: TcpStream,
        buf: BytesMut,
    }

    impl BrokerEnd {
        async fn accept(listener: &TcpListener, session_present: bool) -> BrokerEnd {
            let (stream, _) = listener.accept().await.expect("accept the client");
            let mut end = BrokerEnd {
                stream,
                buf: BytesMut::new(),
            };
            match end.read().await {
                Packet::Connect(..) => {}
                other => panic!("expected CONNECT, got {other:?}"),
            }
            let ack = ConnAck::new(ConnectReturnCode::Success, session_present);
            end.write(Packet::ConnAck(ack)).await;
            end
        }

        async fn read(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(packet) => return packet,
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(err) => panic!("bad packet from the client: {err}"),
                }
                let n = self.stream.read_buf(&mut self.buf).await.expect("read");
                assert!(n > 0, "the client closed the connection");
            }
        }

        async fn write(&mut self, packet: Packet) {
            let mut out = BytesMut::new();
            packet.write(&mut out, 1 << 20).expect("encode");
            self.stream.write_all(&out).await.expect("write");
        }

        async fn next_publish(&mut self) -> rumqttc::Publish {
            loop {
                match self.read().await {
                    Packet::Publish(p) => return p,
                    Packet::PingReq => self.write(Packet::PingResp).await,
                    _ => {}
                }
            }
        }

        /// Takes `count` publishes, acking each, and returns their payloads.
        async fn ack_publishes(&mut self, count: usize) -> Vec<String> {
            let mut seen = Vec::new();
            while seen.len() < count {
                let p = tokio::time::timeout(Duration::from_secs(10), self.next_publish())
                    .await
                    .unwrap_or_else(|_| panic!("publishes stopped; seen {seen:?}"));
                self.write(Packet::PubAck(PubAck::new(p.pkid))).await;
                seen.push(text(&p));
            }
            seen
        }
    }

    fn text(p: &rumqttc::Publish) -> String {
        String::from_utf8_lossy(&p.payload).into_owned()
    }

    /// What a publish came to, once every message was acked.
    async fn settled(
        published: tokio::task::JoinHandle<Result<PublishOutcome, String>>,
    ) -> PublishOutcome {
        tokio::time::timeout(Duration::from_secs(10), published)
            .await
            .expect("the publish settles once all are acked")
            .expect("publish task")
            .expect("publish")
    }

    fn limits(window: usize) -> Limits {
        Limits {
            window,
            max_packet: 1 << 20,
        }
    }

    fn options(port: u16, inflight: u16) -> LinkOptions {
        LinkOptions {
            client_id: "conn-test".into(),
            host: "127.0.0.1".into(),
            port,
            keep_alive: Duration::from_secs(60),
            clean_start: false,
            credentials: None,
            tls: None,
            max_packet_bytes: 1 << 20,
            inflight,
            request_capacity: 16,
        }
    }

    /// QoS 1 messages with payloads m0, m1, ...
    fn messages(count: usize) -> Vec<Outbound> {
        (0..count)
            .map(|i| Outbound {
                topic: "t".into(),
                payload: format!("m{i}").into_bytes(),
                qos: 1,
                retain: false,
                properties: Vec::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_drop_while_a_publish_waits_for_its_packet_id_stalls_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (client, link) = connect(options(port, 2), false);
        let url = format!("mqtt://127.0.0.1:{port}");
        let conn = Connection::start("out".into(), url, client, link, None, None, limits(4));
        let published = tokio::spawn(conn.start_publish(messages(4)));

        let mut first = BrokerEnd::accept(&listener, false).await;
        let m0 = first.next_publish().await;
        let m1 = first.next_publish().await;
        assert_eq!((m0.pkid, m1.pkid), (1, 2));
        // Acking the second first frees one slot; the next publish wants
        // packet id 1, which m0 still holds, so the client holds it back.
        first.write(Packet::PubAck(PubAck::new(2))).await;
        let held = tokio::time::timeout(Duration::from_millis(300), first.next_publish()).await;
        assert!(held.is_err(), "the client should wait for packet id 1");
        drop(first);

        let mut second = BrokerEnd::accept(&listener, true).await;
        let mut seen = vec![text(&m1)];
        seen.extend(second.ack_publishes(3).await);
        seen.sort();
        assert_eq!(seen, ["m0", "m1", "m2", "m3"]);
        assert_eq!(settled(published).await, vec![Ok(()); 4]);
    }

    #[tokio::test]
    async fn events_left_from_a_dropped_connection_are_not_taken_for_the_next_ones() {
        // Nothing listens at first, so the first connect fails.
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            probe.local_addr().expect("address").port()
        };
        let (client, mut link) = connect(options(port, 10), false);
        // What a publish whose write failed leaves in rumqttc: its "sent
        // with packet id 7" event, never handed out before the error.
        match &mut link {
            LinkLoop::V4(l) => l
                .state
                .events
                .push_back(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(7))),
            LinkLoop::V5(_) => unreachable!("connected with MQTT 3.1.1"),
        }
        let url = format!("mqtt://127.0.0.1:{port}");
        let conn = Connection::start("out".into(), url, client, link, None, None, limits(8));
        let published = tokio::spawn(conn.start_publish(messages(3)));
        tokio::time::sleep(Duration::from_millis(100)).await;

        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("rebind");
        let mut broker = BrokerEnd::accept(&listener, false).await;
        assert_eq!(broker.ack_publishes(3).await, ["m0", "m1", "m2"]);
        assert_eq!(settled(published).await, vec![Ok(()); 3]);
    }
}
