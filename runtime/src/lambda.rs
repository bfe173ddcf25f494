//! Lambda mode: the same pipeline serves AWS Lambda invocations. Each event
//! (SQS, Kinesis or Kafka batch, API Gateway or function URL request, or any
//! other JSON such as an IoT rule's) becomes records that run through the
//! chain; the answer says which records failed, or carries the outputs.

use std::sync::Arc;

use anyhow::Context as _;
use aws_lambda_events::event::apigw::{ApiGatewayProxyRequest, ApiGatewayV2httpRequest};
use aws_lambda_events::event::kafka::KafkaEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use base64::Engine as _;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::chain::InputOutcome;
use crate::config::Pipeline;
use crate::run::{now_ms, Processed, RunOptions, Runner};
use crate::source::SourceConfig;
use crate::Record;

/// Which events a Lambda pipeline takes: `[source] type = "lambda"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventShape {
    /// Told apart by their fields.
    #[default]
    Auto,
    Sqs,
    Kinesis,
    Kafka,
    /// API Gateway (REST or HTTP API) or a function URL.
    Http,
    /// Any JSON, one record: an IoT Core rule's message, a direct invoke.
    Raw,
}

impl EventShape {
    /// As the pipeline file names it.
    fn name(self) -> &'static str {
        match self {
            EventShape::Auto => "auto",
            EventShape::Sqs => "sqs",
            EventShape::Kinesis => "kinesis",
            EventShape::Kafka => "kafka",
            EventShape::Http => "http",
            EventShape::Raw => "raw",
        }
    }

    /// What an event of this shape is, for errors.
    fn describe(self) -> &'static str {
        match self {
            EventShape::Auto => "any event",
            EventShape::Sqs => "an SQS batch",
            EventShape::Kinesis => "a Kinesis batch",
            EventShape::Kafka => "a Kafka batch",
            EventShape::Http => "an API Gateway or function URL request",
            EventShape::Raw => "not an SQS, Kinesis, Kafka or HTTP event",
        }
    }
}

/// Serves invocations until Lambda stops the process. Whatever stops the
/// start (a bad pipeline file, a stage that will not load) is reported to
/// the Runtime API as an init error, which Lambda shows for the invocation.
pub async fn serve(pipeline_path: &std::path::Path, options: &RunOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let prepared = async {
        let pipeline = Pipeline::load(pipeline_path)?;
        let SourceConfig::Lambda { event } = pipeline.file.source else {
            return Err(crate::config::ConfigError::Parse {
                path: pipeline_path.to_owned(),
                message: "runnel lambda needs [source] type = \"lambda\"".into(),
            }
            .into());
        };
        check_environment()?;
        for warning in pipeline.warnings() {
            tracing::warn!("{warning}");
        }
        let function_mb = std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
            .ok()
            .and_then(|mb| mb.parse().ok());
        if let Some(warning) = function_mb.and_then(|mb| memory_warning(&pipeline, mb)) {
            tracing::warn!("{warning}");
        }
        if pipeline.file.metrics.is_some() {
            // No port of a Lambda function can be scraped; its figures are
            // CloudWatch's.
            tracing::warn!(
                "[metrics] is not served under Lambda; see the function's CloudWatch metrics"
            );
        }
        let runner = Runner::open(&pipeline, options).await?;
        anyhow::Ok((event, runner))
    }
    .await;
    let (shape, runner) = match prepared {
        Ok(ready) => ready,
        Err(err) => {
            // The caller logs the error itself.
            report_init_error(&crate::error_text(&err)).await;
            return Err(err);
        }
    };
    tracing::info!(
        pipeline = %pipeline_path.display(),
        ms = crate::ms_since(started),
        "ready for invocations"
    );
    let runner = Arc::new(Mutex::new(runner));
    let handler = service_fn(move |event: LambdaEvent<Box<RawValue>>| {
        let runner = runner.clone();
        async move {
            let mut runner = runner.lock().await;
            runner.set_deadline(stages_deadline(event.context.deadline));
            invoke(&mut runner, shape, &event.payload)
                .await
                .map_err(Diagnostic::from)
        }
    });
    lambda_runtime::run(handler)
        .await
        .map_err(|err| anyhow::anyhow!("the Lambda runtime stopped: {err}"))
}

/// When the stages must be done with an invocation whose time ends at
/// `deadline_ms` (ms since the Unix epoch): a fifth of the time left before
/// it, at most half a second, stays for delivering outputs and answering. A
/// batch whose stages ran out of time reports what was not run as failed,
/// rather than the whole invocation timing out.
fn stages_deadline(deadline_ms: u64) -> Option<std::time::Instant> {
    stages_deadline_at(deadline_ms, now_ms(), std::time::Instant::now())
}

/// [`stages_deadline`] at wall-clock `now_ms`, which is `now`.
fn stages_deadline_at(
    deadline_ms: u64,
    now_ms: i64,
    now: std::time::Instant,
) -> Option<std::time::Instant> {
    // Lambda's deadline is a time since the Unix epoch; one before 2001 is
    // none (an emulator's placeholder, cargo-lambda's "600000"), and
    // cutting the stages short by it would stop every call.
    const YEAR_2001_MS: u64 = 978_307_200_000;
    if deadline_ms < YEAR_2001_MS {
        return None;
    }
    let left_ms = i64::try_from(deadline_ms)
        .ok()?
        .saturating_sub(now_ms)
        .max(0);
    let left = std::time::Duration::from_millis(left_ms as u64);
    let kept = (left / 5).min(std::time::Duration::from_millis(500));
    Some(now + (left - kept))
}

/// What runnel itself takes beside its stages, in MiB, about: its code,
/// the compiled stages and the batches in hand.
const RUNNEL_OWN_MB: u64 = 40;

/// When the stages' memory caps together, with runnel's own memory, come to
/// more than the function has: a stage that grows to its cap (a stage's
/// memory is only given back when it is replaced) then gets the whole
/// function killed for memory, and its batch with it, instead of its one
/// record dead-lettered.
fn memory_warning(pipeline: &Pipeline, function_mb: u64) -> Option<String> {
    let stages_mb: u64 = pipeline.file.stages.iter().map(|s| s.memory_mb()).sum();
    (stages_mb + RUNNEL_OWN_MB > function_mb).then(|| {
        format!(
            "the stages' memory caps (memory_mb) come to {stages_mb} MiB, which with about \
             {RUNNEL_OWN_MB} MiB of runnel's own is more than the function's {function_mb} MB: a \
             stage that reaches its cap can get the function killed for memory, and its whole \
             batch retried; raise the function's memory or lower memory_mb"
        )
    })
}

