//! mde-actiond: tracks Microsoft Defender for Endpoint machine actions to their terminal
//! status, durably, on a SQLite queue.
//!
//! Data flows one way: intake (`enqueue`) -> [`store`] -> [`poller`] (with [`mde`], [`auth`],
//! [`budget`] and [`schedule`]) -> [`store`]. [`sim`] is a simulated tenant for the demo, tests
//! and benchmarks.
#![forbid(unsafe_code)]

pub mod auth;
pub mod budget;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod domain;
pub mod housekeeping;
pub mod http;
pub mod intake;
pub mod lock;
pub mod logging;
pub mod mde;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod panics;
pub mod poller;
pub mod report;
pub mod runtime;
pub mod schedule;
pub mod secret;
pub mod sim;
pub mod store;
pub mod systemd;
pub mod textfile;
