//! Per-record cost of the example chain through runnel against the same
//! stage code compiled natively and called directly, measured in one run,
//! at batch sizes 1 and 64; and the cost of a pass-through stage.
//!
//! cargo bench -p runnel-tests --bench chain

use std::hint::black_box;
use std::time::{Duration, Instant};

use runnel::chain::Chain;
use runnel::wasm::{Engine, EngineOptions, LoadedStage, StageLimits};
use runnel_sdk::Stage;

/// Records per measured round.
const RECORDS: usize = 64 * 1024;
const ROUNDS: usize = 5;
const DEVICES: usize = 16;

/// The demo pipeline's stage configs, so both sides do the same work.
const STAGES: &[(&str, &str)] = &[
    ("parse", r#"{"units":{"temperature":"C","humidity":"%"}}"#),
    (
        "validate",
        r#"{"required":["temperature"],"ranges":{"temperature":{"min":-40,"max":125}}}"#,
    ),
    (
        "convert",
        r#"{"convert":{"temperature":"C"},"default_tags":{"site":"plant-a"}}"#,
    ),
    ("anomaly", r#"{"threshold":4.0,"warmup":8}"#),
    ("window", r#"{"size_ms":60000}"#),
];

/// ~100-byte JSON readings from 16 devices, one a second each.
fn readings() -> Vec<(String, Vec<u8>, i64)> {
    (0..RECORDS)
        .map(|i| {
            let device = format!("dev-{}", i % DEVICES);
            let ts = 1_767_225_600_000 + (i / DEVICES) as i64 * 1000;
            let temperature = 21.0 + (i % 7) as f64 * 0.1;
            let payload = format!(
                r#"{{"device":"{device}","ts":{ts},"temperature":{temperature:.2},"humidity":{:.1}}}"#,
                40.0 + (i % 5) as f64
            );
            (device, payload.into_bytes(), ts)
        })
        .collect()
}

fn wasm_records(data: &[(String, Vec<u8>, i64)]) -> Vec<runnel::Record> {
    data.iter()
        .map(|(device, payload, ts)| {
            let mut r = runnel::Record::new(payload.clone());
            r.key = Some(device.clone());
            r.topic = Some(format!("sensors/{device}/telemetry"));
            r.timestamp = Some(*ts);
            r
        })
        .collect()
}

fn native_records(data: &[(String, Vec<u8>, i64)]) -> Vec<runnel_sdk::Record> {
    data.iter()
        .map(|(device, payload, ts)| {
            runnel_sdk::Record::new(payload.clone())
                .with_key(device.clone())
                .with_topic(format!("sensors/{device}/telemetry"))
                .with_timestamp(*ts)
        })
        .collect()
}

type NativeStage = Box<dyn FnMut(Vec<runnel_sdk::Record>) -> Vec<runnel_sdk::Record>>;

fn native<S: Stage>(config: &str) -> NativeStage {
    let config = runnel_sdk::parse_config::<S::Config>(config).expect("config");
    let mut stage = S::init(config).expect("init");
    Box::new(move |batch| {
        stage
            .process_batch(batch)
            .into_iter()
            .flat_map(|r| r.unwrap_or_default())
            .collect()
    })
}

fn native_chain() -> Vec<NativeStage> {
    vec![
        native::<parse::Parse>(STAGES[0].1),
        native::<validate::ValidateStage>(STAGES[1].1),
        native::<convert::Convert>(STAGES[2].1),
        native::<anomaly::Anomaly>(STAGES[3].1),
        native::<window::Window>(STAGES[4].1),
    ]
}

fn wasm_chain(engine: &Engine, stages: &[(&str, &str)]) -> Chain {
    let loaded = stages
        .iter()
        .map(|(name, config)| {
            let limits = StageLimits {
                timeout: Duration::from_secs(1),
                memory_bytes: 64 << 20,
            };
            LoadedStage::load(
                engine,
                name,
                &runnel_tests::stage(name),
                config.to_string(),
                limits,
            )
            .expect("load stage")
        })
        .collect();
    Chain::start(loaded)
        .map_err(|(n, e)| format!("{n}: {e}"))
        .expect("start chain")
}

/// Ns per record of one round: `records` through `chain` in batches of `batch`.
fn round<C, R: Clone>(
    records: &[R],
    batch: usize,
    chain: &mut C,
    run: &mut impl FnMut(&mut C, Vec<R>) -> usize,
) -> f64 {
    let batches: Vec<Vec<R>> = records.chunks(batch).map(<[R]>::to_vec).collect();
    let started = Instant::now();
    let mut outputs = 0;
    for b in batches {
        outputs += run(chain, b);
    }
    let elapsed = started.elapsed();
    black_box(outputs);
    elapsed.as_nanos() as f64 / records.len() as f64
}

/// Median ns per record of each side over the rounds. Rounds alternate
/// between the two, so a change in the machine's speed during the run (this
/// VM's steal comes and goes) falls on both; round 0 only warms up.
fn alternating(mut native: impl FnMut() -> f64, mut wasm: impl FnMut() -> f64) -> (f64, f64) {
    let (mut native_ns, mut wasm_ns) = (Vec::new(), Vec::new());
    for r in 0..=ROUNDS {
        let (n, w) = (native(), wasm());
        if r > 0 {
            native_ns.push(n);
            wasm_ns.push(w);
        }
    }
    (median(native_ns), median(wasm_ns))
}

fn median(mut figures: Vec<f64>) -> f64 {
    figures.sort_by(f64::total_cmp);
    figures[figures.len() / 2]
}

/// Median ns per record over the rounds; `make` builds a fresh chain per round
/// so stateful stages start alike. Round 0 warms caches and the allocator.
fn measure<C, R: Clone>(
    records: &[R],
    batch: usize,
    mut make: impl FnMut() -> C,
    mut run: impl FnMut(&mut C, Vec<R>) -> usize,
) -> f64 {
    let figures = (0..=ROUNDS)
        .map(|_| round(records, batch, &mut make(), &mut run))
        .skip(1)
        .collect();
    median(figures)
}

fn main() {
    let data = readings();
    let wasm_in = wasm_records(&data);
    let native_in = native_records(&data);
    let engine = Engine::new(&EngineOptions::default()).expect("engine");

    // RUNNEL_BENCH=chain, =stages or =pass runs one part, for profiling.
    let only = std::env::var("RUNNEL_BENCH").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    println!("runnel chain benchmark: {RECORDS} readings of ~100 bytes, median of {ROUNDS} rounds");
    println!("{:<44} {:>12} {:>10}", "", "ns/record", "vs native");
    for batch in [64, 1] {
        if !part("chain") {
            break;
        }
        let mut run_native = |chain: &mut Vec<NativeStage>, mut b: Vec<runnel_sdk::Record>| {
            for stage in chain.iter_mut() {
                b = stage(b);
            }
            b.len()
        };
        let mut run_wasm = |chain: &mut Chain, b| chain.process(b).outputs.len();
        let (native_ns, wasm_ns) = alternating(
            || round(&native_in, batch, &mut native_chain(), &mut run_native),
            || {
                let mut chain = wasm_chain(&engine, STAGES);
                round(&wasm_in, batch, &mut chain, &mut run_wasm)
            },
        );
        println!(
            "{:<44} {native_ns:>12.0}",
            format!("example chain (5 stages), native, batch {batch}")
        );
        println!(
            "{:<44} {wasm_ns:>12.0} {:>9.2}x",
            format!("example chain (5 stages), runnel, batch {batch}"),
            wasm_ns / native_ns
        );
    }

    // Each stage alone at batch 64, fed what reaches it in the chain (the
    // native outputs of the stages before it): where the chain's ratio comes from.
    let mut reaching = native_in.clone();
    for (i, (name, _)) in STAGES.iter().enumerate() {
        if !part("stages") {
            break;
        }
        let mut run_native = |stage: &mut NativeStage, b| stage(b).len();
        let mut run_wasm = |chain: &mut Chain, b| chain.process(b).outputs.len();
        let (native_ns, wasm_ns) = alternating(
            || {
                round(
                    &reaching,
                    64,
                    &mut native_chain().swap_remove(i),
                    &mut run_native,
                )
            },
            || {
                let mut one = wasm_chain(&engine, &STAGES[i..=i]);
                round(&reaching, 64, &mut one, &mut run_wasm)
            },
        );
        println!(
            "{:<44} {wasm_ns:>12.0} {:>9.2}x   (native {native_ns:.0})",
            format!("stage {name} alone, runnel, batch 64"),
            wasm_ns / native_ns
        );
        let mut stage = native_chain().swap_remove(i);
        reaching = reaching
            .chunks(64)
            .flat_map(|b| stage(b.to_vec()))
            .collect();
    }

    let pass = [("passthrough", "{}")];
    for batch in [1, 64] {
        if !part("pass") {
            break;
        }
        let ns = measure(
            &wasm_in,
            batch,
            || wasm_chain(&engine, &pass),
            |chain, b| chain.process(b).outputs.len(),
        );
        let label = if batch == 1 { "ns/call" } else { "ns/record" };
        println!(
            "{:<44} {ns:>12.0}   ({label})",
            format!("pass-through stage, runnel, batch {batch}")
        );
    }
    // The same calls straight into one instance, without the chain's
    // bookkeeping: what crossing into wasm and back costs by itself.
    for batch in [1, 64] {
        if !part("pass") {
            break;
        }
        let limits = StageLimits {
            timeout: Duration::from_secs(1),
            memory_bytes: 64 << 20,
        };
        let path = runnel_tests::stage("passthrough");
        let stage =
            LoadedStage::load(&engine, "passthrough", &path, "{}".into(), limits).expect("load");
        let mut instance = stage.instantiate().expect("instance");
        if std::env::var_os("RUNNEL_BENCH_FLUSH").is_some() {
            let started = Instant::now();
            for _ in 0..RECORDS {
                black_box(instance.flush(0, false).expect("flush").expect("ok"));
            }
            let ns = started.elapsed().as_nanos() as f64 / RECORDS as f64;
            println!("bare flush call: {ns:.0} ns");
        }
        let mut input: Vec<runnel::Record> = wasm_in[..batch].to_vec();
        if std::env::var_os("RUNNEL_BENCH_BARE").is_some() {
            for r in &mut input {
                r.key = None;
                r.topic = None;
            }
        }
        let calls = RECORDS / batch;
        let mut best = f64::MAX;
        for _ in 0..=ROUNDS {
            let started = Instant::now();
            for _ in 0..calls {
                black_box(instance.process(black_box(&input)).expect("call"));
            }
            best = best.min(started.elapsed().as_nanos() as f64 / RECORDS as f64);
        }
        let label = if batch == 1 { "ns/call" } else { "ns/record" };
        println!(
            "{:<44} {best:>12.0}   ({label}, best round)",
            format!("pass-through, direct instance call, batch {batch}")
        );
    }
    // The stage side of the same call, compiled natively: decoding the batch,
    // running the stage and encoding the outcomes, with no wasm in between.
    if part("pass") {
        let slot = std::cell::RefCell::new(None);
        runnel_sdk::__private::init::<passthrough::PassthroughStage>(&slot, "{}".into())
            .expect("init");
        let mut batch = Vec::new();
        runnel_wire::put_u32(&mut batch, 64);
        for r in &wasm_in[..64] {
            runnel_wire::put_record(
                &mut batch,
                &r.payload,
                r.key.as_deref(),
                r.topic.as_deref(),
                r.timestamp,
                std::iter::empty(),
            );
        }
        let mut best = f64::MAX;
        for _ in 0..=ROUNDS {
            let started = Instant::now();
            for _ in 0..RECORDS / 64 {
                black_box(runnel_sdk::__private::process::<
                    passthrough::PassthroughStage,
                >(&slot, black_box(&batch)));
            }
            best = best.min(started.elapsed().as_nanos() as f64 / RECORDS as f64);
        }
        println!(
            "{:<44} {best:>12.0}   (ns/record, best round)",
            "pass-through stage side, native, batch 64"
        );
    }
}
