//! A real PostgreSQL server for the tests, started from the machine's PostgreSQL binaries in a
//! temporary directory on a free port (as the `postgres` user when the tests run as root, since
//! PostgreSQL refuses to run as root), and stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PgServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    owner: Option<(u32, u32)>,
    /// Serving TLS with a certificate signed by the test CA (`ca.pem` in [`PgServer::path`]).
    tls: bool,
}

/// Postgres exited at start because its port was taken.
struct PortTaken;

/// The newest PostgreSQL's binaries on this machine; fails loudly when there are none.
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql; .ci/run does)",
    )
}

use super::free_port;

impl PgServer {
    /// Initialises a cluster and starts it; returns once it accepts connections.
    pub fn start() -> PgServer {
        PgServer::start_with(false)
    }

    /// [`PgServer::start`] with TLS on (`ssl=on`), its certificate signed by a CA of its own
    /// whose certificate is `ca_path()`, for `127.0.0.1` and `localhost`.
    pub fn start_tls() -> PgServer {
        PgServer::start_with(true)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(tls: bool) -> PgServer {
        let dir = tempfile::tempdir().expect("a directory for the cluster");
        let owner = if nix::unistd::Uid::effective().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect(
                    "the postgres user (created by the postgresql package) to run the server as",
                );
            let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the cluster");
            Some((uid, gid))
        } else {
            None
        };
        let mut server = PgServer {
            child: None,
            dir,
            port: free_port(),
            owner,
            tls,
        };
        let init = server
            .as_owner(&mut Command::new(bin_dir().join("initdb")))
            .args([
                "-U",
                "appliance",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(server.data())
            .output()
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        if tls {
            server.make_certificates();
        }
        // The port was free when chosen, but another test may have taken it since (initdb
        // takes seconds): the first start tries again on another port. Restarts keep theirs,
        // because tests hold the server's URL.
        for _ in 0..5 {
            if server.start_on_port().is_ok() {
                return server;
            }
            server.port = free_port();
        }
        panic!("postgres found its port taken five times: {}", server.log());
    }

    /// A CA and a server certificate signed by it, with openssl (installed by .ci/run).
    fn make_certificates(&self) {
        let san = self.dir.path().join("san.ext");
        std::fs::write(&san, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("write san.ext");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=appliance test CA",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(self.dir.path())
                .output()
                .expect("openssl (apt-get install openssl; .ci/run does)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for file in ["server.crt", "server.key"] {
            let path = self.dir.path().join(file);
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .expect("chown the certificate");
            }
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod the certificate");
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_owner<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path())
    }

    /// Starts the server again on its port and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(
            self.start_on_port().is_ok(),
            "postgres found its port {} taken: {}",
            self.port,
            self.log()
        );
    }

    fn start_on_port(&mut self) -> Result<(), PortTaken> {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("server log");
        if let Some((uid, gid)) = self.owner {
            let _ =
                std::os::unix::fs::chown(self.dir.path().join("server.log"), Some(uid), Some(gid));
        }
        let child = self
            .as_owner(&mut Command::new(bin_dir().join("postgres")))
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=50"])
            .args(if self.tls {
                vec![
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!(
                        "ssl_cert_file={}",
                        self.dir.path().join("server.crt").display()
                    ),
                    "-c".to_owned(),
                    format!(
                        "ssl_key_file={}",
                        self.dir.path().join("server.key").display()
                    ),
                ]
            } else {
                Vec::new()
            })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited && self.log().contains("Address already in use") {
                return Err(PortTaken);
            }
            assert!(!exited, "postgres exited at start: {}", self.log());
            let ready = Command::new(bin_dir().join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "appliance",
                    "-d",
                    "postgres",
                ])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server at once (SIGQUIT: immediate shutdown), as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://appliance@127.0.0.1:{}/{name}", self.port)
    }

    /// The URL of database `name` through the server's Unix-domain socket (its directory as the
    /// host, percent-encoded, as libpq and tokio-postgres read it).
    pub fn socket_url(&self, name: &str) -> String {
        let dir = self.dir.path().display().to_string().replace('/', "%2F");
        format!("postgres://appliance@{dir}:{}/{name}", self.port)
    }

    /// Creates database `name`; returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the database");
        self.url(name)
    }

    /// A client connected to database `name`.
    pub async fn client(&self, name: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(name), tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        tokio::spawn(connection);
        client
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