/// What the Lambda runtime client reads from the environment, checked
/// first: it panics on a missing or malformed one.
fn check_environment() -> anyhow::Result<()> {
    let why = "runnel lambda runs under the Lambda Runtime API, or an emulator such as \
               `cargo lambda watch`, which sets it";
    for name in [
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
    ] {
        let value = std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set: {why}"))?;
        match name {
            "AWS_LAMBDA_RUNTIME_API" => {
                let address = value
                    .parse::<hyper::Uri>()
                    .ok()
                    .filter(|uri| uri.authority().is_some());
                if address.is_none() {
                    anyhow::bail!(
                        "{name} is \"{value}\": expected HOST:PORT (as Lambda sets it) or a URL \
                         such as http://HOST:PORT/PATH"
                    );
                }
            }
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE" if value.parse::<i32>().is_err() => {
                anyhow::bail!("{name} is \"{value}\", not a number of MB")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Why an invocation failed. Its kind becomes the `errorType` Lambda
/// reports, which CloudWatch, retries and on-failure destinations show.
#[derive(Debug)]
enum InvokeError {
    /// The event is not one of the shape the pipeline takes.
    InvalidEvent(anyhow::Error),
    /// Records of a batch with no partial failure (Kafka) were dead-lettered.
    BatchFailed(anyhow::Error),
    /// The pipeline itself failed: a sink, or the chain's worker.
    Pipeline(anyhow::Error),
    /// The answer would be over Lambda's response limit.
    AnswerTooLarge(anyhow::Error),
}

impl From<InvokeError> for Diagnostic {
    fn from(err: InvokeError) -> Self {
        let (kind, err) = match err {
            InvokeError::InvalidEvent(err) => ("InvalidEvent", err),
            InvokeError::BatchFailed(err) => ("BatchFailed", err),
            InvokeError::Pipeline(err) => ("PipelineFailed", err),
            InvokeError::AnswerTooLarge(err) => ("AnswerTooLarge", err),
        };
        Diagnostic {
            error_type: format!("Runnel.{kind}"),
            error_message: crate::error_text(&err),
        }
    }
}

/// The most a synchronous invocation may answer: Lambda refuses a larger
/// response, and the outputs in it would be lost.
const MAX_ANSWER_BYTES: usize = 6 * 1024 * 1024;

/// One invocation: the event's records through the chain, and the answer
/// its shape calls for.
async fn invoke(
    runner: &mut Runner,
    shape: EventShape,
    event: &RawValue,
) -> Result<Box<RawValue>, InvokeError> {
    let text = event.get();
    let detected = detect(text);
    let shape = match shape {
        EventShape::Auto => detected,
        // Any JSON is a raw event.
        EventShape::Raw => EventShape::Raw,
        fixed if fits(fixed, detected, text) => fixed,
        // An event of no known kind (a hand-made one) is left to the fixed
        // kind's reader, whose error names what is missing; one of another
        // AWS service, or anything but a request for an HTTP pipeline,
        // whose reader would answer it as a client's error, is refused.
        fixed
            if detected == EventShape::Raw
                && fixed != EventShape::Http
                && other_service(text).is_none() =>
        {
            fixed
        }
        fixed => {
            let is = other_service(text).unwrap_or_else(|| detected.describe());
            return Err(InvokeError::InvalidEvent(anyhow::anyhow!(
                "the event is {is}, but the pipeline takes {} ([source] event = \"{}\")",
                fixed.describe(),
                fixed.name()
            )));
        }
    };
    let (records, ids) = match decode_text(shape, text) {
        Ok(decoded) => decoded,
        // The caller of an HTTP endpoint gets the reason, as a client error.
        Err(err) if shape == EventShape::Http => {
            let reason = crate::error_text(&err);
            tracing::warn!("request refused: {reason}");
            return to_answer(&http_error(400, &reason));
        }
        Err(err) => return Err(InvokeError::InvalidEvent(err)),
    };
    let count = records.len();
    if shape == EventShape::Sqs && is_fifo(&records) {
        let failures = fifo(runner, records, &ids).await?;
        return to_answer(&batch_failures(failures.iter().map(|&i| &ids[i])));
    }
    // A request's or a raw event's one record, kept in case its answer is
    // too large to give.
    let single = matches!(shape, EventShape::Http | EventShape::Raw)
        .then(|| records.first().cloned())
        .flatten();
    let processed = match runner.process(records, now_ms()).await {
        Ok(processed) => processed,
        // A client gets an answer, not API Gateway's bare 502 for a failed
        // invocation; the reason goes to the log only.
        Err(err) if shape == EventShape::Http => {
            tracing::error!("request failed: {}", crate::error_text(&err));
            return to_answer(&http_error(500, "the request could not be processed"));
        }
        Err(err) => return Err(InvokeError::Pipeline(err)),
    };
    tracing::info!(
        event = ?shape,
        records = count,
        outputs = processed.outputs.len(),
        dead_letters = processed.dead.len(),
        "invocation done"
    );
    let answer = answer(shape, &ids, &processed).map_err(InvokeError::BatchFailed)?;
    if answer.get().len() <= MAX_ANSWER_BYTES {
        return Ok(answer);
    }
    let reason = format!(
        "the answer is {} bytes, over Lambda's limit of {MAX_ANSWER_BYTES}: its outputs \
         cannot be returned",
        answer.get().len()
    );
    if let Some(record) = single {
        let emitted = processed.outcomes.first() == Some(&InputOutcome::Emitted);
        runner
            .dead_letter_input(record, emitted, "answer", &reason)
            .await
            .map_err(InvokeError::Pipeline)?;
    }
    match shape {
        EventShape::Http => to_answer(&http_error(500, &reason)),
        _ => Err(InvokeError::AnswerTooLarge(anyhow::anyhow!("{reason}"))),
    }
}

/// Whether a fixed event shape takes this event. An empty batch has no
/// record to tell SQS from Kinesis.
fn fits(fixed: EventShape, detected: EventShape, event: &str) -> bool {
    fixed == detected
        || (detected == EventShape::Sqs
            && fixed == EventShape::Kinesis
            && batch_len(event) == Some(0))
}

/// A FIFO queue's messages come from a queue whose name ends in `.fifo`.
fn is_fifo(records: &[Record]) -> bool {
    records
        .iter()
        .any(|r| r.topic.as_deref().is_some_and(|t| t.ends_with(".fifo")))
}

/// An SQS FIFO batch, in order, one message at a time: after a message of a
/// group fails, the group's later messages are not processed but reported
/// failed with it, so Lambda gives them again in their order. Returns the
/// indices of the failed messages.
async fn fifo(
    runner: &mut Runner,
    records: Vec<Record>,
    ids: &[String],
) -> Result<Vec<usize>, InvokeError> {
    let count = records.len();
    let mut stopped: std::collections::HashSet<Option<String>> = Default::default();
    let mut failures = Vec::new();
    let (mut outputs, mut dead_letters) = (0, 0);
    for (i, record) in records.into_iter().enumerate() {
        let group = record.key.clone();
        if stopped.contains(&group) {
            failures.push(i);
            continue;
        }
        let processed = runner
            .process(vec![record], now_ms())
            .await
            .map_err(InvokeError::Pipeline)?;
        outputs += processed.outputs.len();
        dead_letters += processed.dead.len();
        if processed.outcomes.first() == Some(&InputOutcome::DeadLettered) {
            tracing::warn!(
                message = ids.get(i).map(String::as_str).unwrap_or_default(),
                group = group.as_deref().unwrap_or_default(),
                "message failed: its group's later messages in this batch wait for its retry"
            );
            stopped.insert(group);
            failures.push(i);
        }
    }
    tracing::info!(
        event = "Sqs",
        fifo = true,
        records = count,
        outputs,
        dead_letters,
        not_processed = failures.len().saturating_sub(stopped.len()),
        "invocation done"
    );
    Ok(failures)
}

fn to_answer(value: &impl serde::Serialize) -> Result<Box<RawValue>, InvokeError> {
    serde_json::value::to_raw_value(value)
        .map_err(|err| InvokeError::Pipeline(anyhow::anyhow!("cannot write the answer: {err}")))
}

/// The fields that tell event shapes apart, left unparsed, so telling the
/// shape costs a scan of the event and not a copy of it.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "Records", borrow, default)]
    records: Option<&'a RawValue>,
    #[serde(rename = "eventSource", borrow, default)]
    event_source: Option<&'a RawValue>,
    #[serde(rename = "records", borrow, default)]
    kafka_records: Option<&'a RawValue>,
    #[serde(rename = "requestContext", borrow, default)]
    request_context: Option<&'a RawValue>,
    #[serde(rename = "httpMethod", borrow, default)]
    http_method: Option<&'a RawValue>,
    #[serde(rename = "routeKey", borrow, default)]
    route_key: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RecordProbe<'a> {
    #[serde(rename = "eventSource", borrow, default)]
    lower: Option<&'a RawValue>,
    #[serde(rename = "EventSource", borrow, default)]
    upper: Option<&'a RawValue>,
}

/// The fields that tell the kind of an event that is a JSON object. serde
/// would also fill a struct from an array's elements in order, which would
/// take a device's array of readings for an HTTP request or a batch.
fn probe(event: &str) -> Option<Probe<'_>> {
    if !event.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str(event).ok()
}

/// How many fields a JSON object has.
fn key_count(event: &str) -> Option<usize> {
    serde_json::from_str::<std::collections::HashMap<&str, serde::de::IgnoredAny>>(event)
        .ok()
        .map(|fields| fields.len())
}

/// A JSON string's value; `None` for any other JSON.
fn text_of(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

/// The shape of an event (its JSON text), from the fields each kind has.
/// Anything but an object is a raw event.
pub fn detect(event: &str) -> EventShape {
    let Some(probe) = probe(event) else {
        return EventShape::Raw;
    };
    let records = probe
        .records
        .and_then(|r| serde_json::from_str::<Vec<&RawValue>>(r.get()).ok());
    // An empty batch (SQS or Kinesis: the answer is the same) has no
    // record to say which. Lambda never sends one; a test event may, and it
    // holds nothing else, where a device's reading with an empty `Records`
    // field of its own is a raw event.
    if records.as_ref().is_some_and(Vec::is_empty) {
        return if key_count(event) == Some(1) {
            EventShape::Sqs
        } else {
            EventShape::Raw
        };
    }
    let first = records
        .and_then(|records| records.first().copied())
        .and_then(|r| serde_json::from_str::<RecordProbe<'_>>(r.get()).ok());
    let source = first.and_then(|r| text_of(r.lower).or_else(|| text_of(r.upper)));
    match source.as_deref() {
        Some("aws:sqs") => return EventShape::Sqs,
        Some("aws:kinesis") => return EventShape::Kinesis,
        _ => {}
    }
    if matches!(
        text_of(probe.event_source).as_deref(),
        Some("aws:kafka" | "SelfManagedKafka")
    ) && probe
        .kafka_records
        .is_some_and(|r| r.get().starts_with('{'))
    {
        return EventShape::Kafka;
    }
    if probe.request_context.is_some() && (probe.http_method.is_some() || probe.route_key.is_some())
    {
        return EventShape::Http;
    }
    EventShape::Raw
}

/// What an event of an AWS service runnel does not read as records of its
/// own is (an SNS notification, an S3 event...), for a pipeline of a fixed
/// kind, which must not take it for one of its own: under `auto` such an
/// event is a raw event, one record.
fn other_service(event: &str) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(rename = "detail-type", borrow, default)]
        detail_type: Option<&'a RawValue>,
        #[serde(borrow, default)]
        source: Option<&'a RawValue>,
        #[serde(borrow, default)]
        awslogs: Option<&'a RawValue>,
    }
    if !event.trim_start().starts_with('{') {
        return None;
    }
    if let Ok(top) = serde_json::from_str::<Top<'_>>(event) {
        if top.detail_type.is_some() && top.source.is_some() {
            return Some("an EventBridge event");
        }
        if top.awslogs.is_some() {
            return Some("a CloudWatch Logs event");
        }
    }
    let probe = probe(event)?;
    let records = serde_json::from_str::<Vec<&RawValue>>(probe.records?.get()).ok()?;
    let first = serde_json::from_str::<RecordProbe<'_>>(records.first()?.get()).ok()?;
    match text_of(first.lower)
        .or_else(|| text_of(first.upper))?
        .as_str()
    {
        "aws:sns" => Some("an SNS notification"),
        "aws:s3" => Some("an S3 event notification"),
        "aws:dynamodb" => Some("a DynamoDB stream batch"),
        "aws:ses" => Some("an SES event"),
        "aws:codecommit" => Some("a CodeCommit event"),
        "aws:sqs" | "aws:kinesis" => None,
        _ => Some("an event of another AWS service"),
    }
}

