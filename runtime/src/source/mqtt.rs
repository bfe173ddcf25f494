use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Batch, Clock, Source, SourceError};
use crate::mqtt::{Connection, Delivery, Inbound, KeyPattern};
use crate::Record;

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
        let records = messages
            .into_iter()
            .map(|inbound| {
                let message = inbound.message;
                if let Some(delivery) = message.delivery {
                    acks.push((inbound.generation, delivery));
                }
                let key = self
                    .key
                    .as_ref()
                    .and_then(|k| k.key_of(&message.topic))
                    .map(str::to_string);
                let mut record = Record::new(message.payload.to_vec());
                record.key = key;
                record.topic = Some(message.topic);
                record.timestamp = Some(inbound.arrived_ms);
                record.headers = message.properties;
                record
            })
            .collect();
        if !acks.is_empty() {
            self.unacked.insert(id, acks);
        }
        Batch {
            id,
            records,
            unreadable: Vec::new(),
        }
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

    fn take_pending(&mut self) -> Option<Batch> {
        let mut messages = Vec::new();
        while let Ok(message) = self.inbound.try_recv() {
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
