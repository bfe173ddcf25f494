//! Write runnel stages in Rust.
//!
//! A stage takes records (payload bytes plus key, topic, timestamp and
//! headers) and gives back zero or more records each, or an error that sends
//! the record to the dead letter with its reason. Write a plain function with
//! one of the attributes, or implement [`Stage`] for stateful work:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, Serialize)]
//! pub struct Reading { device: String, celsius: f64 }
//!
//! #[derive(Deserialize)]
//! pub struct Config { max: f64 }
//!
//! /// Readings above the configured maximum go to the dead letter.
//! #[runnel_sdk::map]
//! pub fn check(reading: Reading, config: &Config) -> runnel_sdk::Result<Reading> {
//!     if reading.celsius > config.max {
//!         runnel_sdk::bail!("{} °C above maximum {}", reading.celsius, config.max);
//!     }
//!     Ok(reading)
//! }
//!
//! // The same function is a plain function in native tests:
//! let config = Config { max: 100.0 };
//! assert!(check(Reading { device: "d1".into(), celsius: 120.0 }, &config).is_err());
//! ```
//!
//! The three function forms, each with an optional second parameter `&Config`
//! (any `Deserialize` type, read once from the stage's `[stage.config]` table):
//!
//! - `#[map]`: `fn(In) -> Out` or `-> Result<Out, E>`
//! - `#[filter]`: `fn(&In) -> bool` or `-> Result<bool, E>`
//! - `#[flat_map]`: `fn(In) -> Vec<Out>` or `-> Result<Vec<Out>, E>`
//!
//! `In` and `Out` are [`Record`] for the whole record, or any serde type for a
//! JSON payload; an output keeps the input's key, topic, timestamp and headers.
//! `E` is [`Error`] or any `std::error::Error`. A crate holds one stage.
//!
//! Each attribute also defines a [`Stage`] type named after the function
//! (`fn to_celsius` gives `ToCelsiusStage`) for tests that drive the stage
//! the way the host does.
//!
//! Built for wasm, the SDK installs its own global allocator (size classes
//! with free lists), since std's costs about as much per record as a simple
//! stage's work there. A crate with its own `#[global_allocator]` depends on
//! the SDK with `default-features = false` to turn it off.

#[doc(hidden)]
pub mod alloc;
mod error;
pub mod log;
mod record;
mod stage;

#[doc(hidden)]
#[path = "guest.rs"]
pub mod __private;

pub use error::{Error, Result};

// A stage is one thread in wasm, where std's general-purpose allocator is a
// large share of each record's cost; a crate that brings its own global
// allocator turns this off with `default-features = false`.
#[cfg(all(
    target_family = "wasm",
    not(target_feature = "atomics"),
    feature = "allocator"
))]
#[global_allocator]
static ALLOCATOR: alloc::SizeClasses<std::alloc::System> =
    alloc::SizeClasses::new(std::alloc::System);

pub use record::Record;
pub use runnel_sdk_macro::{filter, flat_map, map};
pub use stage::{parse_config, NoConfig, Stage};

/// Makes a [`Stage`] type the stage this crate exports when built for wasm.
///
/// Built natively (for `cargo test`) it expands to nothing.
#[macro_export]
macro_rules! export_stage {
    ($stage:ty) => {
        #[cfg(target_family = "wasm")]
        const _: () = {
            use $crate::__private::bindings as __bindings;

            struct __RunnelExport;

            ::std::thread_local! {
                static __RUNNEL_STAGE: ::core::cell::RefCell<::core::option::Option<$stage>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            impl __bindings::Guest for __RunnelExport {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    __RUNNEL_STAGE.with(|slot| $crate::__private::init::<$stage>(slot, config))
                }

                fn process(batch: ::std::vec::Vec<u8>) -> ::std::vec::Vec<u8> {
                    __RUNNEL_STAGE.with(|slot| $crate::__private::process::<$stage>(slot, &batch))
                }

                fn flush(
                    now: i64,
                    end_of_input: bool,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    __RUNNEL_STAGE.with(|slot| $crate::__private::flush::<$stage>(slot, now, end_of_input))
                }
            }

            $crate::__private::bindings::export_world!(__RunnelExport with_types_in $crate::__private::bindings);
        };
    };
}