/// How many records an SQS or Kinesis batch holds; `None` if it is not one.
fn batch_len(event: &str) -> Option<usize> {
    let probe = probe(event)?;
    serde_json::from_str::<Vec<&RawValue>>(probe.records?.get())
        .ok()
        .map(|records| records.len())
}

/// The header that carries what the event source calls a record (SQS
/// message id, Kinesis sequence number, Kafka `partition@offset`): the id
/// `batchItemFailures` names, so a dead letter can be matched to it.
const ITEM_ID_HEADER: &str = "lambda.item-id";

/// Records, and per record what the event source calls it (message id,
/// sequence number), for partial batch failures.
type Decoded = (Vec<Record>, Vec<String>);

/// [`decode`] from the event's text. An SQS batch, the commonest and
/// largest, goes straight to its type without a `Value` in between.
fn decode_text(shape: EventShape, event: &str) -> anyhow::Result<Decoded> {
    match shape {
        EventShape::Sqs => {
            let event = serde_json::from_str(event).context(not_valid("SQS"))?;
            return sqs(event);
        }
        // The event's own text: parsed and written again, its numbers could
        // lose digits and its keys their order.
        EventShape::Raw | EventShape::Auto => return Ok(raw(event)),
        _ => {}
    }
    decode(
        shape,
        serde_json::from_str(event).context("the event is not JSON")?,
    )
}

fn not_valid(kind: &str) -> String {
    format!("the event is not a valid {kind} event")
}

