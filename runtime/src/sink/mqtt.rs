use std::sync::Arc;

use async_trait::async_trait;

use super::{Rejected, Sending, Sink, SinkError};
use crate::mqtt::{Connection, Outbound, TopicTemplate};
use crate::Record;

/// Publishes each record's payload to a topic made from a template, with
/// its headers as MQTT 5 user properties. `send` returns once the broker
/// acknowledged every message (QoS 1) or they were spooled.
pub struct MqttSink {
    conn: Arc<Connection>,
    topic: TopicTemplate,
    qos: u8,
    retain: bool,
    /// Stands in for a key or topic a record lacks; `None` refuses it.
    fill: Option<&'static str>,
}

impl MqttSink {
    pub fn new(
        conn: Arc<Connection>,
        topic: TopicTemplate,
        qos: u8,
        retain: bool,
        fill: Option<&'static str>,
    ) -> Self {
        MqttSink {
            conn,
            topic,
            qos,
            retain,
            fill,
        }
    }
}

#[async_trait]
impl Sink for MqttSink {
    async fn send(&mut self, records: &[Record]) -> Result<Vec<Rejected>, SinkError> {
        self.start_send(records).await.await
    }

    async fn start_send(&mut self, records: &[Record]) -> Sending {
        let mut rejected = Vec::new();
        let mut messages = Vec::with_capacity(records.len());
        let mut indices = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match self.topic.render_filling(record, self.fill) {
                Ok(topic) => {
                    messages.push(Outbound {
                        topic,
                        payload: record.payload.clone(),
                        qos: self.qos,
                        retain: self.retain,
                        properties: record.headers.clone(),
                    });
                    indices.push(index);
                }
                Err(reason) => rejected.push(Rejected { index, reason }),
            }
        }
        let published = self.conn.start_publish(messages);
        let connection = self.conn.name().to_string();
        Box::pin(async move {
            let outcome = published
                .await
                .map_err(|reason| SinkError::Broker { connection, reason })?;
            for (index, result) in indices.into_iter().zip(outcome) {
                if let Err(reason) = result {
                    rejected.push(Rejected { index, reason });
                }
            }
            rejected.sort_by_key(|r| r.index);
            Ok(rejected)
        })
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("mqtt {} ({})", self.conn.name(), self.conn.url())
    }
}
