use std::sync::Arc;

use async_trait::async_trait;

use super::{Rejected, Sending, Sink, SinkError};
use crate::mqtt::{refused_text, Connection, Outbound, TopicTemplate};
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
        // Headers go out as MQTT 5 user properties, which brokers check as
        // they check topics; on 3.1.1 they are not sent.
        let v5 = self.conn.is_v5();
        for (index, record) in records.iter().enumerate() {
            let topic = self
                .topic
                .render_filling(record, self.fill)
                .and_then(|topic| match v5.then(|| refused_header(record)).flatten() {
                    Some(reason) => Err(reason),
                    None => Ok(topic),
                });
            let message = topic.and_then(|topic| {
                let retain = retain_of(record, self.retain)?;
                let properties = record
                    .headers
                    .iter()
                    .filter(|(name, _)| name != RETAIN_HEADER)
                    .cloned()
                    .collect();
                Ok((topic, retain, properties))
            });
            match message {
                Ok((topic, retain, properties)) => {
                    messages.push(Outbound {
                        topic,
                        payload: record.payload.clone(),
                        qos: self.qos,
                        retain,
                        properties,
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

/// Why a broker would refuse one of the record's headers as a user property.
fn refused_header(record: &Record) -> Option<String> {
    record.headers.iter().find_map(|(name, value)| {
        refused_text(&format!("header {name:?}"), name)
            .or_else(|| refused_text(&format!("the value of header {name:?}"), value))
    })
}

/// The output header that sets one message's retain flag, `true` or
/// `false`, over the sink's `retain`: a stage can keep a last value on one
/// topic and send alerts unretained on another through one sink. It is not
/// published as a user property.
pub const RETAIN_HEADER: &str = "mqtt.retain";

fn retain_of(record: &Record, default: bool) -> Result<bool, String> {
    match record.header(RETAIN_HEADER) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!(
            "header {RETAIN_HEADER} is {other:?}; it takes true or false"
        )),
    }
}
