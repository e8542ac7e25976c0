//! Shared test set-up: databases, the emulator, the broker. Each area owns
//! one file here.
#![allow(dead_code)]

/// Runs each named scenario `async fn name(arg)` twice, as tokio tests in
/// modules `postgres` and `sqlite`, with `arg` = the given expression
/// (evaluated inside the test, so it may `.await`; paths resolve from the
/// generated module, hence `super::…`). Use with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    (postgres = $pg:expr, sqlite = $sqlite:expr; $($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($pg).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($sqlite).await
                }
            )*
        }
    };
}

pub mod admin;
pub mod audit;
pub mod broker;
pub mod db;
pub mod emulator;
pub mod git;
pub mod k8s;
pub mod leases;
pub mod logs;
pub mod mtls;
pub mod pg_cluster;
pub mod policy;
pub mod process;
pub mod upstream;
pub mod wait;