fn decode(shape: EventShape, event: Value) -> anyhow::Result<Decoded> {
    let not = not_valid;
    Ok(match shape {
        EventShape::Sqs => sqs(serde_json::from_value(event).with_context(|| not("SQS"))?)?,
        EventShape::Kinesis => {
            // Named here: the type's own error would not say which record.
            for (i, record) in event["Records"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(data) = record["kinesis"]["data"].as_str() {
                    if let Err(err) = base64::engine::general_purpose::STANDARD.decode(data) {
                        anyhow::bail!(
                            "{}: record {i} (sequence number {}): its data is not base64: {err}",
                            not("Kinesis"),
                            record["kinesis"]["sequenceNumber"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            let mut event = event;
            let arrivals = take_times(
                &mut event,
                "Records",
                &["kinesis", "approximateArrivalTimestamp"],
                1000.0,
            )
            .remove("")
            .unwrap_or_default();
            kinesis(
                serde_json::from_value(event).with_context(|| not("Kinesis"))?,
                &arrivals,
            )
        }
        EventShape::Kafka => {
            if !event.get("records").is_some_and(Value::is_object) {
                anyhow::bail!("{}: it has no `records` object", not("Kafka"));
            }
            let mut event = event;
            let times = take_times(&mut event, "records", &["timestamp"], 1.0);
            sign_header_bytes(&mut event);
            kafka(
                serde_json::from_value(event).with_context(|| not("Kafka"))?,
                &times,
            )?
        }
        EventShape::Http => http(event)?,
        EventShape::Raw | EventShape::Auto => raw(&event.to_string()),
    })
}

/// The last part of an ARN: a queue's or a stream's name.
fn arn_name(arn: Option<&str>) -> Option<String> {
    arn.and_then(|a| a.rsplit([':', '/']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

fn sqs(event: SqsEvent) -> anyhow::Result<Decoded> {
    // Lambda names a failed message by its id: a record without one is not
    // an SQS message, and its failure could not be reported.
    if let Some(i) = event.records.iter().position(|m| m.message_id.is_none()) {
        anyhow::bail!("{}: record {i} has no messageId", not_valid("SQS"));
    }
    Ok(event
        .records
        .into_iter()
        .map(|message| {
            let mut record = Record::new(message.body.unwrap_or_default().into_bytes());
            record.key = message.attributes.get("MessageGroupId").cloned();
            record.topic = arn_name(message.event_source_arn.as_deref());
            record.timestamp = message
                .attributes
                .get("SentTimestamp")
                .and_then(|t| t.parse().ok());
            let mut headers: Vec<(String, String)> = message
                .message_attributes
                .into_iter()
                .filter_map(|(name, value)| {
                    // A header is text: a binary attribute comes as base64.
                    let binary = value
                        .binary_value
                        .map(|b| base64::engine::general_purpose::STANDARD.encode(b.0));
                    value.string_value.or(binary).map(|v| (name, v))
                })
                .collect();
            headers.sort();
            let id = message.message_id.unwrap_or_default();
            headers.push((ITEM_ID_HEADER.into(), id.clone()));
            record.headers = headers;
            (record, id)
        })
        .unzip())
}

/// Record times, in ms, by the group they sit in (Kafka's partitions; one
/// group for a list), in the event's order.
type Times = std::collections::HashMap<String, Vec<Option<i64>>>;

/// Reads each record's time from the event and leaves 0 in its place.
/// aws_lambda_events 1.2 reads a Kinesis arrival time's fraction as if it
/// were milliseconds (`.2` s as 2 ms), rounds Kafka times down by a
/// millisecond, and fails or panics on some valid ones, so runnel reads them
/// itself. `records` holds a list of records, or lists by name; `path` leads
/// from a record to its time; `unit_ms` is the time unit in ms.
fn take_times(event: &mut Value, records: &str, path: &[&str], unit_ms: f64) -> Times {
    let read = |list: &mut Value| -> Vec<Option<i64>> {
        let Some(list) = list.as_array_mut() else {
            return Vec::new();
        };
        list.iter_mut()
            .map(|record| {
                let field = path
                    .iter()
                    .try_fold(record, |value, key| value.get_mut(*key))?;
                let ms = field.as_f64().map(|t| (t * unit_ms).round() as i64);
                if field.is_number() {
                    *field = Value::from(0);
                }
                ms
            })
            .collect()
    };
    match event.get_mut(records) {
        Some(Value::Object(groups)) => groups
            .iter_mut()
            .map(|(name, list)| (name.clone(), read(list)))
            .collect(),
        Some(list) => Times::from([(String::new(), read(list))]),
        None => Times::new(),
    }
}

/// Kafka header values are lists of bytes, which AWS writes as signed
/// numbers (-128 to 127) and aws_lambda_events reads as such; a source
/// that writes them unsigned (0 to 255) is read the same way.
fn sign_header_bytes(event: &mut Value) {
    let Some(partitions) = event.get_mut("records").and_then(Value::as_object_mut) else {
        return;
    };
    let bytes = partitions
        .values_mut()
        .filter_map(Value::as_array_mut)
        .flatten()
        .filter_map(|record| record.get_mut("headers").and_then(Value::as_array_mut))
        .flatten()
        .filter_map(Value::as_object_mut)
        .flat_map(|header| header.values_mut())
        .filter_map(Value::as_array_mut)
        .flatten();
    for byte in bytes {
        if let Some(n @ 128..=255) = byte.as_u64() {
            *byte = Value::from(n as i64 - 256);
        }
    }
}

fn kinesis(event: KinesisEvent, arrivals: &[Option<i64>]) -> Decoded {
    event
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut record = Record::new(r.kinesis.data.0);
            record.key = Some(r.kinesis.partition_key);
            record.topic = arn_name(r.event_source_arn.as_deref());
            record.timestamp = arrivals.get(i).copied().flatten();
            let id = r.kinesis.sequence_number;
            record.headers = vec![(ITEM_ID_HEADER.into(), id.clone())];
            (record, id)
        })
        .unzip()
}

fn kafka(event: KafkaEvent, times: &Times) -> anyhow::Result<Decoded> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut partitions: Vec<_> = event.records.into_iter().collect();
    partitions.sort_by(|a, b| a.0.cmp(&b.0));
    let mut records = Vec::new();
    let mut ids = Vec::new();
    for (partition, messages) in partitions {
        let partition_times = times.get(&partition);
        for (i, m) in messages.into_iter().enumerate() {
            let id = format!("{partition}@{}", m.offset);
            let value = match &m.value {
                Some(v) => b64
                    .decode(v)
                    .with_context(|| format!("Kafka record {id}: value is not base64"))?,
                None => Vec::new(),
            };
            let mut record = Record::new(value);
            if let Some(key) = &m.key {
                let key = b64
                    .decode(key)
                    .with_context(|| format!("Kafka record {id}: key is not base64"))?;
                // A key is text: one that is not stays apart from every
                // other as its base64, as bytes that are not text do elsewhere.
                record.key =
                    Some(String::from_utf8(key).unwrap_or_else(|e| b64.encode(e.into_bytes())));
            }
            record.topic = m.topic.clone();
            record.timestamp = partition_times.and_then(|t| t.get(i).copied().flatten());
            record.headers = m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .map(|(name, bytes)| {
                    let bytes: Vec<u8> = bytes.iter().map(|b| *b as u8).collect();
                    // As with the key: bytes that are not text come as base64.
                    let value =
                        String::from_utf8(bytes).unwrap_or_else(|e| b64.encode(e.into_bytes()));
                    (name.clone(), value)
                })
                .collect();
            record.headers.push((ITEM_ID_HEADER.into(), id.clone()));
            records.push(record);
            ids.push(id);
        }
    }
    Ok((records, ids))
}

fn http(event: Value) -> anyhow::Result<Decoded> {
    if event["requestContext"].get("elb").is_some() {
        anyhow::bail!(
            "the event is an Application Load Balancer request: runnel answers API Gateway \
             (REST, HTTP API) and function URL requests"
        );
    }
    // A REST API sends version 1 (httpMethod); HTTP APIs and function URLs send 2.0.
    // Query parameters are read from the event itself: the crate's map
    // splits version 2's values at commas, and panics on an empty list.
    let (body, base64, path, mut headers, request) = if event.get("httpMethod").is_some() {
        // The multi-value forms hold every value; the plain ones, the last.
        let query = match query_lists(&event["multiValueQueryStringParameters"]) {
            lists if !lists.is_empty() => lists,
            _ => query_lists(&event["queryStringParameters"]),
        };
        let request: ApiGatewayProxyRequest = serde_json::from_value(event)
            .context("the event is not a valid API Gateway (REST) request")?;
        let headers = if request.multi_value_headers.is_empty() {
            &request.headers
        } else {
            &request.multi_value_headers
        };
        let headers = request_headers(headers, query, &[]);
        let about = Request {
            method: request.http_method.to_string(),
            path_parameters: request.path_parameters,
            time_ms: request.request_context.request_time_epoch,
        };
        (
            request.body,
            request.is_base64_encoded,
            request.path,
            headers,
            about,
        )
    } else {
        // Version 2 joins a parameter's values with commas, and a value may
        // hold commas of its own: the raw query string tells them apart. A
        // hand-made event may have only the map; its values are taken whole.
        let plain_query = query_lists(&event["queryStringParameters"]);
        let request: ApiGatewayV2httpRequest = serde_json::from_value(event)
            .context("the event is not a valid API Gateway HTTP API or function URL request")?;
        let raw_query = request.raw_query_string.as_deref().unwrap_or_default();
        let query = if raw_query.is_empty() {
            plain_query
        } else {
            form_urlencoded::parse(raw_query.as_bytes())
                .into_owned()
                .collect()
        };
        let cookies = request.cookies.as_deref().unwrap_or_default();
        let headers = request_headers(&request.headers, query, cookies);
        let about = Request {
            method: request.request_context.http.method.to_string(),
            path_parameters: request.path_parameters,
            time_ms: request.request_context.time_epoch,
        };
        (
            request.body,
            request.is_base64_encoded,
            request.raw_path,
            headers,
            about,
        )
    };
    headers.push(("http.method".into(), request.method));
    let mut path_parameters: Vec<_> = request.path_parameters.into_iter().collect();
    path_parameters.sort();
    headers.extend(
        path_parameters
            .into_iter()
            .map(|(name, value)| (format!("path.{name}"), value)),
    );
    let body = body.unwrap_or_default();
    let payload = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .context("the request body is marked base64 but is not")?
    } else {
        body.into_bytes()
    };
    let mut record = Record::new(payload);
    record.topic = path;
    // The time API Gateway took the request; a hand-made event may lack it.
    record.timestamp = Some(if request.time_ms > 0 {
        request.time_ms
    } else {
        now_ms()
    });
    record.headers = headers;
    Ok((vec![record], vec!["request".into()]))
}

/// What a request says of itself beside its headers, body and path.
struct Request {
    method: String,
    path_parameters: std::collections::HashMap<String, String>,
    /// When API Gateway took it, ms since the Unix epoch; 0 when not said.
    time_ms: i64,
}

/// A request's headers, names in lower case as HTTP/2 and API Gateway's
/// version 2 give them, a repeated one's values joined by commas as version
/// 2 joins them; its cookies as one `cookie` header; and its query
/// parameters as `query.NAME`, one header per value. So a device id sent
/// any of these ways reaches the stage.
fn request_headers(
    headers: &aws_lambda_events::http::HeaderMap,
    query: Vec<(String, String)>,
    cookies: &[String],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        // Names runnel gives meaning to are its own to set: a client's
        // `http.status` passed through to an output would set the answer,
        // and its `query.x` or `path.x` would pose as a parameter.
        if is_reserved_header(name.as_str()) {
            continue;
        }
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        out.push((name.as_str().to_string(), values.join(",")));
    }
    if !cookies.is_empty() && !out.iter().any(|(name, _)| name == "cookie") {
        out.push(("cookie".into(), cookies.join("; ")));
    }
    out.extend(
        query
            .into_iter()
            .map(|(name, value)| (format!("query.{name}"), value)),
    );
    out
}

/// A header name runnel sets from the request itself, or reads from an
/// output to make the answer.
fn is_reserved_header(name: &str) -> bool {
    ["http.", "path.", "query."].iter().any(|prefix| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    }) || name.eq_ignore_ascii_case(ITEM_ID_HEADER)
}

/// Query parameters from an event's map of them: each value of a list
/// (`multiValueQueryStringParameters`), or the one string.
fn query_lists(params: &Value) -> Vec<(String, String)> {
    let Some(params) = params.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in params {
        match value {
            Value::String(one) => out.push((name.clone(), one.clone())),
            Value::Array(many) => out.extend(
                many.iter()
                    .filter_map(Value::as_str)
                    .map(|v| (name.clone(), v.to_string())),
            ),
            _ => {}
        }
    }
    out
}

fn raw(event: &str) -> Decoded {
    #[derive(Deserialize)]
    struct Topic {
        topic: Option<String>,
    }
    let mut record = Record::new(event.as_bytes().to_vec());
    // An IoT rule can pass the topic along: SELECT *, topic() AS topic.
    record.topic = serde_json::from_str::<Topic>(event)
        .ok()
        .and_then(|t| t.topic);
    record.timestamp = Some(now_ms());
    (vec![record], vec!["event".into()])
}

/// A payload in a JSON answer: itself, as written, when it is JSON; else
/// its text; else `{"base64": …}`.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum AnswerPayload<'a> {
    Json(&'a RawValue),
    Text(&'a str),
    Binary { base64: String },
}

impl<'a> AnswerPayload<'a> {
    fn of(payload: &'a [u8]) -> Self {
        if let Ok(json) = serde_json::from_slice::<&RawValue>(payload) {
            return AnswerPayload::Json(json);
        }
        match std::str::from_utf8(payload) {
            Ok(text) => AnswerPayload::Text(text),
            Err(_) => AnswerPayload::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(payload),
            },
        }
    }
}

/// Indices of the records with a dead letter, in order.
fn failed(processed: &Processed) -> Vec<usize> {
    processed
        .outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == InputOutcome::DeadLettered)
        .map(|(i, _)| i)
        .collect()
}

/// `{"batchItemFailures": [...]}`: Lambda retries (or redrives) only the
/// records named here; the rest are deleted from the queue or checkpointed
/// past.
fn batch_failures<'a>(ids: impl Iterator<Item = &'a String>) -> Value {
    let failures: Vec<Value> = ids.map(|id| json!({ "itemIdentifier": id })).collect();
    json!({ "batchItemFailures": failures })
}

