//! MySQL / MariaDB for the tests: the shared server at `STREAM_DEDUP_MYSQL_URL`, servers of
//! the tests' own (`STREAM_DEDUP_MYSQL_SERVER`, the path of `mariadbd` or `mysqld`: started on
//! a free loopback port in a temporary directory, killed by their own pid), and a TCP proxy
//! that can hold back the server's replies.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::mysql::MySqlConnection;
use sqlx::{Connection as _, Executor as _};
use stream_dedup::sqlx;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::redis_server::{TempDir, free_port};

/// The URL of the shared server, or `None` (and a note) when the tests should skip.
pub fn url(test: &str) -> Option<String> {
    let url = std::env::var("STREAM_DEDUP_MYSQL_URL").ok();
    if url.is_none() {
        eprintln!("skipped: {test} (STREAM_DEDUP_MYSQL_URL is not set)");
    }
    url
}

/// The server binary (`mariadbd` / `mysqld`), or `None` (and a note) when the tests should
/// skip.
pub fn server_binary(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("STREAM_DEDUP_MYSQL_SERVER").map(PathBuf::from);
    if bin.is_none() {
        eprintln!("skipped: {test} (STREAM_DEDUP_MYSQL_SERVER is not set)");
    }
    bin
}

/// A plain connection to `url`, for looking at the table and doing what the store must
/// survive.
pub async fn admin(url: &str) -> MySqlConnection {
    MySqlConnection::connect(url).await.expect("connect")
}

/// Deletes every row of `namespace` from `table`.
pub async fn delete_namespace(url: &str, table: &str, namespace: &str) {
    let mut conn = admin(url).await;
    sqlx::query(&format!("DELETE FROM {table} WHERE namespace = ?"))
        .bind(namespace.as_bytes())
        .execute(&mut conn)
        .await
        .expect("delete the namespace");
}

/// A MariaDB (or MySQL) server owned by the test: a fresh data directory, loopback only, no
/// grant tables (any user may connect). Dropping it kills it (SIGKILL to its pid) and reaps
/// it; its directory goes with it.
#[derive(Debug)]
pub struct MySqlServer {
    bin: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl MySqlServer {
    /// Starts a server on a free port and waits until it accepts connections (and has a
    /// database `test`).
    pub async fn start(bin: &Path) -> MySqlServer {
        let mut server = MySqlServer {
            bin: bin.to_owned(),
            port: free_port(),
            dir: TempDir::new("mysql"),
            child: None,
        };
        std::fs::create_dir_all(server.dir.path().join("data")).expect("create the data dir");
        server.restart().await;
        let mut conn = MySqlConnection::connect(&server.root_url()).await.unwrap();
        conn.execute("CREATE DATABASE IF NOT EXISTS test")
            .await
            .unwrap();
        // A clean shutdown once, so that the new data files are complete on disk: a server
        // killed before its first checkpoint may not start again.
        let _ = conn.execute("SHUTDOWN").await;
        if let Some(mut child) = server.child.take() {
            let _ = child.wait();
        }
        server.restart().await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mysql://root@127.0.0.1:PORT/test`.
    pub fn url(&self) -> String {
        format!("{}test", self.root_url())
    }

    fn root_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL, this pid only) and waits for it to exit: a crash. Its data
    /// directory stays, for a restart.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again (after `kill`) on the same port and data, and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let dir = self.dir.path();
        let child = Command::new(&self.bin)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=8M",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
                && MySqlConnection::connect(&self.root_url()).await.is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the server did not start: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for MySqlServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy on a free loopback port in front of `127.0.0.1:target`: it forwards both ways
/// until [`hold_replies`](Proxy::hold_replies) makes it swallow what the server sends (a reply
/// lost on the way, or a link that stalls), while the client's bytes still reach the server.
#[derive(Debug, Clone)]
pub struct Proxy {
    port: u16,
    hold: Arc<AtomicBool>,
    /// Set `hold` once the client sends its next request.
    arm: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(AtomicBool::new(false));
        let arm = Arc::new(AtomicBool::new(false));
        let (held, armed) = (Arc::clone(&hold), Arc::clone(&arm));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (to_hold, armed) = (Arc::clone(&held), Arc::clone(&armed));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if armed.swap(false, Ordering::SeqCst) {
                            to_hold.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                let held = Arc::clone(&held);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if held.load(Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Proxy { port, hold, arm }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Swallows the server's bytes (`true`) or forwards them again (`false`).
    pub fn hold_replies(&self, hold: bool) {
        self.arm.store(false, Ordering::SeqCst);
        self.hold.store(hold, Ordering::SeqCst);
    }

    /// Swallows the server's bytes from the client's next request on: the server runs it,
    /// its reply is lost.
    pub fn hold_replies_from_next_request(&self) {
        self.arm.store(true, Ordering::SeqCst);
    }
}
