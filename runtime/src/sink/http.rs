use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Rejected, Sink, SinkError};
use crate::Record;

/// How often a request that failed for a reason that may pass (a 5xx, a
/// refused connection, a timeout) is tried before the run stops.
const ATTEMPTS: u32 = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// POSTs each record's payload to a URL, in order. A 2xx accepts it; another
/// 4xx refuses it (the runner dead-letters it with the status and body); a
/// 5xx, 429 or network failure is retried with backoff, then stops the run
/// with the inputs unacknowledged.
pub struct HttpSink {
    client: HttpsClient,
    url: hyper::Uri,
    headers: Vec<(String, String)>,
}

impl HttpSink {
    pub fn new(url: &str, headers: Vec<(String, String)>) -> Result<Self, String> {
        let url: hyper::Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) {
            return Err(format!("`{url}` must start with http:// or https://"));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot read the system's CA certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(HttpSink {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url,
            headers,
        })
    }

    /// One POST: `Ok(None)` accepted, `Ok(Some(reason))` refused for good,
    /// `Err` worth another try.
    async fn post(&self, record: &Record) -> Result<Option<String>, String> {
        let mut request = hyper::Request::post(self.url.clone());
        let mut has_type = false;
        for (name, value) in &self.headers {
            has_type |= name.eq_ignore_ascii_case("content-type");
            request = request.header(name.as_str(), value.as_str());
        }
        if !has_type {
            let json = serde_json::from_slice::<serde::de::IgnoredAny>(&record.payload).is_ok();
            let kind = if json {
                "application/json"
            } else {
                "application/octet-stream"
            };
            request = request.header("content-type", kind);
        }
        if let Some(key) = &record.key {
            request = request.header("x-runnel-key", key.as_str());
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(&record.payload)))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| describe(&e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        if status.is_success() {
            Ok(None)
        } else if status.is_server_error() || status.as_u16() == 429 {
            Err(format!("{status}: {text}"))
        } else {
            Ok(Some(format!("{status}: {text}")))
        }
    }
}

fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl Sink for HttpSink {
    async fn send(&mut self, records: &[Record]) -> Result<Vec<Rejected>, SinkError> {
        let mut rejected = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let mut delay = Duration::from_millis(200);
            let mut attempt = 1;
            loop {
                match self.post(record).await {
                    Ok(None) => break,
                    Ok(Some(reason)) => {
                        // Said now: should a later output stop the run, the
                        // dead letter for this one is never written.
                        tracing::warn!(url = %self.url, output = index, "refused: {reason}");
                        rejected.push(Rejected { index, reason });
                        break;
                    }
                    Err(reason) if attempt < ATTEMPTS => {
                        tracing::warn!(url = %self.url, attempt, "{reason}; trying again");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                        attempt += 1;
                    }
                    Err(reason) => {
                        let refused = match rejected.len() {
                            0 => String::new(),
                            n => format!(
                                "; {n} output(s) it refused before are not dead-lettered, \
                                 their inputs stay unacknowledged"
                            ),
                        };
                        return Err(SinkError::Http {
                            url: self.url.to_string(),
                            reason: format!("{reason} (after {ATTEMPTS} tries){refused}"),
                            accepted: index - rejected.len(),
                        });
                    }
                }
            }
        }
        Ok(rejected)
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("http {}", self.url)
    }
}
