//! Shared test set-up: databases, the emulator, the broker. Each area owns
//! one file here.
#![allow(dead_code)]

pub mod admin;
pub mod audit;
pub mod broker;
pub mod db;
pub mod emulator;
pub mod k8s;
pub mod leases;
pub mod mtls;
pub mod pg_cluster;
pub mod policy;
pub mod process;
pub mod upstream;
