//! ClickHouse for the tests. Two engines run here (see the README's "Which tests prove what"):
//!
//! - [`Chdb`]: the current ClickHouse engine (chdb-core 26.x) behind `tests/fixtures/chdb_front.py`,
//!   a small HTTP front of the test's own; the production schema runs on it unchanged.
//! - [`ClickHouse18`]: Debian's real `clickhouse-server` (18.16), a real server speaking real
//!   HTTP, too old for the production schema.
//!
//! Both keep their data in a temporary directory, run on a free port and stop when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::free_port;

/// The Python that has chdb-core (`.ci/run` makes this virtual environment).
fn chdb_python() -> PathBuf {
    let python = std::env::var_os("CHDB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/chdb-venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: the ClickHouse tests need chdb-core (.ci/run installs it: \
         python3 -m venv /var/tmp/chdb-venv && /var/tmp/chdb-venv/bin/pip install -r tests/fixtures/chdb-requirements.txt)",
        python.display()
    );
    python
}

pub struct Chdb {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Chdb {
    pub fn start() -> Chdb {
        let dir = tempfile::tempdir().expect("a directory for the engine's data");
        let mut chdb = Chdb {
            child: None,
            dir,
            port: free_port(),
        };
        chdb.resume();
        chdb
    }

    /// Starts the front again on the same port and data.
    pub fn resume(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chdb_front.py");
        let mut child = Command::new(chdb_python())
            .arg(script)
            .arg(self.port.to_string())
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the chdb front");
        let stdout = child.stdout.take().expect("its stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the front's first line");
        assert!(line.starts_with("ready"), "the chdb front said {line:?}");
        self.child = Some(child);
    }

    /// Kills the front (an outage of the server).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The appliance's settings for this server and `database`.
    pub fn env(&self, database: &str) -> Vec<(String, String)> {
        vec![
            ("CLICKHOUSE_HOST".into(), "127.0.0.1".into()),
            ("CLICKHOUSE_PORT".into(), self.port.to_string()),
            ("CLICKHOUSE_DATABASE".into(), database.into()),
            ("CLICKHOUSE_FLUSH_INTERVAL_MS".into(), "200".into()),
        ]
    }

    /// The rows `sql` selects, as JSON objects (`FORMAT JSONEachRow` is added).
    pub async fn rows(&self, database: &str, sql: &str) -> Vec<Value> {
        query(self.port, database, &format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON row"))
            .collect()
    }

    pub async fn execute(&self, database: &str, sql: &str) {
        query(self.port, database, sql).await;
    }
}

impl Drop for Chdb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `sql` over HTTP; panics with the server's words when it fails.
pub async fn query(port: u16, database: &str, sql: &str) -> String {
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/?database={database}"))
        .body(sql.to_owned())
        .send()
        .await
        .expect("reach ClickHouse");
    let ok = answer.status().is_success();
    let text = answer.text().await.expect("its answer");
    assert!(ok, "{sql}: {text}");
    text
}

/// Debian's `clickhouse-server` 18.16, a real server.
pub struct ClickHouse18 {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl ClickHouse18 {
    pub fn start() -> ClickHouse18 {
        let binary = "/usr/sbin/clickhouse-server";
        assert!(
            std::path::Path::new(binary).exists(),
            "{binary} not found (apt-get install clickhouse-server; .ci/run does)"
        );
        let dir = tempfile::tempdir().expect("a directory for the server");
        let d = dir.path().display().to_string();
        for sub in ["data", "tmp", "user_files", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("its directories");
        }
        let port = free_port();
        let tcp = free_port();
        std::fs::write(
            dir.path().join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/err.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{port}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <mark_cache_size>268435456</mark_cache_size>
    <timezone>UTC</timezone>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
</yandex>
"#
            ),
        )
        .expect("write config.xml");
        std::fs::write(
            dir.path().join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
    <profiles><default/></profiles>
    <users><default><password></password>
        <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default/></quotas>
</yandex>
"#,
        )
        .expect("write users.xml");
        let child = Command::new(binary)
            .arg(format!("--config-file={d}/config.xml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clickhouse-server");
        super::wait_listening(port, "clickhouse-server", Duration::from_secs(30));
        ClickHouse18 {
            child,
            _dir: dir,
            port,
        }
    }
}

impl Drop for ClickHouse18 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
