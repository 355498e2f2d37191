//! A `cfg` per test server variable, so that a test whose server is not configured shows as
//! ignored (with the variable to set) instead of passing without doing anything:
//! `#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]`. The library
//! itself reads none of them.

/// Each variable and the `cfg` it sets when it is set and not empty.
const SERVERS: [(&str, &str); 7] = [
    ("STREAM_DEDUP_REDIS_URL", "server_redis"),
    ("STREAM_DEDUP_REDIS_SERVER", "server_redis_bin"),
    ("STREAM_DEDUP_NATS_URL", "server_nats"),
    ("STREAM_DEDUP_POSTGRES_URL", "server_postgres"),
    ("STREAM_DEDUP_MYSQL_URL", "server_mysql"),
    ("STREAM_DEDUP_MYSQL_SERVER", "server_mysql_bin"),
    ("STREAM_DEDUP_AMQP_URL", "server_amqp"),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for (var, cfg) in SERVERS {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
