//! The web console in a real browser: Debian's `chromium`, headless, driven over the DevTools
//! protocol against `itamaed serve` on the real SmolLM2 GGUF with API keys configured.
//!
//! One test walks what a user does: the console asks for a key; an inference key reaches only
//! Compare; with the admin key, a dataset with bad lines is refused with its line numbers, a
//! dataset is uploaded and a tiny LoRA job started, its loss curve grows while it trains, the
//! tuned variant and the base answer one prompt side by side (streamed), the Serving page shows
//! their latency percentiles from /metrics, and the Adapters page unloads and reloads the
//! variant.
//! Screenshots go to `target/console-screenshots/` and must not be blank. A JavaScript exception
//! anywhere fails the test.
//!
//! Chromium is installed by `scripts/setup-system.sh`. Without it the test runs that script;
//! if chromium still cannot be had it is skipped with a loud message — except under CI (`CI`
//! set), where it fails.
mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, TempDir, WORKSPACE};
use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

const ADMIN: &str = "console-admin-key-0123456789";
const INFER: &str = "console-infer-key-0123456789";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// The browser binary: `ITAMAE_CHROMIUM`, else the first of the usual names on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ITAMAE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Chromium, installed by the project's script if it is missing; `None` only when that fails
/// outside CI.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = find_chromium() {
        return Some(p);
    }
    let script = Path::new(WORKSPACE).join("scripts/setup-system.sh");
    let ran = std::process::Command::new("bash")
        .arg(&script)
        .arg("test")
        .status();
    if let Some(p) = find_chromium() {
        return Some(p);
    }
    let msg = format!(
        "chromium is not installed and {} could not install it ({ran:?})",
        script.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("\n!!!!!!!!\n!!! SKIPPING the console browser test: {msg}\n!!!!!!!!\n");
    None
}

/// Evaluates `expr` (a JavaScript expression yielding a string, number or boolean).
fn js(tab: &Tab, expr: &str) -> serde_json::Value {
    let r = tab
        .evaluate(expr, false)
        .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"));
    r.value.unwrap_or(serde_json::Value::Null)
}

