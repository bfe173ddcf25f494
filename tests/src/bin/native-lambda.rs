//! The native baseline of the Lambda benchmark (tests/benches/lambda.rs): a
//! lambda_runtime handler that runs each SQS batch through the same stage
//! crates runnel runs as wasm, linked in natively, and answers the same
//! `batchItemFailures`.
//!
//! It takes its stages and their configs from the pipeline file runnel
//! serves (`$RUNNEL_PIPELINE`), so the two sides cannot drift apart.
//! Dead letters go to stdout as JSON lines, as runnel's `[dead_letter]
//! type = "stdout"` does.

use std::io::Write as _;
use std::sync::Mutex;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use runnel_sdk::{Record, Stage};

/// A stage of any type, so the chain can hold them in a list.
trait AnyStage: Send {
    fn process_batch(&mut self, batch: Vec<Record>) -> Vec<Result<Vec<Record>, runnel_sdk::Error>>;
}

impl<S: Stage + Send> AnyStage for S {
    fn process_batch(&mut self, batch: Vec<Record>) -> Vec<Result<Vec<Record>, runnel_sdk::Error>> {
        Stage::process_batch(self, batch)
    }
}

fn start<S: Stage + Send>(name: &str, config: &str) -> Result<Box<dyn AnyStage>, Error> {
    let config = runnel_sdk::parse_config::<S::Config>(config)
        .map_err(|e| format!("stage `{name}`: {e}"))?;
    let stage = S::init(config).map_err(|e| format!("stage `{name}`: {e}"))?;
    Ok(Box::new(stage))
}

struct Chain {
    pipeline: String,
    stages: Vec<(String, Box<dyn AnyStage>)>,
}

impl Chain {
    /// The `[[stage]]`s of a runnel pipeline file, each by its name to the
    /// crate of that name, with its `[stage.config]` handed over as JSON the
    /// way runnel hands it to the wasm stage.
    fn load(path: &str) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let file: toml::Table = text.parse().map_err(|e| format!("{path}: {e}"))?;
        let pipeline = file
            .get("pipeline")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("pipeline")
            .to_string();
        let mut stages = Vec::new();
        let listed = file.get("stage").and_then(|s| s.as_array());
        for stage in listed.into_iter().flatten() {
            let name = stage
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| format!("{path}: a stage without a name"))?;
            let config = match stage.get("config") {
                Some(config) => serde_json::to_string(config)?,
                None => "{}".to_string(),
            };
            let native = match name {
                "parse" => start::<parse::Parse>(name, &config)?,
                "validate" => start::<validate::ValidateStage>(name, &config)?,
                "convert" => start::<convert::Convert>(name, &config)?,
                "anomaly" => start::<anomaly::Anomaly>(name, &config)?,
                other => return Err(format!("{path}: no native stage `{other}`").into()),
            };
            stages.push((name.to_string(), native));
        }
        Ok(Chain { pipeline, stages })
    }

    /// One SQS batch through every stage; the messages with a dead letter
    /// are the batch's item failures.
    fn invoke(&mut self, event: SqsEvent) -> SqsBatchResponse {
        let mut ids = Vec::with_capacity(event.records.len());
        let mut bodies = Vec::with_capacity(event.records.len());
        let mut batch: Vec<(usize, Record)> = Vec::with_capacity(event.records.len());
        // The same record runnel makes of a message: body, group id as key,
        // queue name as topic, sent time, string attributes as headers.
        for (i, message) in event.records.into_iter().enumerate() {
            let body = message.body.unwrap_or_default();
            let mut record = Record::new(body.as_bytes());
            record.key = message.attributes.get("MessageGroupId").cloned();
            record.topic = message
                .event_source_arn
                .as_deref()
                .and_then(|arn| arn.rsplit([':', '/']).next())
                .filter(|n| !n.is_empty())
                .map(str::to_string);
            record.timestamp = message
                .attributes
                .get("SentTimestamp")
                .and_then(|t| t.parse().ok());
            let mut headers: Vec<(String, String)> = message
                .message_attributes
                .into_iter()
                .filter_map(|(name, value)| value.string_value.map(|v| (name, v)))
                .collect();
            headers.sort();
            record.headers = headers;
            ids.push(message.message_id.unwrap_or_else(|| i.to_string()));
            bodies.push(body);
            batch.push((i, record));
        }
        let inputs = batch.len();
        let mut failed = vec![false; inputs];
        let mut dead = Vec::new();
        for (name, stage) in &mut self.stages {
            let (from, records): (Vec<usize>, Vec<Record>) = batch.into_iter().unzip();
            let results = stage.process_batch(records);
            batch = Vec::with_capacity(from.len());
            for (i, result) in from.into_iter().zip(results) {
                match result {
                    Ok(outputs) => batch.extend(outputs.into_iter().map(|r| (i, r))),
                    Err(err) => {
                        failed[i] = true;
                        dead.push((i, name.as_str(), err));
                    }
                }
            }
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut out = std::io::stdout().lock();
        for (i, stage, err) in &dead {
            let entry = serde_json::json!({
                "pipeline": self.pipeline,
                "stage": stage,
                "reason": err.message(),
                "at": at,
                "message_id": ids[*i],
                "body": bodies[*i],
            });
            // Like a dead-letter sink that cannot write, a closed stdout
            // must not fail the batch.
            let _ = writeln!(out, "{entry}");
        }
        drop(out);
        lambda_runtime::tracing::info!(
            records = inputs,
            outputs = batch.len(),
            dead_letters = dead.len(),
            "invocation done"
        );
        let mut response = SqsBatchResponse::default();
        for (i, id) in ids.into_iter().enumerate() {
            if failed[i] {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                response.batch_item_failures.push(failure);
            }
        }
        response
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let path = std::env::var("RUNNEL_PIPELINE").unwrap_or_else(|_| "pipeline.toml".into());
    let chain = Mutex::new(Chain::load(&path)?);
    let chain = &chain;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let mut chain = chain
            .lock()
            .map_err(|_| Error::from("a previous invocation panicked"))?;
        Ok::<_, Error>(chain.invoke(event.payload))
    }))
    .await
}
