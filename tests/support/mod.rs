//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod faulty;
pub mod jetstream;
#[cfg(feature = "mysql")]
pub mod mysql_server;
pub mod postgres;
pub mod redis_server;
