//! The `[metrics]` endpoint: what a run has done so far, each stage's
//! figures, and each MQTT connection's state and spool, as Prometheus text
//! on `GET /metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use crate::chain::StageStats;
use crate::mqtt::{Connection, Gauges};
use crate::run::Summary;

/// Figures the runner publishes after each batch, read by the endpoint.
pub struct Metrics {
    pipeline: String,
    state: Mutex<State>,
    connections: Vec<(String, &'static str, Arc<Connection>)>,
}

#[derive(Default)]
struct State {
    summary: Summary,
    stages: Vec<(String, StageStats)>,
}

impl Metrics {
    pub fn new(
        pipeline: &str,
        connections: impl Iterator<Item = (&'static str, Arc<Connection>)>,
    ) -> Self {
        Metrics {
            pipeline: pipeline.to_string(),
            state: Mutex::new(State::default()),
            connections: connections
                .map(|(role, c)| (c.name().to_string(), role, c))
                .collect(),
        }
    }

    /// Takes the run's counts, and the stages' figures when the chain is at hand.
    pub fn update<'a>(
        &self,
        summary: &Summary,
        stages: Option<impl Iterator<Item = (&'a str, &'a StageStats)>>,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.summary = summary.clone();
        if let Some(stages) = stages {
            state.stages = stages
                .map(|(name, stats)| (name.to_string(), stats.clone()))
                .collect();
        }
    }

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let (summary, stages) = match self.state.lock() {
            Ok(state) => (state.summary.clone(), state.stages.clone()),
            Err(_) => Default::default(),
        };
        let mut out = String::new();
        let pipeline = format!("pipeline=\"{}\"", escape(&self.pipeline));
        let counters = [
            (
                "runnel_inputs_total",
                "Inputs read from the source, unreadable ones included.",
                summary.inputs,
            ),
            (
                "runnel_inputs_emitted_total",
                "Inputs that produced at least one output and no dead letter.",
                summary.emitted,
            ),
            (
                "runnel_inputs_filtered_total",
                "Inputs every stage path filtered out.",
                summary.filtered,
            ),
            (
                "runnel_inputs_dead_lettered_total",
                "Inputs with at least one dead-letter entry.",
                summary.dead_lettered,
            ),
            (
                "runnel_outputs_total",
                "Records the sink accepted, timer outputs included.",
                summary.outputs,
            ),
            (
                "runnel_timer_outputs_total",
                "Of the outputs, those windows and other timers emitted.",
                summary.timer_outputs,
            ),
            (
                "runnel_dead_letters_total",
                "Entries written to the dead letter.",
                summary.dead_letters,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name}{{{pipeline}}} {value}");
        }

        type Figure = fn(&StageStats) -> String;
        // Every per-stage figure is a counter.
        let per_stage: [(&str, &str, Figure); 7] = [
            (
                "runnel_stage_calls_total",
                "Calls into the stage, retries included.",
                |s| s.calls.to_string(),
            ),
            (
                "runnel_stage_records_in_total",
                "Records given to the stage.",
                |s| s.records_in.to_string(),
            ),
            (
                "runnel_stage_records_out_total",
                "Records the stage emitted.",
                |s| s.records_out.to_string(),
            ),
            (
                "runnel_stage_rejected_total",
                "Records the stage sent to the dead letter.",
                |s| s.rejected.to_string(),
            ),
            (
                "runnel_stage_failed_calls_total",
                "Calls that trapped, panicked, timed out or hit the memory cap.",
                |s| s.failed_calls.to_string(),
            ),
            (
                "runnel_stage_restarts_total",
                "Instances replaced after a failed call.",
                |s| s.restarts.to_string(),
            ),
            (
                "runnel_stage_busy_seconds_total",
                "Time spent in the stage: its calls and timer flushes, and starting instances.",
                |s| s.busy.as_secs_f64().to_string(),
            ),
        ];
        for (name, help, figure) in per_stage {
            header(&mut out, name, help, "counter");
            for (stage, stats) in &stages {
                let _ = writeln!(
                    out,
                    "{name}{{{pipeline},stage=\"{}\"}} {}",
                    escape(stage),
                    figure(stats)
                );
            }
        }

        type Gauge = fn(&Gauges) -> u64;
        let per_connection: [(&str, &str, Gauge); 3] = [
            (
                "runnel_mqtt_connected",
                "1 while the connection is up.",
                |g| u64::from(g.connected.load(Ordering::Relaxed)),
            ),
            (
                "runnel_mqtt_spooled_messages",
                "Messages waiting in the spool for the broker.",
                |g| g.spooled_messages.load(Ordering::Relaxed),
            ),
            (
                "runnel_mqtt_spooled_bytes",
                "Bytes the spool holds on disk.",
                |g| g.spooled_bytes.load(Ordering::Relaxed),
            ),
        ];
        let dropped: (&str, &str, Gauge) = (
            "runnel_mqtt_spool_dropped_total",
            "Messages a drop-oldest spool dropped to make room.",
            |g| g.spool_dropped.load(Ordering::Relaxed),
        );
        let per_connection = per_connection
            .into_iter()
            .map(|figure| (figure, "gauge"))
            .chain([(dropped, "counter")]);
        for ((name, help, figure), kind) in per_connection {
            header(&mut out, name, help, kind);
            for (connection, role, c) in &self.connections {
                let _ = writeln!(
                    out,
                    "{name}{{{pipeline},connection=\"{}\",role=\"{role}\"}} {}",
                    escape(connection),
                    figure(c.gauges())
                );
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `address` now, so a taken port is an error at start, and serves
/// the endpoint in the background until the process ends.
pub fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("metrics endpoint: cannot accept a connection: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = answer(&metrics, &request);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!("metrics endpoint: connection ended: {err}");
                }
            });
        }
    });
    Ok(bound)
}

fn answer<B>(metrics: &Metrics, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served here\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "runnel serves its figures on /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_as_prometheus_text_with_escaped_labels() {
        let metrics = Metrics::new("plant \"a\"", std::iter::empty());
        let summary = Summary {
            inputs: 10,
            emitted: 7,
            filtered: 1,
            dead_lettered: 2,
            outputs: 9,
            timer_outputs: 2,
            dead_letters: 2,
            ..Summary::default()
        };
        let stats = StageStats {
            calls: 3,
            records_in: 10,
            rejected: 2,
            ..StageStats::default()
        };
        metrics.update(&summary, Some(std::iter::once(("parse", &stats))));
        let text = metrics.render();
        assert!(
            text.contains("# TYPE runnel_inputs_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_inputs_total{pipeline=\"plant \\\"a\\\"\"} 10\n"),
            "{text}"
        );
        assert!(text.contains(
            "runnel_stage_rejected_total{pipeline=\"plant \\\"a\\\"\",stage=\"parse\"} 2\n"
        ));
        // Without the chain at hand the last stage figures stay.
        metrics.update(&summary, None::<std::iter::Empty<(&str, &StageStats)>>);
        assert!(metrics.render().contains("stage=\"parse\"} 3\n"));
    }
}
