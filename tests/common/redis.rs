//! A real `redis-server` for the tests, on a free port with its data in a temporary
//! directory, stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let binary = "/usr/bin/redis-server";
        assert!(
            std::path::Path::new(binary).exists(),
            "{binary} not found (apt-get install redis-server; .ci/run does)"
        );
        let dir = tempfile::tempdir().expect("a directory for redis");
        // The port was free when chosen, but a parallel test may take it before redis binds it:
        // a server that exits at start because of that tries again on another port (as the
        // Postgres test server does); any other exit fails with redis's own words.
        let log = dir.path().join("redis.log");
        for _ in 0..5 {
            let port = super::free_port();
            let mut child = Command::new(binary)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let within = Duration::from_secs(10);
            if super::wait_listening_while_running(Some(&mut child), port, "redis-server", within) {
                return RedisServer {
                    child,
                    _dir: dir,
                    port,
                };
            }
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                said.contains("Address already in use"),
                "redis-server exited at start: {said}"
            );
        }
        panic!("redis-server found its port taken five times");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
