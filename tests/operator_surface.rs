//! The operator's side of the attack surface: the management API lives on its own address
//! (loopback by default), its token never reaches the service log, wrong tokens are throttled,
//! the token can be rotated under a running server, and everything the appliance writes is
//! private to its user whatever the umask.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{cli, create_team, Appliance, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_on_the_admin_address_only_and_wrong_tokens_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let token = cli(dir.path(), &["api-token"]).trim().to_owned();
    assert!(token.starts_with("apa_"));

    // Not on the public capture port.
    let public = client
        .get(app.url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let admin = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    assert_eq!(
        app.admin.ip().to_string(),
        "127.0.0.1",
        "loopback by default"
    );
    // Health answers on both.
    for url in [app.url("/_ready"), app.admin_url("/_ready")] {
        assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    }

    // Wrong tokens are answered 401 up to the allowance (ten a minute); the next one locks the
    // address out for a while, even with the right token.
    for _ in 0..11 {
        let r = client
            .get(app.admin_url("/api/plugins"))
            .bearer_auth("apa_wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let locked = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth("apa_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), 429);
    let wait: u64 = locked.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    let still = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 429);
    tokio::time::sleep(Duration::from_secs(wait + 1)).await;
    let back = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), 200);

    // Rotation applies to the running server at once.
    let rotated = cli(dir.path(), &["api-token", "--rotate"])
        .trim()
        .to_owned();
    assert_ne!(rotated, token);
    let old = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    let new = client
        .get(app.admin_url("/api/plugins"))
        .bearer_auth(&rotated)
        .send()
        .await
        .unwrap();
    assert_eq!(new.status(), 200);

    // The token never appeared in what the server printed.
    let printed = app.stderr_lines().join("\n");
    assert!(
        !printed.contains(&token) && !printed.contains(&rotated),
        "{printed}"
    );
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_whatever_the_umask() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let app = Appliance::start_with(&dir, &[], |cmd| {
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::stat::umask(nix::sys::stat::Mode::empty());
                Ok(())
            });
        }
    });
    // Something in every store: an event, a plugin.
    let (status, _) = common::probe_event(&app, "e").await;
    assert!(status == 200 || status == 401);
    common::install_plugin(&dir, "examples/property-filter", "property_filter.wasm");
    assert_eq!(mode(&dir), 0o700, "the data directory");
    let mut checked = 0;
    for entry in walk(&dir) {
        let m = mode(&entry);
        if entry.is_dir() {
            assert_eq!(m, 0o700, "{}", entry.display());
        } else {
            assert_eq!(m & 0o077, 0, "{} is {m:o}", entry.display());
        }
        checked += 1;
    }
    assert!(checked >= 4, "state, events, plugins, lock");
    drop(app);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
