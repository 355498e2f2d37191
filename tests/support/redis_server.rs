//! Test-owned Redis servers: started on free loopback ports in a temporary directory, stopped
//! (by their own pid, never by name) when dropped.
//!
//! `STREAM_DEDUP_REDIS_URL` points the tests at a running Redis; `STREAM_DEDUP_REDIS_SERVER`
//! (the path of `redis-server`) lets them start their own, for failures and clusters.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The URL of the shared Redis, or `None` (and a note) when the tests should skip.
pub fn url(test: &str) -> Option<String> {
    let url = std::env::var("STREAM_DEDUP_REDIS_URL").ok();
    if url.is_none() {
        eprintln!("skipped: {test} (STREAM_DEDUP_REDIS_URL is not set)");
    }
    url
}

/// The `redis-server` binary, or `None` (and a note) when the tests should skip.
pub fn server_binary(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("STREAM_DEDUP_REDIS_SERVER").map(PathBuf::from);
    if bin.is_none() {
        eprintln!("skipped: {test} (STREAM_DEDUP_REDIS_SERVER is not set)");
    }
    bin
}

/// A loopback port that was free a moment ago, below 55535 with `port + 10000` free too (a
/// cluster node's bus port).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stream-dedup-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` process owned by the test: no persistence, loopback only. Dropping it
/// kills it (SIGKILL to its pid, which also ends a stopped process) and reaps it.
#[derive(Debug)]
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    extra: Vec<String>,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start(bin: &Path) -> RedisServer {
        RedisServer::start_with(bin, free_port(), &[])
    }

    /// Starts a server on `port` with `extra` arguments and waits until it answers `PING`.
    pub fn start_with(bin: &Path, port: u16, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            bin: bin.to_owned(),
            port,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir: TempDir::new(&format!("redis-{port}")),
            child: None,
        };
        server.restart();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, this pid only) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_for_ping(self.port, Duration::from_secs(10));
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server must not outlive the test either: SIGKILL ends a stopped process.
        self.kill();
    }
}

/// Waits until a server on `port` answers `PING` with `+PONG` (or `-NOAUTH`: a server started
/// with `--requirepass` is up too).
pub fn wait_for_ping(port: u16, limit: Duration) {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        let pong = (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf)?;
            Ok(&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
        })()
        .unwrap_or(false);
        if pong {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "redis-server on port {port} did not answer PING within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test-owned Redis Cluster of `n` primaries (no replicas) on free loopback ports, every
/// node killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The password every node requires (`--requirepass`), if any.
    password: Option<String>,
}

impl RedisCluster {
    /// Starts `n` cluster-enabled servers, joins them with `redis-cli --cluster create` (the
    /// `redis-cli` next to `redis-server`, else on `PATH`), and waits for `cluster_state:ok`
    /// on every node.
    pub fn start(bin: &Path, n: usize) -> RedisCluster {
        RedisCluster::start_with_password(bin, n, None)
    }

    /// As [`start`](Self::start), every node requiring `password` when one is given.
    pub fn start_with_password(bin: &Path, n: usize, password: Option<&str>) -> RedisCluster {
        let mut nodes: Vec<RedisServer> = Vec::new();
        for _ in 0..n {
            let port = loop {
                let port = free_port();
                if nodes.iter().all(|s| s.port != port) {
                    break port;
                }
            };
            let conf = format!("nodes-{port}.conf");
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "5000",
            ];
            if let Some(password) = password {
                args.extend(["--requirepass", password]);
            }
            nodes.push(RedisServer::start_with(bin, port, &args));
        }
        let cluster = RedisCluster {
            nodes,
            password: password.map(str::to_owned),
        };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let output = Command::new(cli_binary(bin))
            .args(cluster.auth())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_ok(Duration::from_secs(20));
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Runs `redis-cli -p <port of node> args..` and returns its output.
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        let bin = &self.nodes[node].bin;
        let output = Command::new(cli_binary(bin))
            .args(self.auth())
            .args(["-p", &self.nodes[node].port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `redis-cli`'s arguments for the password, if any.
    fn auth(&self) -> Vec<String> {
        match &self.password {
            Some(password) => vec!["--no-auth-warning".into(), "-a".into(), password.clone()],
            None => Vec::new(),
        }
    }

    fn wait_until_ok(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let ok = (0..self.nodes.len()).all(|i| {
                self.cli(i, &["cluster", "info"])
                    .contains("cluster_state:ok")
            });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the cluster was not ok within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A test certificate authority and a server certificate it signed (for `localhost` and
/// `127.0.0.1`), made with the `openssl` command in a directory of their own.
#[derive(Debug)]
pub struct TlsFiles {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes the files, or `None` (and a note) without an `openssl` command.
    pub fn make(test: &str) -> Option<TlsFiles> {
        let dir = TempDir::new("tls");
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !openssl(&["version"]) {
            eprintln!("skipped: {test} (no openssl command to make certificates)");
            return None;
        }
        std::fs::write(
            path("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write server.ext");
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let ca =
            format!("req -x509 {new_key} -keyout ca.key -out ca.crt -days 2 -subj /CN=test-CA");
        let csr = format!("req {new_key} -keyout server.key -out server.csr -subj /CN=localhost");
        for args in [ca, csr] {
            let args: Vec<&str> = args.split(' ').collect();
            assert!(openssl(&args), "openssl {args:?} failed");
        }
        assert!(openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]));
        Some(TlsFiles {
            ca: path("ca.crt"),
            cert: path("server.crt"),
            key: path("server.key"),
            dir,
        })
    }
}

impl RedisServer {
    /// Starts a server that also serves TLS (with `tls`'s certificate) on a second free port;
    /// returns it and that port.
    pub fn start_tls(bin: &Path, tls: &TlsFiles) -> (RedisServer, u16) {
        let tls_port = free_port();
        let port = loop {
            let port = free_port();
            if port != tls_port {
                break port;
            }
        };
        let arg = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let (ca, cert, key) = (arg(&tls.ca), arg(&tls.cert), arg(&tls.key));
        let server = RedisServer::start_with(
            bin,
            port,
            &[
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
        );
        (server, tls_port)
    }
}

/// `redis-cli` next to `redis-server`, else from `PATH`.
pub fn cli_binary(server: &Path) -> PathBuf {
    let sibling = server.with_file_name("redis-cli");
    if sibling.exists() {
        sibling
    } else {
        PathBuf::from("redis-cli")
    }
}

/// Deletes every key of the store namespace `ns` on the Redis at `url` (`SCAN` + `UNLINK`), so
/// that a test that wrote many keys to a shared server leaves it as it found it (its keys
/// would otherwise stay until their ttl, slowing whatever runs next).
#[cfg(feature = "redis")]
pub async fn delete_namespace(url: &str, ns: &str) {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to clean up");
    let pattern = format!("{ns}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(keys)
                .exec_async(&mut conn)
                .await
                .expect("UNLINK");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}
