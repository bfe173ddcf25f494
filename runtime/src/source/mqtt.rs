use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Batch, Clock, Source, SourceError};
use crate::chain::DeadLetter;
use crate::mqtt::{
    filter_matches, publish_size, Connection, Delivery, Inbound, KeyPattern, Message,
};
use crate::Record;

/// How much of a refused message's payload its dead letter keeps.
const KEPT_OF_REFUSED: usize = 64 << 10;

/// Messages from topic filters on one broker connection. QoS 1 messages are
/// acknowledged to the broker only once their batch is settled.
pub struct MqttSource {
    conn: Arc<Connection>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    key: Option<KeyPattern>,
    filters: Vec<String>,
    next_id: u64,
    unacked: HashMap<u64, Vec<(u64, Delivery)>>,
}

impl MqttSource {
    pub fn new(
        conn: Arc<Connection>,
        filters: Vec<String>,
        key: Option<KeyPattern>,
    ) -> Result<Self, SourceError> {
        let inbound = conn.take_inbound().ok_or_else(|| SourceError::Broker {
            connection: conn.name().to_string(),
            reason: "its messages are already read by another source".into(),
        })?;
        Ok(MqttSource {
            conn,
            inbound,
            key,
            filters,
            next_id: 0,
            unacked: HashMap::new(),
        })
    }

    fn batch_of(&mut self, messages: Vec<Inbound>) -> Batch {
        let id = self.next_id;
        self.next_id += 1;
        let mut acks = Vec::new();
        let mut records = Vec::with_capacity(messages.len());
        let mut unreadable = Vec::new();
        for inbound in messages {
            let mut message = inbound.message;
            if let Some(delivery) = message.delivery.take() {
                acks.push((inbound.generation, delivery));
            }
            let refused = self.refusal(&message);
            let key = self
                .key
                .as_ref()
                .and_then(|k| k.key_of(&message.topic))
                .map(str::to_string);
            let mut payload = message.payload.to_vec();
            if refused.is_some() {
                // Enough to tell what it was, small enough for any dead letter.
                payload.truncate(KEPT_OF_REFUSED);
            }
            let mut record = Record::new(payload);
            record.key = key;
            record.topic = Some(message.topic);
            record.timestamp = Some(inbound.arrived_ms);
            record.headers = message.properties;
            match refused {
                Some(reason) => unreadable.push(DeadLetter {
                    stage: "source".into(),
                    reason,
                    record,
                    input: None,
                    fault: false,
                }),
                None => records.push(record),
            }
        }
        if !acks.is_empty() {
            self.unacked.insert(id, acks);
        }
        Batch {
            id,
            records,
            unreadable,
        }
    }

    /// Why a message does not go through the chain: larger than the
    /// connection takes, or from a subscription this pipeline did not make.
    fn refusal(&self, message: &Message) -> Option<String> {
        let size = publish_size(
            &message.topic,
            message.payload.len(),
            0,
            &message.properties,
            self.conn.is_v5(),
        );
        let max = self.conn.max_packet();
        if size > max {
            return Some(format!(
                "the message on `{}` is {size} bytes, over connection `{}`'s max_packet_kb \
                 ({max} bytes); the first {} KiB of its payload are kept here",
                message.topic,
                self.conn.name(),
                KEPT_OF_REFUSED >> 10
            ));
        }
        if !self
            .filters
            .iter()
            .any(|f| filter_matches(f, &message.topic))
        {
            // A persistent session keeps the subscriptions of earlier runs,
            // so a filter taken out of the pipeline file still delivers.
            return Some(format!(
                "the message on `{}` matches none of the source's topics ({}): a subscription \
                 left in the broker's session by an earlier run with other topics; run once \
                 with clean_start = true on connection `{}` to end it",
                message.topic,
                self.filters.join(", "),
                self.conn.name()
            ));
        }
        None
    }
}

#[async_trait]
impl Source for MqttSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        let first = tokio::select! {
            message = self.inbound.recv() => message,
            reason = self.conn.failed() => {
                return Err(SourceError::Broker { connection: self.conn.name().to_string(), reason });
            }
        };
        let Some(first) = first else {
            return Ok(None);
        };
        // Whatever else has arrived joins the batch; nothing waits for more,
        // so a lone reading goes through at once.
        let mut messages = vec![first];
        while messages.len() < max {
            match self.inbound.try_recv() {
                Ok(message) => messages.push(message),
                Err(_) => break,
            }
        }
        Ok(Some(self.batch_of(messages)))
    }

    async fn ack(&mut self, id: u64) -> Result<(), SourceError> {
        let Some(acks) = self.unacked.remove(&id) else {
            return Ok(());
        };
        for (generation, delivery) in &acks {
            self.conn
                .ack(*generation, delivery)
                .await
                .map_err(|reason| SourceError::Broker {
                    connection: self.conn.name().to_string(),
                    reason,
                })?;
        }
        Ok(())
    }

    fn clock(&self) -> Clock {
        Clock::Wall
    }

    fn take_pending(&mut self, max: usize) -> Option<Batch> {
        // What the broker sends from now on is not taken: each batch taken
        // here acknowledges the one before, and a broker with a backlog
        // would keep the stop from ever ending. Unacknowledged, it stays
        // with the broker.
        self.inbound.close();
        let mut messages = Vec::new();
        while messages.len() < max {
            let Ok(message) = self.inbound.try_recv() else {
                break;
            };
            messages.push(message);
        }
        (!messages.is_empty()).then(|| self.batch_of(messages))
    }

    fn describe(&self) -> String {
        format!(
            "mqtt {} ({}) {}",
            self.conn.name(),
            self.conn.url(),
            self.filters.join(", ")
        )
    }
}