/// Polls `expr` until it is truthy (not null, false, 0 or ""); returns that value.
fn wait_js(tab: &Tab, expr: &str, timeout: Duration, d: &Daemon) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let v = js(tab, expr);
        let truthy = match &v {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
            serde_json::Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        assert!(
            started.elapsed() < timeout,
            "still falsy after {timeout:?}: {expr}\npage text:\n{}\nlog:\n{}",
            js(tab, "document.body.innerText"),
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Clicks the element `selector` names. Live pages re-render parts of themselves (a job's header
/// on each event), so a node found can be replaced before the click lands: look it up again.
fn click(tab: &Tab, selector: &str) {
    let mut last = None;
    for _ in 0..20 {
        match tab
            .wait_for_element(selector)
            .and_then(|e| e.click().map(|_| ()))
        {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("click {selector}: {last:?}");
}

fn type_into(tab: &Tab, selector: &str, text: &str) {
    tab.wait_for_element(selector)
        .and_then(|e| e.type_into(text).map(|_| ()))
        .unwrap_or_else(|e| panic!("type into {selector}: {e}"));
}

fn set_files(tab: &Tab, selector: &str, path: &Path) {
    // Chromium cannot read a file chosen through a path holding `..`.
    let path = path.canonicalize().expect("the file exists");
    let p = path.to_str().expect("UTF-8 path");
    tab.wait_for_element(selector)
        .and_then(|e| e.set_input_files(&[p]).map(|_| ()))
        .unwrap_or_else(|e| panic!("files for {selector}: {e}"));
}

fn screenshots_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshots dir");
    dir
}

/// Saves a screenshot as `<name>.png` and checks it is not blank: decoded, its luminance must
/// vary (a blank or single-colour page has a standard deviation near 0).
fn screenshot(tab: &Tab, name: &str) -> PathBuf {
    let png_bytes = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("capture a screenshot");
    let path = screenshots_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png_bytes).expect("write the screenshot");
    let decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    let channels = info.color_type.samples();
    assert!(
        channels >= 3,
        "unexpected colour type {:?}",
        info.color_type
    );
    let lum: Vec<f64> = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| 0.2126 * p[0] as f64 + 0.7152 * p[1] as f64 + 0.0722 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let sd = (lum.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lum.len() as f64).sqrt();
    let dark = lum.iter().filter(|&&l| l < 128.0).count() as f64 / lum.len() as f64;
    eprintln!(
        "{}: {}x{}, luminance mean {mean:.1}, sd {sd:.1}, dark {:.1}%",
        path.display(),
        info.width,
        info.height,
        dark * 100.0
    );
    assert!(
        info.width >= 800 && sd > 10.0 && dark > 0.005,
        "{name} looks blank"
    );
    path
}

#[test]
fn console_drives_a_job_and_compares_answers() {
    let Some(chromium) = chromium() else {
        return;
    };
    let started = Instant::now();
    let dir = TempDir::new("console");
    let keys = format!("admin:{ADMIN},inference:{INFER}");
    let mut d = Daemon::start(
        dir.path(),
        "itamaed.log",
        &[],
        &[("ITAMAE_API_KEYS", Some(&keys))],
        Duration::from_secs(120),
    );
    d.wait_ready();

    let browser = Browser::new(LaunchOptions {
        headless: true,
        // Root in a container has no user namespace for chromium's sandbox.
        sandbox: false,
        window_size: Some((1280, 1000)),
        path: Some(chromium),
        idle_browser_timeout: Duration::from_secs(600),
        args: vec![
            std::ffi::OsStr::new("--disable-dev-shm-usage"),
            std::ffi::OsStr::new("--disable-gpu"),
        ],
        ..Default::default()
    })
    .expect("launch chromium");
    let tab = browser.new_tab().expect("a tab");
    tab.set_default_timeout(STEP_TIMEOUT);
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    tab.enable_runtime().expect("runtime events");
    let sink = errors.clone();
    tab.add_event_listener(Arc::new(move |e: &Event| {
        if let Event::RuntimeExceptionThrown(ex) = e {
            let d = &ex.params.exception_details;
            let text = d
                .exception
                .as_ref()
                .and_then(|o| o.description.clone())
                .unwrap_or_else(|| d.text.clone());
            if let Ok(mut v) = sink.lock() {
                v.push(text);
            }
        }
    }))
    .expect("listen for exceptions");
    let no_js_errors = |stage: &str| {
        let v = errors.lock().map(|v| v.clone()).unwrap_or_default();
        assert!(v.is_empty(), "JavaScript exceptions by {stage}: {v:#?}");
    };

    // ---- keys: the console asks; an inference key reaches only Compare ----
    tab.navigate_to(&d.url("/"))
        .and_then(|t| t.wait_until_navigated())
        .expect("open the console");
    wait_js(
        &tab,
        "!document.getElementById('key-panel').hidden",
        STEP_TIMEOUT,
        &d,
    );
    type_into(&tab, "#key-input", INFER);
    click(&tab, "#key-form button[type=submit]");
    wait_js(
        &tab,
        "!!document.getElementById('compare-form')",
        STEP_TIMEOUT,
        &d,
    );
    let visible = js(
        &tab,
        "[...document.querySelectorAll('#nav li')].filter(l => !l.hidden).map(l => l.textContent).join(',')",
    );
    assert_eq!(visible, "Compare", "an inference key sees only Compare");
    js(&tab, "location.hash = '#/jobs'");
    wait_js(&tab, "location.hash === '#/compare'", STEP_TIMEOUT, &d);
    click(&tab, "#forget-key");
    wait_js(
        &tab,
        "!document.getElementById('key-panel').hidden",
        STEP_TIMEOUT,
        &d,
    );
    type_into(&tab, "#key-input", ADMIN);
    click(&tab, "#key-form button[type=submit]");
    js(&tab, "location.hash = '#/jobs'");
    wait_js(
        &tab,
        "!!document.getElementById('create-job')",
        STEP_TIMEOUT,
        &d,
    );
    let visible = js(
        &tab,
        "[...document.querySelectorAll('#nav li')].filter(l => !l.hidden).length",
    );
    assert_eq!(visible, 4, "an admin key sees every page");
    no_js_errors("login");

    // The Serving page's Prometheus parsing and histogram quantiles, on known buckets.
    let q = tab
        .evaluate(
            "import('/console/assets/prom.js').then(m => { \
               const s = m.parseProm('# HELP x h\\nx_bucket{model=\"a\",le=\"0.1\"} 5\\n' + \
                 'x_bucket{model=\"a\",le=\"0.2\"} 10\\nx_bucket{model=\"a\",le=\"+Inf\"} 10\\n'); \
               const b = m.bucketsBy(s, 'x', 'model').a; \
               return [0.5, 0.75, 1].map(q => m.quantile(b, q).toFixed(3)).join(','); })",
            true,
        )
        .expect("evaluate prom.js");
    assert_eq!(
        q.value,
        Some(serde_json::json!("0.100,0.150,0.200")),
        "{q:?}"
    );

    // ---- a dataset with bad lines: refused, naming them ----
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
         this is not json\n\
         {\"nothing\": 1}\n",
    )
    .expect("write the bad dataset");
    set_files(&tab, "#f-train", &bad);
    click(&tab, "#f-submit");
    let listed = wait_js(
        &tab,
        "[...document.querySelectorAll('[data-dataset-errors] li')].map(l => l.textContent).join('\\n')",
        STEP_TIMEOUT,
        &d,
    );
    let listed = listed.as_str().unwrap_or_default().to_string();
    assert!(
        listed.lines().any(|l| l.starts_with("line 2:"))
            && listed.lines().any(|l| l.starts_with("line 3:")),
        "{listed}"
    );
    assert_eq!(
        js(
            &tab,
            "document.getElementById('f-train').getAttribute('aria-invalid')"
        ),
        "true"
    );
    screenshot(&tab, "dataset-errors");

    // ---- a tiny LoRA job from the form ----
    let data = Path::new(WORKSPACE).join("tests/data");
    set_files(&tab, "#f-train", &data.join("persona_train.jsonl"));
    set_files(&tab, "#f-valid", &data.join("persona_valid.jsonl"));
    type_into(&tab, "#f-suffix", "console");
    for (id, v) in [
        ("#f-lora-r", "4"),
        ("#f-hp-max_steps", "8"),
        ("#f-hp-batch_size", "2"),
        ("#f-hp-max_seq_len", "64"),
        ("#f-hp-checkpoint_every", "4"),
        ("#f-seed", "7"),
    ] {
        type_into(&tab, id, v);
    }
    click(&tab, "#f-submit");
    let job_id = wait_js(
        &tab,
        "(location.hash.match(/^#\\/jobs\\/(ftjob-[^/]+)$/) || [])[1] || ''",
        STEP_TIMEOUT,
        &d,
    );
    let job_id = job_id.as_str().unwrap_or_default().to_string();
    eprintln!("job {job_id} created from the console");
    // The curve grows as steps arrive over the event stream.
    let points = "Number(document.getElementById('loss-chart')?.dataset.points || 0)";
    let mut seen: Vec<u64> = Vec::new();
    let t = Instant::now();
    loop {
        let n = js(&tab, points).as_u64().unwrap_or(0);
        if n > 0 && seen.last() != Some(&n) {
            seen.push(n);
        }
        let status = js(
            &tab,
            "document.querySelector('#job-head .status')?.textContent || ''",
        );
        if status == "succeeded" && seen.last().is_some_and(|&n| n >= 8) {
            break;
        }
        assert!(
            !["failed", "cancelled"].contains(&status.as_str().unwrap_or("")),
            "job {status}: {}",
            js(&tab, "document.body.innerText")
        );
        assert!(
            t.elapsed() < JOB_TIMEOUT,
            "job not done after {JOB_TIMEOUT:?} (points seen {seen:?}); log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("loss chart points over time: {seen:?}");
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0] < w[1]),
        "the loss curve did not grow live: {seen:?}"
    );
    let polyline = js(
        &tab,
        "document.querySelector('#loss-chart polyline')?.getAttribute('points').split(' ').length || 0",
    );
    assert!(
        polyline.as_u64().is_some_and(|n| n >= 8),
        "train curve: {polyline}"
    );
    wait_js(
        &tab,
        "document.querySelectorAll('#ckpt-body tr[data-step]').length >= 1",
        STEP_TIMEOUT,
        &d,
    );
    wait_js(
        &tab,
        "Number(document.getElementById('acc-chart').dataset.points) >= 8",
        STEP_TIMEOUT,
        &d,
    );
    screenshot(&tab, "job");
    no_js_errors("the job");

    // ---- Compare: the base and the tuned variant, streamed side by side ----
    click(&tab, "#job-head [data-chat]");
    wait_js(
        &tab,
        "!!document.getElementById('c-send')",
        STEP_TIMEOUT,
        &d,
    );
    let variant = js(&tab, "document.getElementById('c-model-1').value");
    assert!(
        variant.as_str().is_some_and(|v| v.ends_with(&job_id)),
        "variant preselected: {variant}"
    );
    click(&tab, "#c-send");
    wait_js(
        &tab,
        "document.querySelectorAll('.answer[data-state=done]').length === 2",
        STEP_TIMEOUT,
        &d,
    );
    let answers = js(
        &tab,
        "JSON.stringify([...document.querySelectorAll('.answer')].map(a => [a.dataset.model, a.querySelector('.text').textContent, Number(a.dataset.tokens)]))",
    );
    let answers: Vec<(String, String, u64)> =
        serde_json::from_str(answers.as_str().unwrap_or("[]")).expect("answers");
    assert_eq!(answers.len(), 2, "{answers:?}");
    for (model, text, tokens) in &answers {
        assert!(!text.trim().is_empty() && *tokens > 0, "{model}: {text:?}");
    }
    eprintln!("compare: {answers:#?}");
    let stats = js(&tab, "document.querySelector('.answer .stats').textContent");
    assert!(
        stats
            .as_str()
            .is_some_and(|s| s.contains("answer") && s.contains("first token")),
        "{stats}"
    );
    screenshot(&tab, "compare");

    // ---- Serving: per-variant rates and percentiles from /metrics ----
    js(&tab, "location.hash = '#/serving'");
    let ttft = wait_js(
        &tab,
        &format!(
            "document.querySelector('#serving-body tr[data-model$=\"{job_id}\"] td:nth-child(5)')?.textContent.endsWith('ms') && document.querySelector('#serving-body tr[data-model$=\"{job_id}\"] td:nth-child(5)').textContent"
        ),
        STEP_TIMEOUT,
        &d,
    );
    eprintln!("variant TTFT p50 on the Serving page: {ttft}");

    // ---- Adapters: the variant is resident; unload it ----
    js(&tab, "location.hash = '#/adapters'");
    let row = format!("#adapters-body tr[data-adapter$=\"{job_id}\"]");
    wait_js(
        &tab,
        &format!("document.querySelector('{row} td:nth-child(3)')?.textContent === 'resident'"),
        STEP_TIMEOUT,
        &d,
    );
    click(&tab, &format!("{row} button[data-action=unload]"));
    wait_js(
        &tab,
        &format!("document.querySelector('{row} td:nth-child(3)')?.textContent === 'evicted'"),
        STEP_TIMEOUT,
        &d,
    );
    // Unloaded, a job's variant stays listed (from the jobs API) and loads again.
    click(&tab, &format!("{row} button[data-action=load]"));
    wait_js(
        &tab,
        &format!("document.querySelector('{row} td:nth-child(3)')?.textContent === 'resident'"),
        STEP_TIMEOUT,
        &d,
    );
    screenshot(&tab, "adapters");
    no_js_errors("the end");
    eprintln!("console browser test took {:.1?}", started.elapsed());
}