/// The answer for the event's records. Outputs and dead letters a stage's
/// timer made in the same invocation go to the sinks only: they are not
/// the caller's.
fn answer(
    shape: EventShape,
    ids: &[String],
    processed: &Processed,
) -> anyhow::Result<Box<RawValue>> {
    let failed = failed(processed);
    let outputs: Vec<&Record> = processed
        .outputs
        .iter()
        .filter(|(input, _)| input.is_some())
        .map(|(_, r)| r)
        .collect();
    let callers = || processed.dead.iter().filter(|(input, ..)| input.is_some());
    let dead: Vec<(&str, &str)> = callers()
        .map(|(_, stage, reason, _)| (stage.as_str(), reason.as_str()))
        .collect();
    let fault = callers().any(|(.., fault)| *fault);
    let first_reason = || {
        dead.first()
            .map(|(stage, reason)| format!("{stage}: {reason}"))
            .unwrap_or_default()
    };
    let value = match shape {
        EventShape::Sqs | EventShape::Kinesis => {
            batch_failures(failed.iter().filter_map(|&i| ids.get(i)))
        }
        // Kafka has no partial failure: the batch fails as a whole, so the
        // event source retries it or sends it to its on-failure destination.
        EventShape::Kafka => {
            if failed.is_empty() {
                json!({ "processed": ids.len() })
            } else {
                let names: Vec<&str> = failed
                    .iter()
                    .filter_map(|&i| ids.get(i).map(String::as_str))
                    .collect();
                anyhow::bail!(
                    "{} of {} records failed ({}); first: {}",
                    failed.len(),
                    ids.len(),
                    names.join(", "),
                    first_reason()
                )
            }
        }
        EventShape::Http if fault => {
            // A crash or a deadline is the function's fault, not the
            // request's, and what went wrong inside is for its log.
            tracing::error!("request failed: {}", first_reason());
            http_error(500, "the request could not be processed")
        }
        EventShape::Http => http_answer(&outputs, !failed.is_empty(), first_reason())?,
        EventShape::Raw | EventShape::Auto => {
            #[derive(serde::Serialize)]
            struct DeadLetter<'a> {
                stage: &'a str,
                reason: &'a str,
            }
            #[derive(serde::Serialize)]
            struct RawAnswer<'a> {
                outputs: Vec<AnswerPayload<'a>>,
                dead_letters: Vec<DeadLetter<'a>>,
            }
            let answer = RawAnswer {
                outputs: outputs
                    .iter()
                    .map(|r| AnswerPayload::of(&r.payload))
                    .collect(),
                dead_letters: dead
                    .iter()
                    .map(|&(stage, reason)| DeadLetter { stage, reason })
                    .collect(),
            };
            return Ok(serde_json::value::to_raw_value(&answer)?);
        }
    };
    Ok(serde_json::value::to_raw_value(&value)?)
}

