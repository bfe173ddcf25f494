//! The glue between the WIT world and [`Stage`]; used by `export_stage!`
//! and not meant to be called by hand.

use std::cell::RefCell;

use crate::{parse_config, Record, Stage};

#[cfg(target_family = "wasm")]
pub mod bindings {
    wit_bindgen::generate!({
        world: "stage",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "runnel_sdk::__private::bindings",
    });

    use crate::Record as SdkRecord;
    use runnel::stage::types::Record as WitRecord;

    // Same fields on both sides, so these are moves, not copies.
    impl From<WitRecord> for SdkRecord {
        fn from(r: WitRecord) -> Self {
            SdkRecord {
                payload: r.payload,
                key: r.key,
                topic: r.topic,
                timestamp: r.timestamp,
                headers: r.headers,
            }
        }
    }

    impl From<SdkRecord> for WitRecord {
        fn from(r: SdkRecord) -> Self {
            WitRecord {
                payload: r.payload,
                key: r.key,
                topic: r.topic,
                timestamp: r.timestamp,
                headers: r.headers,
            }
        }
    }
}

/// Marks panic messages so the host can name them in the dead letter: with
/// `panic = "abort"` the trap itself says only "unreachable".
pub const PANIC_PREFIX: &str = "panicked at ";

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown place".to_string());
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        crate::log::log(
            crate::log::Level::Error,
            &format!("{PANIC_PREFIX}{location}: {payload}"),
        );
    }));
}

const NOT_STARTED: &str = "stage called before init";

pub fn init<S: Stage>(slot: &RefCell<Option<S>>, config: String) -> Result<(), String> {
    install_panic_hook();
    let config = parse_config::<S::Config>(&config).map_err(|e| e.to_string())?;
    let stage = S::init(config).map_err(|e| e.to_string())?;
    *slot.borrow_mut() = Some(stage);
    Ok(())
}

/// One outcome per input: the outputs, or the reason for the dead letter.
pub fn process<S: Stage>(
    slot: &RefCell<Option<S>>,
    batch: Vec<Record>,
) -> Vec<Result<Vec<Record>, String>> {
    let mut slot = slot.borrow_mut();
    let Some(stage) = slot.as_mut() else {
        return batch.iter().map(|_| Err(NOT_STARTED.to_string())).collect();
    };
    stage
        .process_batch(batch)
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

pub fn flush<S: Stage>(
    slot: &RefCell<Option<S>>,
    now_ms: i64,
    end_of_input: bool,
) -> Result<Vec<Record>, String> {
    let mut slot = slot.borrow_mut();
    let stage = slot.as_mut().ok_or_else(|| NOT_STARTED.to_string())?;
    stage.flush(now_ms, end_of_input).map_err(|e| e.to_string())
}
