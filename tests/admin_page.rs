//! The admin page in a real browser (Debian's chromium, driven through chromedriver): first-run
//! set-up, a failed and a good log-in, a team and its posthog-js snippet, a plugin uploaded and
//! configured through the form its schema generates (a secret kept when left empty), a dead
//! letter retried, an export started and its progress seen, the events tail and the settings'
//! sources. Outside the browser: a forged form (no CSRF token) and a log-in flood are refused,
//! and `/api/` takes the page's session. A failing step leaves a screenshot in
//! `$CARGO_TARGET_DIR/browser-screenshots/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    cli, create_team, enable_plugin, install_plugin, plugin_folder, send_past_events, webhook, Api,
    Appliance, TOKEN,
};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

type Step = Result<(), String>;

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is needed: apt-get install chromium chromium-driver (.ci/run does)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session through chromedriver")
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    PathBuf::from(target).join("browser-screenshots")
}

/// Text of the whole page.
async fn page_text(c: &Client) -> Result<String, String> {
    c.find(Locator::Css("body"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

/// Waits until the page's text contains `needle`, or fails with what the page shows.
async fn wait_text(c: &Client, needle: &str, within: Duration) -> Step {
    let deadline = Instant::now() + within;
    loop {
        // A page still loading after a click has no body yet: that is "not yet", not a failure.
        let text = page_text(c).await.unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the page never showed {needle:?}; it shows:\n{text}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fill(c: &Client, css: &str, text: &str) -> Step {
    let field = c
        .find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?;
    field.clear().await.map_err(|e| e.to_string())?;
    field.send_keys(text).await.map_err(|e| e.to_string())
}

async fn click(c: &Client, css: &str) -> Step {
    c.find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?
        .click()
        .await
        .map_err(|e| format!("clicking {css}: {e}"))
}

/// A `.tar.gz` of a plugin folder, as an author would upload it.
fn plugin_archive(crate_dir: &str, wasm: &str, into: &Path) -> PathBuf {
    let folder = plugin_folder(crate_dir, wasm);
    let archive = into.join("plugin.tar.gz");
    let status = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(folder.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    archive
}

const PASSWORD: &str = "correct horse battery";

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_runs_the_appliance_from_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lab = create_team(&data, "lab", TOKEN).to_string();
    install_plugin(&data, "tests/job-lab", "job_lab.wasm");
    enable_plugin(&data, &lab, "Job Lab", &[]);
    let app = Appliance::start(
        &data,
        &[
            ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
            ("JOB_RETRY_BASE_MS", "100"),
            ("SINK_LINGER_MS", "0"),
        ],
    );
    let archive = plugin_archive(
        "examples/webhook-exporter",
        "webhook_exporter.wasm",
        dir.path(),
    );
    let (hook, seen) = webhook(|_| (Duration::from_secs(3), 200)).await;

    // 1,500 past events for the export: three pages of 500.
    send_past_events(&app, 1500).await;

    // A dead letter to retry.
    let api = Api::new(&app);
    let doomed = api
        .enqueue(
            &lab,
            "Job Lab",
            json!({"name": "doomed", "max_attempts": 1}),
        )
        .await;
    api.wait_job_state(&doomed, "dead").await;

    let driver = start_driver();
    let c = browser(&driver).await;
    let setup = app
        .setup_link()
        .expect("a first-run set-up link is printed");
    let result = scenario(&c, &app, &setup, &archive, hook, &doomed).await;
    if let Err(e) = result {
        let _ = std::fs::create_dir_all(screenshot_dir());
        let shot = screenshot_dir().join("an_operator_runs_the_appliance_from_the_browser.png");
        if let Ok(png) = c.screenshot().await {
            let _ = std::fs::write(&shot, png);
        }
        let _ = c.close().await;
        panic!("{e}\n(screenshot: {})", shot.display());
    }
    let _ = c.close().await;
    // The export's pages reached the webhook.
    let exported: usize = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| body["batch"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(exported, 1500);
}

async fn scenario(
    c: &Client,
    app: &Appliance,
    setup: &str,
    archive: &Path,
    hook: std::net::SocketAddr,
    doomed: &str,
) -> Step {
    let admin = |path: &str| app.admin_url(path);
    let err = |e: fantoccini::error::CmdError| e.to_string();

    // Before set-up, the page asks for the link rather than a password.
    c.goto(&admin("/")).await.map_err(err)?;
    wait_text(c, "No admin password is set yet", Duration::from_secs(5)).await?;

    // First-run set-up: the link's one visit sets the password and signs in.
    c.goto(setup).await.map_err(err)?;
    fill(c, "#password", PASSWORD).await?;
    fill(c, "#confirm", PASSWORD).await?;
    click(c, "button[type=submit]").await?;
    wait_text(c, "Events stored since start", Duration::from_secs(10)).await?;
    // The link is used up.
    c.goto(setup).await.map_err(err)?;
    wait_text(c, "Log in", Duration::from_secs(5)).await?;

    // Log out; a wrong password is refused; the right one signs in.
    c.goto(&admin("/")).await.map_err(err)?;
    click(c, "header form button").await?;
    wait_text(c, "Admin password", Duration::from_secs(5)).await?;
    fill(c, "#password", "not the password").await?;
    click(c, "button[type=submit]").await?;
    wait_text(c, "Wrong password", Duration::from_secs(10)).await?;
    fill(c, "#password", PASSWORD).await?;
    click(c, "button[type=submit]").await?;
    wait_text(c, "Events stored since start", Duration::from_secs(10)).await?;

    // A team, and its snippet with this server's capture port and the team's token.
    c.goto(&admin("/teams")).await.map_err(err)?;
    fill(c, "#name", "Shop").await?;
    click(c, "form[action='/teams'] button").await?;
    wait_text(c, "(Shop) created", Duration::from_secs(5)).await?;
    let source = c.source().await.map_err(err)?;
    let shop_token = source
        .split("Shop</span></h2><p>Project token: <code class=\"token\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .ok_or("the new team's token is not on the page")?
        .to_owned();
    let port = format!(":{}", app.addr.port());
    let snippet = source
        .split("Shop</span>")
        .nth(1)
        .and_then(|shop| shop.split("<pre class=\"snippet\">").nth(1))
        .ok_or("no snippet on the page")?;
    if !(snippet.contains(&format!("posthog.init(&#39;{shop_token}&#39;"))
        || snippet.contains(&format!("posthog.init('{shop_token}'")))
        || !snippet.contains(&format!("127.0.0.1{port}"))
    {
        return Err(format!(
            "the snippet lacks the token {shop_token} or the port {port}"
        ));
    }
    // The token works for capture at once.
    let sent = reqwest::Client::new()
        .post(app.url("/capture/"))
        .json(&json!({"api_key": shop_token, "event": "from-shop", "distinct_id": "s"}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if sent.status() != 200 {
        return Err(format!(
            "capture with the new token answered {}",
            sent.status()
        ));
    }

    // Upload the webhook exporter; configure it for team 1 with the form its schema makes.
    c.goto(&admin("/plugins")).await.map_err(err)?;
    c.find(Locator::Css("#archive"))
        .await
        .map_err(err)?
        .send_keys(&archive.display().to_string())
        .await
        .map_err(err)?;
    click(c, "form[action='/plugins/upload'] button").await?;
    wait_text(c, "Installed Webhook Exporter", Duration::from_secs(30)).await?;
    let plugin_id = {
        let source = c.source().await.map_err(err)?;
        source
            .split("/teams/1\">Enable")
            .next()
            .and_then(|before| before.rsplit("/plugins/").next())
            .ok_or("no Enable link for team 1")?
            .to_owned()
    };
    c.goto(&admin(&format!("/plugins/{plugin_id}/teams/1")))
        .await
        .map_err(err)?;
    fill(
        c,
        "input[name='config.url']",
        &format!("http://{hook}/hook"),
    )
    .await?;
    fill(c, "input[name='config.auth_header']", "Bearer s3cret").await?;
    click(c, "form input[value=enable] ~ button").await?;
    wait_text(c, "Saved and enabled", Duration::from_secs(10)).await?;
    // The secret is not shown back; saving again with it left empty keeps it.
    let source = c.source().await.map_err(err)?;
    if source.contains("s3cret") {
        return Err("the secret config value is shown on the page".into());
    }
    click(c, "form input[value=enable] ~ button").await?;
    wait_text(c, "Saved and enabled", Duration::from_secs(10)).await?;
    let stored = cli(&app.data_dir, &["plugin", "list"]);
    if !stored.contains("Webhook Exporter") {
        return Err(format!("the CLI does not list the plugin: {stored}"));
    }

    // The dead letter, retried from the jobs page.
    c.goto(&admin("/jobs")).await.map_err(err)?;
    click(c, &format!("tr[id='job-{doomed}'] button")).await?;
    wait_text(
        c,
        &format!("Job {doomed} is now scheduled"),
        Duration::from_secs(5),
    )
    .await?;

    // An export of the first hour of November, its progress seen as it goes.
    c.execute(
        "document.getElementById('from').value='2026-11-01T00:00';\
         document.getElementById('to').value='2026-11-01T01:00';\
         const t=document.getElementById('target');\
         t.value=[...t.options].find(o=>o.value.endsWith(':Webhook Exporter')).value;",
        vec![],
    )
    .await
    .map_err(err)?;
    click(c, "form[action='/jobs/exports'] button").await?;
    wait_text(c, "started", Duration::from_secs(5)).await?;
    // The table refreshes itself: part-way first, then all of it.
    let mut seen_done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen_done.last() != Some(&1500) {
        if Instant::now() > deadline {
            return Err(format!("the export's progress showed only {seen_done:?}"));
        }
        if let Ok(cell) = c.find(Locator::Css("tr[id^='export-'] span.done")).await {
            if let Ok(Ok(done)) = cell.text().await.map(|t| t.trim().parse::<u64>()) {
                if seen_done.last() != Some(&done) {
                    seen_done.push(done);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !seen_done.iter().any(|d| *d > 0 && *d < 1500) {
        return Err(format!("no part-way progress was shown: {seen_done:?}"));
    }

    // The events tail shows what capture stored.
    c.goto(&admin("/events?team=1")).await.map_err(err)?;
    wait_text(c, "past", Duration::from_secs(5)).await?;

    // Settings say where each value came from.
    c.goto(&admin("/settings")).await.map_err(err)?;
    let text = page_text(c).await?;
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    if !(row("WEB_PORT") == "WEB_PORT 0 environment"
        && row("BACKUP_KEEP") == "BACKUP_KEEP 7 default")
    {
        return Err(format!("the settings do not show sources:\n{text}"));
    }

    // Outside the browser, with the browser's session cookie.
    let cookies = c.get_all_cookies().await.map_err(err)?;
    let session = cookies
        .iter()
        .find(|k| k.name() == "appliance_session")
        .ok_or("no session cookie")?;
    if !(session.http_only() == Some(true)
        && format!("{:?}", session.same_site()) == "Some(Strict)")
    {
        return Err(format!(
            "the session cookie is not HttpOnly and SameSite=Strict: {session:?}"
        ));
    }
    let cookie = format!("appliance_session={}", session.value());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    // A forged form (no CSRF token) is refused, and nothing changes.
    let forged = http
        .post(admin("/teams"))
        .header("cookie", &cookie)
        .form(&[("name", "forged"), ("csrf", "guess")])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if forged.status() != 403 {
        return Err(format!("a forged form got {}", forged.status()));
    }
    if cli(&app.data_dir, &["team", "list"]).contains("forged") {
        return Err("the forged form created a team".into());
    }
    // /api/ takes the session for reading.
    let jobs = http
        .get(admin("/api/jobs"))
        .header("cookie", &cookie)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if jobs.status() != 200 {
        return Err(format!(
            "/api/jobs with the session answered {}",
            jobs.status()
        ));
    }
    // A log-in form is small: a huge one is refused before anything is parsed or hashed. The
    // refusal comes from its Content-Length, before the body is read, so the server may answer
    // 413 and close while the client is still sending: a connection cut mid-upload is that same
    // refusal seen from the client.
    // (A client of its own: the connection the server closes must not be reused below.)
    let huge = reqwest::Client::new()
        .post(admin("/login"))
        .form(&[("password", "x".repeat(200_000))])
        .send()
        .await;
    match huge {
        Ok(answer) if answer.status() == 413 => {}
        Ok(answer) => return Err(format!("a 200 KB log-in form got {}", answer.status())),
        Err(e) if e.is_request() => {}
        Err(e) => return Err(format!("a 200 KB log-in form: {e}")),
    }
    // A log-in flood from one address is cut off.
    let mut last = 0;
    for _ in 0..12 {
        last = http
            .post(admin("/login"))
            .form(&[("password", "guess guess guess")])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .status()
            .as_u16();
    }
    if last != 429 {
        return Err(format!("the twelfth wrong password got {last}, not 429"));
    }
    Ok(())
}