/// 200 with the output (one: its payload; several: a JSON array), 204 with
/// none, 422 with the reason when the request was dead-lettered.
fn http_answer(outputs: &[&Record], dead_lettered: bool, reason: String) -> anyhow::Result<Value> {
    let json_headers = json!({ "content-type": "application/json" });
    if dead_lettered {
        return Ok(http_error(422, &reason));
    }
    let mut answer = match outputs {
        [] => json!({ "statusCode": 204, "body": "", "isBase64Encoded": false }),
        [only] => match AnswerPayload::of(&only.payload) {
            AnswerPayload::Binary { base64 } => json!({
                "statusCode": 200,
                "headers": { "content-type": "application/octet-stream" },
                "body": base64,
                "isBase64Encoded": true,
            }),
            // JSON or text, so UTF-8: the body is the payload as it is.
            kind => json!({
                "statusCode": 200,
                "headers": if matches!(kind, AnswerPayload::Json(_)) {
                    json_headers
                } else {
                    json!({ "content-type": "text/plain; charset=utf-8" })
                },
                "body": String::from_utf8_lossy(&only.payload),
                "isBase64Encoded": false,
            }),
        },
        many => {
            let body: Vec<AnswerPayload<'_>> =
                many.iter().map(|r| AnswerPayload::of(&r.payload)).collect();
            json!({
                "statusCode": 200,
                "headers": json_headers,
                "body": serde_json::to_string(&body)?,
                "isBase64Encoded": false,
            })
        }
    };
    // A stage may set the answer's status and content type through its
    // (first) output's headers.
    if let Some(first) = outputs.first() {
        if let Some(text) = first.header(HTTP_STATUS_HEADER) {
            match text.trim().parse::<u16>() {
                Ok(status) if (200..=599).contains(&status) => {
                    answer["statusCode"] = status.into();
                }
                _ => tracing::warn!(
                    "the output's {HTTP_STATUS_HEADER} header is {text:?}, not a status from \
                     200 to 599; answering {}",
                    answer["statusCode"]
                ),
            }
        }
        if let Some(content_type) = first.header(HTTP_CONTENT_TYPE_HEADER) {
            answer["headers"]["content-type"] = content_type.into();
        }
    }
    Ok(answer)
}

/// The output header whose value, 200 to 599, is an HTTP answer's status.
const HTTP_STATUS_HEADER: &str = "http.status";
/// The output header that is an HTTP answer's content type.
const HTTP_CONTENT_TYPE_HEADER: &str = "http.content-type";

/// An HTTP answer with `{"error": reason}` as its body.
fn http_error(status: u16, reason: &str) -> Value {
    json!({
        "statusCode": status,
        "headers": { "content-type": "application/json" },
        "body": json!({ "error": reason }).to_string(),
        "isBase64Encoded": false,
    })
}

/// Tells the Runtime API why the start failed, so Lambda reports it with
/// the invocation instead of a bare "runtime exited".
async fn report_init_error(message: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    let base = if api.starts_with("http://") || api.starts_with("https://") {
        api
    } else {
        format!("http://{api}")
    };
    let url = format!(
        "{}/2018-06-01/runtime/init/error",
        base.trim_end_matches('/')
    );
    let body = json!({ "errorMessage": message, "errorType": "Runtime.InitError" }).to_string();
    if let Err(err) = post(&url, body).await {
        tracing::error!("cannot report the init error to {url}: {err}");
    }
}

