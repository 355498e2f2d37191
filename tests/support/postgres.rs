//! PostgreSQL for the tests: the shared server (`STREAM_DEDUP_POSTGRES_URL`, e.g.
//! `postgres://postgres@127.0.0.1:5432/test`), namespaces that delete their rows when the test
//! is done, and test-owned servers (`initdb` + `pg_ctl` from `pg_config --bindir`, in a
//! temporary directory, on a free loopback port), stopped by their own pid, never the shared one.
#![cfg(feature = "postgres")]
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stream_dedup::sqlx::{self, Connection, PgConnection};
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, PostgresStore, Store,
    StoreFuture, Token,
};

use super::redis_server::{TempDir, free_port};

/// The default table of the store.
pub const TABLE: &str = "stream_dedup_keys";

/// The URL of the shared server, or `None` (and a note) when the tests should skip.
pub fn url(test: &str) -> Option<String> {
    let url = std::env::var("STREAM_DEDUP_POSTGRES_URL").ok();
    if url.is_none() {
        eprintln!("skipped: {test} (STREAM_DEDUP_POSTGRES_URL is not set)");
    }
    url
}

/// A namespace unique to this test and run.
pub fn namespace(test: &str) -> String {
    format!("test-{test}-{}-{}", std::process::id(), Token::new())
}

/// A connection of the test's own (not the store's).
pub async fn connection(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"))
}

/// Deletes the rows of `namespace` from `table`.
pub async fn delete_namespace(url: &str, table: &str, namespace: &str) {
    let mut conn = connection(url).await;
    sqlx::query(&format!("DELETE FROM {table} WHERE namespace = $1"))
        .bind(namespace)
        .execute(&mut conn)
        .await
        .expect("delete the test's rows");
}

/// The rows of `namespace`, expired ones included.
pub async fn rows(url: &str, table: &str, namespace: &str) -> i64 {
    let mut conn = connection(url).await;
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE namespace = $1"
    ))
    .bind(namespace)
    .fetch_one(&mut conn)
    .await
    .expect("count rows")
}

/// Deletes `namespace`'s rows from the default table when dropped (its last clone): from a
/// thread of its own, as a drop cannot wait for a future.
#[derive(Debug)]
pub struct Cleanup {
    url: String,
    namespace: String,
}

impl Cleanup {
    pub fn new(url: &str, namespace: &str) -> Arc<Cleanup> {
        Arc::new(Cleanup {
            url: url.to_owned(),
            namespace: namespace.to_owned(),
        })
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, namespace) = (self.url.clone(), self.namespace.clone());
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup")
                .block_on(delete_namespace(&url, TABLE, &namespace));
        })
        .join();
        if done.is_err() && !std::thread::panicking() {
            panic!("the cleanup of {} failed", self.namespace);
        }
    }
}

/// A store whose namespace is deleted when its last clone is dropped.
#[derive(Clone, Debug)]
pub struct TestStore {
    pub store: PostgresStore,
    _cleanup: Arc<Cleanup>,
}

impl TestStore {
    pub fn new(store: PostgresStore, url: &str) -> TestStore {
        let cleanup = Cleanup::new(url, store.namespace());
        TestStore {
            store,
            _cleanup: cleanup,
        }
    }
}

impl Store for TestStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.store.insert(batch)
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.store.remove(keys)
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.store.take_back(keys)
    }

    fn max_key_len(&self) -> usize {
        Store::max_key_len(&self.store)
    }
}

impl ClaimStore for TestStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.store.claim(batch)
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        self.store.commit(keys, ttl)
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.store.release(keys)
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        self.store.renew(keys, lease)
    }
}

/// The directory of PostgreSQL's server programs (`pg_config --bindir`), or `None` (and a
/// note) when the tests should skip.
pub fn bindir(test: &str) -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            dir.join("initdb").exists().then_some(dir)
        }
        _ => {
            eprintln!("skipped: {test} (no pg_config on PATH to find initdb and pg_ctl)");
            None
        }
    }
}

/// A PostgreSQL server owned by the test: a fresh cluster in a temporary directory, on a free
/// loopback port, trust authentication, `fsync` off. Stopped (`pg_ctl stop`, which signals the
/// pid in its own data directory) when dropped.
///
/// PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
}

impl PgServer {
    /// Creates the cluster and starts the server; waits until it accepts connections.
    pub fn start(bin: PathBuf) -> PgServer {
        let dir = TempDir::new("postgres");
        let server = PgServer {
            bin,
            dir,
            port: free_port(),
        };
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(server.dir.path())
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown the cluster's directory to postgres"
            );
        }
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's pid, from its data directory.
    pub fn pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        pid.lines().next()?.trim().parse().ok()
    }

    /// Starts the (stopped) server again, on the same port, and waits for it.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
            self.port
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test's PostgreSQL did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (`fast`: sessions are ended, the data is kept) and waits for it.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&path);
            cmd
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.pid().is_some() {
            let path = self.bin.join("pg_ctl");
            let data = self.data();
            let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
            let _ = if is_root() {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(&path)
                    .args(args)
                    .output()
            } else {
                Command::new(&path).args(args).output()
            };
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
