//! The real binaries as child processes: for tests that kill, restart or run several replicas.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The path of a workspace binary (`directory-svc`, `billing-svc`), built once per test run
/// with the profile the tests were built with.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--bins",
            "-p",
            "directory-svc",
            "-p",
            "billing-svc",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // The variables cargo sets for this test crate would make build scripts (ring's)
        // see a changed environment and rebuild, and then rebuild again for the next test.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            let per_crate = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix));
            if per_crate || key == "OUT_DIR" {
                build.env_remove(&key);
            }
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the service binaries failed");
        profile_dir
    });
    dir.join(name)
}

/// A service running as a child process; killed when dropped.
pub struct Proc {
    pub addr: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// While set, nothing reads the service's stderr (a stalled log collector).
    stall_logs: Arc<AtomicBool>,
}

impl Proc {
    /// Starts `binary` with `args` plus `--listen 127.0.0.1:0 --log-format json`, and waits
    /// until it logs the address it serves on.
    pub fn start(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary(binary_name));
        command
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn service");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = logs.clone();
        let stall_logs = Arc::new(AtomicBool::new(false));
        let stalled = stall_logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                while stalled.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if let Ok(mut kept) = kept.lock() {
                    kept.push(line.clone());
                }
                if let Some(addr) = serving_addr(&line).filter(|_| !sent) {
                    let _ = tx.send(addr);
                    sent = true;
                }
                if std::env::var_os("TEST_SHOW_SERVICE_LOGS").is_some() {
                    eprintln!("{line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{binary_name} did not start serving"));
        Self {
            addr,
            child,
            logs,
            stall_logs,
        }
    }

    /// Stops (`true`) or resumes reading the service's stderr: stopped, the pipe fills up and
    /// the service's writes to it block, as with a stalled log collector.
    pub fn stall_logs(&self, stalled: bool) {
        self.stall_logs.store(stalled, Ordering::Release);
    }

    /// The log lines (JSON) the service has written so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The service's "rpc finished" log lines (JSON) once `enough` holds for them, or those
    /// written after 10 s: lines reach the log in batches.
    pub async fn finished_calls(
        &self,
        enough: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let started = std::time::Instant::now();
        loop {
            let lines: Vec<serde_json::Value> = self
                .logs()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["fields"]["message"] == "rpc finished")
                .collect();
            if enough(&lines) || started.elapsed() > Duration::from_secs(10) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// directory-svc on `database_url`, with argon2 at its cheapest.
    pub fn directory(database_url: &str) -> Self {
        Self::start(
            "directory-svc",
            &[
                "--database-url",
                database_url,
                "--argon2-memory-kib",
                "64",
                "--argon2-iterations",
                "1",
            ],
            &[],
        )
    }

    /// billing-svc on `database_url`, talking to `directory_urls` (comma-separated).
    pub fn billing(database_url: &str, directory_urls: &str) -> Self {
        Self::start(
            "billing-svc",
            &[
                "--database-url",
                database_url,
                "--directory-url",
                directory_urls,
            ],
            &[],
        )
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident memory of the process now, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGKILL: no drain, no cleanup.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for the service")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A test that panicked with the logs stalled: let the reader thread run out.
        self.stall_logs(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr` of the JSON log line `serving`.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "serving" {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}