async fn post(url: &str, body: String) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
        .body(Full::new(bytes::Bytes::from(body)))?;
    let response = client.request(request).await?;
    if !response.status().is_success() {
        anyhow::bail!("status {}", response.status());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_told_apart() {
        assert_eq!(
            detect(&json!({"Records": [{"eventSource": "aws:sqs", "body": "x"}]}).to_string()),
            EventShape::Sqs
        );
        assert_eq!(
            detect(&json!({"Records": [{"eventSource": "aws:kinesis"}]}).to_string()),
            EventShape::Kinesis
        );
        assert_eq!(
            detect(&json!({"eventSource": "aws:kafka", "records": {}}).to_string()),
            EventShape::Kafka
        );
        assert_eq!(
            detect(
                &json!({"version": "2.0", "routeKey": "$default", "requestContext": {}})
                    .to_string()
            ),
            EventShape::Http
        );
        assert_eq!(
            detect(&json!({"device": "dev-1"}).to_string()),
            EventShape::Raw
        );
        // Whatever else a raw event holds, it is a raw event.
        for other in [
            "[1, 2]",
            "\"text\"",
            r#"{"Records": 5, "eventSource": 7, "requestContext": null}"#,
            r#"{"Records": [{"EventSource": "aws:sqs"}]}"#,
            // An empty batch: SQS and Kinesis get the same answer.
            r#"{"Records": []}"#,
            // A device's own empty `Records` among its fields.
            r#"{"device": "d1", "Records": [], "temperature": 21}"#,
            // Arrays, whose elements would fill the fields that tell kinds
            // apart by their order.
            "[20.1, 20.4, 21.0, 21.3, 22.0]",
            r#"[{"t": 1}, {"t": 2}, {"t": 3}, {"t": 4}, {"t": 5}, {"t": 6}]"#,
            "[[]]",
            r#"[[{"eventSource": "aws:sqs"}]]"#,
        ] {
            let expected = if other.contains("EventSource") || other == r#"{"Records": []}"# {
                EventShape::Sqs
            } else {
                EventShape::Raw
            };
            assert_eq!(detect(other), expected, "{other}");
        }
        for array in [r#"[1, "EventBridge"]"#, r#"[[{"eventSource": "aws:sns"}]]"#] {
            assert_eq!(other_service(array), None, "{array}");
        }
    }

    #[test]
    fn kinesis_and_kafka_times_are_read_to_the_millisecond() {
        let kinesis_record = |seq: &str, at: f64| {
            json!({
                "kinesis": {
                    "partitionKey": "k", "sequenceNumber": seq, "data": "MT0x",
                    "approximateArrivalTimestamp": at
                },
                "eventSource": "aws:kinesis",
                "eventSourceARN": "arn:aws:kinesis:eu-west-1:1:stream/frames"
            })
        };
        let event = json!({"Records": [
            kinesis_record("1", 1767225600.2),
            kinesis_record("2", 1767225600.05),
            kinesis_record("3", 1767225600.999999),
        ]});
        let (records, ids) = decode(EventShape::Kinesis, event).expect("kinesis");
        let times: Vec<_> = records.iter().map(|r| r.timestamp).collect();
        assert_eq!(
            times,
            [
                Some(1767225600200),
                Some(1767225600050),
                Some(1767225601000)
            ]
        );
        assert_eq!(ids, ["1", "2", "3"]);

        let kafka_record = |offset: u64, at: f64| {
            json!({
                "topic": "t", "partition": 0, "offset": offset, "timestamp": at,
                "timestampType": "CREATE_TIME", "value": "MT0x", "headers": []
            })
        };
        let event = json!({
            "eventSource": "aws:kafka",
            "records": {
                "t-1": [kafka_record(7, 1767225600123.0)],
                "t-0": [kafka_record(1, 1767225600001.0), kafka_record(2, 1767225600000.5)],
            }
        });
        let (records, ids) = decode(EventShape::Kafka, event).expect("kafka");
        let times: Vec<_> = records.iter().map(|r| r.timestamp).collect();
        assert_eq!(
            times,
            [
                Some(1767225600001),
                Some(1767225600001),
                Some(1767225600123)
            ]
        );
        assert_eq!(ids, ["t-0@1", "t-0@2", "t-1@7"]);
    }

    #[test]
    fn request_headers_and_query_parameters_reach_the_stage() {
        let mut event: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/function-url.json"))
                .expect("sample event");
        event["headers"]["X-Device-Id"] = "dev-7".into();
        event["queryStringParameters"] = json!({"site": "plant-a"});
        let (records, _) = decode(EventShape::Http, event).expect("request");
        let headers = &records[0].headers;
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-device-id"), Some("dev-7"), "{headers:?}");
        assert_eq!(get("content-type"), Some("text/csv"));
        assert_eq!(get("query.site"), Some("plant-a"));
        assert_eq!(get("http.method"), Some("POST"));
        assert_eq!(records[0].topic.as_deref(), Some("/readings"));
        assert_eq!(records[0].timestamp, Some(1_795_319_400_000));

        let mut rest: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/apigw-rest.json"))
                .expect("sample event");
        rest["httpMethod"] = "PUT".into();
        rest["pathParameters"] = json!({"device": "dev-3"});
        let (records, _) = decode(EventShape::Http, rest).expect("request");
        let header = |name: &str| records[0].header(name).map(str::to_string);
        assert_eq!(header("http.method").as_deref(), Some("PUT"));
        assert_eq!(header("path.device").as_deref(), Some("dev-3"));
        assert_eq!(records[0].timestamp, Some(1_428_582_896_000));

        // A client cannot pose as runnel: its headers with runnel's names
        // are dropped, so they cannot reach an answer through an output.
        let mut spoofed: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/function-url.json"))
                .expect("sample event");
        for (name, value) in [
            ("http.status", "299"),
            ("HTTP.Content-Type", "text/html"),
            ("http.method", "DELETE"),
            ("path.device", "admin"),
            ("query.site", "elsewhere"),
        ] {
            spoofed["headers"][name] = value.into();
        }
        let (records, _) = decode(EventShape::Http, spoofed).expect("request");
        let names: Vec<&str> = records[0].headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(records[0].header("http.method"), Some("POST"), "{names:?}");
        for name in [
            "http.status",
            "http.content-type",
            "path.device",
            "query.site",
        ] {
            assert!(records[0].header(name).is_none(), "{name}: {names:?}");
        }
    }

    #[test]
    fn sqs_attributes_become_headers_binary_ones_as_base64() {
        let mut event: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/sqs.json"))
                .expect("sample event");
        event["Records"][0]["messageAttributes"]["sig"] =
            json!({"binaryValue": "AQID", "dataType": "Binary"});
        let (records, _) = decode(EventShape::Sqs, event).expect("sqs");
        assert_eq!(
            records[0].headers,
            [
                ("sig".to_string(), "AQID".to_string()),
                ("site".into(), "plant-a".into()),
                (
                    ITEM_ID_HEADER.into(),
                    "059f36b4-87a3-44ab-83d2-661975830a7d".into()
                )
            ]
        );
    }

    #[test]
    fn a_fixed_shape_takes_only_its_own_events() {
        let sqs = include_str!("../../tests/lambda-events/sqs.json");
        let kinesis = include_str!("../../tests/lambda-events/kinesis.json");
        assert!(fits(EventShape::Sqs, detect(sqs), sqs));
        assert!(!fits(EventShape::Http, detect(sqs), sqs));
        assert!(!fits(EventShape::Sqs, detect(kinesis), kinesis));
        assert!(!fits(
            EventShape::Kinesis,
            detect("{\"a\": 1}"),
            "{\"a\": 1}"
        ));
        let empty = r#"{"Records": []}"#;
        assert!(fits(EventShape::Sqs, detect(empty), empty));
        assert!(fits(EventShape::Kinesis, detect(empty), empty));
        assert!(!fits(EventShape::Kafka, detect(empty), empty));
        assert_eq!(
            EventShape::Http.describe(),
            "an API Gateway or function URL request"
        );
        let sns = r#"{"Records": [{"EventSource": "aws:sns", "Sns": {"Message": "hi"}}]}"#;
        assert_eq!(detect(sns), EventShape::Raw);
        assert_eq!(other_service(sns), Some("an SNS notification"));
        let s3 = r#"{"Records": [{"eventSource": "aws:s3", "s3": {}}]}"#;
        assert_eq!(other_service(s3), Some("an S3 event notification"));
        let scheduled = r#"{"detail-type": "Scheduled Event", "source": "aws.events"}"#;
        assert_eq!(other_service(scheduled), Some("an EventBridge event"));
        assert_eq!(other_service(sqs), None);
        assert_eq!(other_service(r#"{"device": "dev-1"}"#), None);
    }

    #[test]
    fn a_kinesis_record_with_bad_data_is_named() {
        let mut event: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/kinesis.json"))
                .expect("sample event");
        event["Records"][1]["kinesis"]["data"] = "not base64!".into();
        let err = decode(EventShape::Kinesis, event).expect_err("bad data");
        assert!(
            err.to_string().contains("record 1 (sequence number 4959"),
            "{err}"
        );
    }

    #[test]
    fn fixed_readers_refuse_what_is_not_theirs() {
        let no_id = r#"{"Records": [{"body": "x"}]}"#;
        let err = decode_text(EventShape::Sqs, no_id).expect_err("no messageId");
        assert!(
            err.to_string().contains("record 0 has no messageId"),
            "{err}"
        );
        let err = decode_text(EventShape::Kafka, r#"{"eventSource": "aws:kafka"}"#)
            .expect_err("no records");
        assert!(err.to_string().contains("no `records` object"), "{err}");
    }

    #[test]
    fn a_raw_event_reaches_the_stage_as_it_was_sent() {
        let event = r#"{"amount":12345678901234567890123,"price":0.30000000000000000444,"dup":1,"dup":2,"topic":"t/1","huge":1e400}"#;
        let (records, _) = decode_text(EventShape::Raw, event).expect("raw");
        assert_eq!(records[0].payload, event.as_bytes());
        assert_eq!(records[0].topic.as_deref(), Some("t/1"));
        let (records, _) = decode_text(EventShape::Raw, "[1,2]").expect("array");
        assert_eq!(records[0].payload, b"[1,2]");
        assert_eq!(records[0].topic, None);
    }

    #[test]
    fn answers_hold_the_callers_records_not_a_timers() {
        let output = |payload: &str| Record::new(payload.as_bytes().to_vec());
        let processed = Processed {
            outcomes: vec![InputOutcome::Emitted],
            outputs: vec![
                (Some(0), output(r#"{"n":12345678901234567890123}"#)),
                (None, output(r#"{"window":"closed"}"#)),
            ],
            dead: vec![(None, "window".into(), "flush failed".into(), true)],
        };
        let ids = ["request".to_string()];
        let answer = answer(EventShape::Http, &ids, &processed).expect("http");
        let answer: Value = serde_json::from_str(answer.get()).expect("JSON");
        assert_eq!(answer["statusCode"], 200, "{answer}");
        assert_eq!(answer["body"], r#"{"n":12345678901234567890123}"#);
        let raw = super::answer(EventShape::Raw, &ids, &processed).expect("raw");
        assert_eq!(
            raw.get(),
            r#"{"outputs":[{"n":12345678901234567890123}],"dead_letters":[]}"#
        );
    }

    #[test]
    fn an_http_answer_is_422_for_a_refusal_500_for_a_failure_and_the_stage_may_set_it() {
        let ids = ["request".to_string()];
        let http = |processed: &Processed| -> Value {
            let answer = answer(EventShape::Http, &ids, processed).expect("http");
            serde_json::from_str(answer.get()).expect("JSON")
        };
        let refused = Processed {
            outcomes: vec![InputOutcome::DeadLettered],
            outputs: vec![],
            dead: vec![(Some(0), "validate".into(), "t above 125".into(), false)],
        };
        let answer = http(&refused);
        assert_eq!(answer["statusCode"], 422, "{answer}");
        assert!(answer["body"]
            .as_str()
            .unwrap_or("")
            .contains("validate: t above 125"));
        let crashed = Processed {
            outcomes: vec![InputOutcome::DeadLettered],
            outputs: vec![],
            dead: vec![(
                Some(0),
                "parse".into(),
                "stage panicked at src/lib.rs".into(),
                true,
            )],
        };
        let answer = http(&crashed);
        assert_eq!(answer["statusCode"], 500, "{answer}");
        assert!(
            !answer["body"].as_str().unwrap_or("").contains("src/lib.rs"),
            "{answer}"
        );

        let created = Record::new(b"<p>made</p>".to_vec())
            .with_header("http.status", "201")
            .with_header("http.content-type", "text/html");
        let made = Processed {
            outcomes: vec![InputOutcome::Emitted],
            outputs: vec![(Some(0), created)],
            dead: vec![],
        };
        let answer = http(&made);
        assert_eq!(answer["statusCode"], 201, "{answer}");
        assert_eq!(answer["headers"]["content-type"], "text/html", "{answer}");
        assert_eq!(answer["body"], "<p>made</p>");
    }

    #[test]
    fn every_header_and_query_value_of_a_request_reaches_the_stage() {
        fn header(records: &[Record], name: &str) -> Vec<String> {
            records[0]
                .headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        }
        let mut rest: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/apigw-rest.json"))
                .expect("sample event");
        rest["multiValueHeaders"] = json!({"X-Tenant": ["t1", "t2"], "X-Name": ["José Müller"]});
        rest["multiValueQueryStringParameters"] =
            json!({"tag": ["a", "b"], "name": ["Smith, John"], "none": []});
        let (records, _) = decode(EventShape::Http, rest).expect("rest");
        assert_eq!(header(&records, "x-tenant"), ["t1,t2"]);
        assert_eq!(header(&records, "x-name"), ["José Müller"]);
        assert_eq!(header(&records, "query.tag"), ["a", "b"]);
        assert_eq!(header(&records, "query.name"), ["Smith, John"]);

        let mut url: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/function-url.json"))
                .expect("sample event");
        url["rawQueryString"] = "range=1,5&name=Smith%2C+John&tag=a&tag=b".into();
        url["queryStringParameters"] = json!({"range": "1,5", "name": "Smith, John", "tag": "a,b"});
        url["cookies"] = json!(["s=1", "t=2"]);
        let (records, _) = decode(EventShape::Http, url).expect("url");
        assert_eq!(header(&records, "query.range"), ["1,5"]);
        assert_eq!(header(&records, "query.name"), ["Smith, John"]);
        assert_eq!(header(&records, "query.tag"), ["a", "b"]);
        assert_eq!(header(&records, "cookie"), ["s=1; t=2"]);

        let mut alb = json!({"httpMethod": "GET", "path": "/", "body": "",
            "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:x"}}});
        alb["isBase64Encoded"] = false.into();
        let err = decode(EventShape::Http, alb).expect_err("ALB");
        assert!(
            err.to_string().contains("Application Load Balancer"),
            "{err}"
        );
    }

    #[test]
    fn kafka_header_bytes_are_read_signed_or_unsigned() {
        let mut event: Value =
            serde_json::from_str(include_str!("../../tests/lambda-events/kafka.json"))
                .expect("sample event");
        let first = event["records"]
            .as_object_mut()
            .and_then(|p| p.values_mut().next())
            .expect("a partition");
        // "café" as AWS writes it (signed) and as unsigned bytes.
        first[0]["headers"] = json!([
            {"signed": [99, 97, 102, -61, -87]},
            {"unsigned": [99, 97, 102, 195, 169]},
            {"bytes": [-1, -2, 65]}
        ]);
        // A key that is not UTF-8 ([0xff, 0xfe, 'A']) stays apart from others.
        first[0]["key"] = "//5B".into();
        let (records, ids) = decode(EventShape::Kafka, event).expect("kafka");
        assert_eq!(
            records[0].headers,
            [
                ("signed".to_string(), "café".to_string()),
                ("unsigned".into(), "café".into()),
                ("bytes".into(), "//5B".into()),
                (ITEM_ID_HEADER.into(), ids[0].clone())
            ]
        );
        assert_eq!(records[0].key.as_deref(), Some("//5B"));
    }

    #[test]
    fn errors_name_their_kind_for_lambda() {
        let d = Diagnostic::from(InvokeError::BatchFailed(anyhow::anyhow!("1 of 2 failed")));
        assert_eq!(d.error_type, "Runnel.BatchFailed");
        assert_eq!(d.error_message, "1 of 2 failed");
        let d = Diagnostic::from(InvokeError::InvalidEvent(anyhow::anyhow!("x")));
        assert_eq!(d.error_type, "Runnel.InvalidEvent");
    }

    #[test]
    fn stages_end_before_the_invocation_does() {
        use std::time::{Duration, Instant};
        let now = Instant::now();
        let now_ms = 1_800_000_000_000;
        let at = |left_ms: i64| {
            stages_deadline_at((now_ms + left_ms) as u64, now_ms, now).map(|d| d - now)
        };
        // Half a second kept for the answer, or a fifth of a short time.
        assert_eq!(at(3_000), Some(Duration::from_millis(2_500)));
        assert_eq!(at(1_000), Some(Duration::from_millis(800)));
        assert_eq!(at(-5), Some(Duration::ZERO));
        // Not a time since the epoch: no deadline rather than none left.
        assert_eq!(stages_deadline_at(600_000, now_ms, now), None);
        assert_eq!(stages_deadline_at(0, now_ms, now), None);
    }

    #[test]
    fn stage_memory_caps_must_fit_the_function() {
        let text = "[source]\ntype = \"lambda\"\n[sink]\ntype = \"none\"\n\
                    [[stage]]\nname = \"a\"\nwasm = \"a.wasm\"\n\
                    [[stage]]\nname = \"b\"\nwasm = \"b.wasm\"\nmemory_mb = 200\n";
        let dir = tempfile::tempdir().expect("temp dir");
        for stage in ["a.wasm", "b.wasm"] {
            std::fs::write(dir.path().join(stage), b"").expect("stage file");
        }
        let pipeline = Pipeline::parse(&dir.path().join("p.toml"), text.into()).expect("pipeline");
        assert_eq!(memory_warning(&pipeline, 512), None);
        let warning = memory_warning(&pipeline, 256).expect("264 + 40 > 256");
        assert!(
            warning.contains("come to 264 MiB") && warning.contains("function's 256 MB"),
            "{warning}"
        );
    }

    #[test]
    fn arn_names_are_the_last_part() {
        assert_eq!(
            arn_name(Some("arn:aws:sqs:us-east-2:123456789012:my-queue")).as_deref(),
            Some("my-queue")
        );
        assert_eq!(
            arn_name(Some(
                "arn:aws:kinesis:us-east-2:123456789012:stream/lambda-stream"
            ))
            .as_deref(),
            Some("lambda-stream")
        );
    }
}
