//! A `cfg` per server variable of the tests, so that a test whose servers are not configured
//! shows as ignored (with the variables to set) instead of passing without doing anything.

/// Each variable and the `cfg` it sets when it is set and not empty.
const SERVERS: [(&str, &str); 2] = [
    ("STREAM_DEDUP_ROCKETMQ_NAMESRV", "server_rocketmq"),
    ("STREAM_DEDUP_REDIS_URL", "server_redis"),
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
