//! `docs/api.md` is run, not just read: every ```` ```http ```` block in it holds one or more
//! exchanges (a request, then the documented answer), and this test sends each request, in
//! document order, to one real server on `127.0.0.1:0` (default options; once on the embedded
//! store, once on a real `redis-server`), and checks the answer against the documented one.
//! Adding an example to the doc adds a case.
//!
//! An exchange, as written in the doc:
//!
//! ```text
//! POST /v1/limiters/snuba/acquire          <- request line (method, path and query)
//! {"holder": "worker-7"}                   <- optional body (sent as application/json)
//!
//! HTTP/1.1 200 OK                          <- the documented status
//! retry-after: 3                           <- optional: headers that must be present
//! {"permit_id": "snuba.1795869998583118"}  <- optional: the documented body
//! ```
//!
//! What "the documented answer" pins (values differ from run to run: tokens, times, counts):
//! - the status, exactly;
//! - a JSON body's shape: objects have exactly the documented keys; arrays have the documented
//!   length, each element shaped like the documented one; `null` is `null`; integers are
//!   integers and other numbers numbers; booleans and strings are equal, except a `message`
//!   (only its field, the text before the first `:`, is compared) and a `permit_id` (any
//!   string; later requests that quote the documented id get the real one); a documented
//!   `"..."` stands for any value (a limiter in a list, shown in full elsewhere);
//! - a plain-text body, exactly.
//!
//! And each endpoint named in a `###` heading (`` ### `POST /v1/limiters/{name}/acquire` ``)
//! has at least one example. A ```` ```http embedded ```` block documents what only the
//! embedded store does (keyed rates and schedules): it is not sent to the Redis store.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::Served;
use floodgate::{Floodgate, RedisConfig, RedisStore, Store};
use floodgate_server::server::ServerOptions;
use reqwest::Method;
use serde_json::Value;

/// One request of the doc and its documented answer.
#[derive(Debug)]
struct Exchange {
    /// Where the request line is in `docs/api.md` (1-based), for failure messages.
    line: usize,
    /// `GET`, `PUT`, ...
    method: String,
    /// The path with its query.
    path: String,
    /// Request headers written under the request line.
    headers: Vec<(String, String)>,
    /// The request body, as written (empty: none).
    body: String,
    /// The documented status.
    status: u16,
    /// Headers the answer must carry (names; values are not compared).
    answer_headers: Vec<String>,
    /// The documented answer body, as written (empty: not documented, not checked).
    answer: String,
    /// From a ```` ```http embedded ```` block: a feature only the embedded store has (keyed
    /// rates and schedules), so not sent to the Redis store.
    embedded_only: bool,
}

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md")
}

fn is_request_line(line: &str) -> bool {
    let mut parts = line.splitn(2, ' ');
    let method = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) && rest.starts_with('/')
}

fn header_line(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once(": ")?;
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then(|| (name.to_ascii_lowercase(), value.trim().to_owned()))
}

/// Every exchange of every ```` ```http ```` block, in document order.
fn parse(doc: &str) -> Vec<Exchange> {
    let mut exchanges = Vec::new();
    let mut in_block = false;
    let mut embedded_only = false;
    let mut block: Vec<(usize, &str)> = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        if !in_block && (line.trim() == "```http" || line.trim() == "```http embedded") {
            in_block = true;
            embedded_only = line.trim() == "```http embedded";
            block.clear();
        } else if in_block && line.trim() == "```" {
            in_block = false;
            let first = exchanges.len();
            parse_block(&block, &mut exchanges);
            for ex in &mut exchanges[first..] {
                ex.embedded_only = embedded_only;
            }
        } else if in_block {
            block.push((i + 1, line));
        }
    }
    assert!(!in_block, "docs/api.md: an ```http block is not closed");
    exchanges
}

fn parse_block(lines: &[(usize, &str)], out: &mut Vec<Exchange>) {
    let mut i = 0;
    while i < lines.len() {
        let (n, line) = lines[i];
        if line.trim().is_empty() {
            i += 1;
            continue;
        }
        assert!(
            is_request_line(line),
            "docs/api.md:{n}: expected a request line (METHOD /path), got {line:?}"
        );
        let (method, path) = line.split_once(' ').unwrap();
        let mut ex = Exchange {
            line: n,
            method: method.to_owned(),
            path: path.trim().to_owned(),
            headers: Vec::new(),
            body: String::new(),
            status: 0,
            answer_headers: Vec::new(),
            answer: String::new(),
            embedded_only: false,
        };
        i += 1;
        // The request's headers, then its body, up to the status line.
        while i < lines.len() && !lines[i].1.starts_with("HTTP/1.1 ") {
            let text = lines[i].1;
            match header_line(text) {
                Some(h) if ex.body.is_empty() => ex.headers.push(h),
                _ => {
                    ex.body.push_str(text);
                    ex.body.push('\n');
                }
            }
            i += 1;
        }
        assert!(
            i < lines.len(),
            "docs/api.md:{n}: the request has no documented answer (HTTP/1.1 STATUS)"
        );
        let (sn, status_line) = lines[i];
        ex.status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("docs/api.md:{sn}: no status in {status_line:?}"));
        i += 1;
        while i < lines.len() && !is_request_line(lines[i].1) {
            let text = lines[i].1;
            match header_line(text) {
                Some((name, _)) if ex.answer.is_empty() => ex.answer_headers.push(name),
                _ => {
                    ex.answer.push_str(text);
                    ex.answer.push('\n');
                }
            }
            i += 1;
        }
        ex.body = ex.body.trim().to_owned();
        ex.answer = ex.answer.trim().to_owned();
        out.push(ex);
    }
}

/// The endpoints named in `###` headings: `(method, path template)`.
fn headed_endpoints(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("### ")) {
        for (k, part) in line.split('`').enumerate() {
            if k % 2 == 1 && is_request_line(part) {
                let (m, p) = part.split_once(' ').unwrap();
                out.push((m.to_owned(), p.to_owned()));
            }
        }
    }
    out
}

/// Whether `path` (query ignored) fits `template`, whose `{x}` steps match any one step.
fn fits(template: &str, path: &str) -> bool {
    let template = template.split('?').next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

/// Compares an answer with the documented one (see the module's comment); collects `permit_id`
/// bindings. `at` is the JSON path, for messages.
fn check_shape(
    at: &str,
    doc: &Value,
    got: &Value,
    binds: &mut BTreeMap<String, String>,
    errors: &mut Vec<String>,
) {
    let key = at.rsplit('/').next().unwrap_or("");
    match (doc, got) {
        (Value::Object(d), Value::Object(g)) => {
            let dk: Vec<&String> = d.keys().collect();
            let gk: Vec<&String> = g.keys().collect();
            if dk != gk {
                errors.push(format!("{at}: keys {gk:?}, documented {dk:?}"));
            }
            for (k, dv) in d {
                if let Some(gv) = g.get(k) {
                    check_shape(&format!("{at}/{k}"), dv, gv, binds, errors);
                }
            }
        }
        (Value::Array(d), Value::Array(g)) => {
            if d.len() != g.len() {
                errors.push(format!(
                    "{at}: {} elements, documented {}",
                    g.len(),
                    d.len()
                ));
            }
            for (i, (dv, gv)) in d.iter().zip(g).enumerate() {
                check_shape(&format!("{at}/{i}"), dv, gv, binds, errors);
            }
        }
        // `"..."` stands for any value (an element described elsewhere in the doc).
        (Value::String(d), _) if d == "..." => {}
        (Value::Null, Value::Null) => {}
        (Value::Number(d), Value::Number(g)) => {
            let d_int = d.is_u64() || d.is_i64();
            let g_int = g.is_u64() || g.is_i64();
            if d_int && !g_int {
                errors.push(format!("{at}: {g} is not an integer (documented {d})"));
            }
        }
        (Value::Bool(d), Value::Bool(g)) if d == g => {}
        (Value::String(d), Value::String(g)) if key == "permit_id" => {
            binds.insert(d.clone(), g.clone());
        }
        (Value::String(d), Value::String(g)) if key == "message" => {
            let field = |s: &str| s.split(':').next().unwrap_or("").to_owned();
            if field(d) != field(g) {
                errors.push(format!(
                    "{at}: {g:?} does not name the documented field of {d:?}"
                ));
            }
        }
        (Value::String(d), Value::String(g)) if d == g => {}
        _ => errors.push(format!("{at}: {got}, documented {doc}")),
    }
}

/// `text` with every bound documented value replaced by the real one.
fn bind(text: &str, binds: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (doc, real) in binds {
        out = out.replace(doc.as_str(), real);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_of_api_md_runs_as_documented() {
    run_examples(Floodgate::in_memory(), false).await;
}

/// The same examples on the Redis store: the doc promises the same answers on every store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_of_api_md_runs_as_documented_on_redis() {
    let redis = support::RedisServer::start();
    let mut config = RedisConfig::new(redis.url());
    // The cap `floodgate serve` gives a Redis store (the listing shows it as documented).
    config.max_limiters = Some(floodgate::store::memory::DEFAULT_MAX_LIMITERS);
    let store = RedisStore::connect(config).await.unwrap();
    run_examples(Floodgate::with_store(store), true).await;
}

async fn run_examples<S: Store>(gate: Floodgate<S>, on_redis: bool) {
    let doc = std::fs::read_to_string(doc_path()).unwrap();
    let exchanges = parse(&doc);
    // A parser that finds nothing must not pass: the doc has examples of every endpoint.
    assert!(
        exchanges.len() >= 15,
        "only {} examples found",
        exchanges.len()
    );
    for (method, template) in headed_endpoints(&doc) {
        assert!(
            exchanges
                .iter()
                .any(|e| e.method == method && fits(&template, &e.path)),
            "docs/api.md documents {method} {template} without an ```http example"
        );
    }

    let served = Served::start(gate, ServerOptions::default()).await;
    let http = reqwest::Client::new();
    let mut binds = BTreeMap::new();
    let mut failures = Vec::new();
    for ex in &exchanges {
        if on_redis && ex.embedded_only {
            continue;
        }
        let path = bind(&ex.path, &binds);
        let method = Method::from_bytes(ex.method.as_bytes()).unwrap();
        let mut req = http.request(method, format!("http://{}{path}", served.addr));
        let mut typed = false;
        for (name, value) in &ex.headers {
            typed |= name == "content-type";
            req = req.header(name, value);
        }
        if !ex.body.is_empty() {
            if !typed {
                req = req.header("content-type", "application/json");
            }
            req = req.body(bind(&ex.body, &binds));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let here = format!("docs/api.md:{} {} {path}", ex.line, ex.method);
        if status != ex.status {
            failures.push(format!(
                "{here}: status {status}, documented {}: {text}",
                ex.status
            ));
            continue;
        }
        for name in &ex.answer_headers {
            if !headers.contains_key(name.as_str()) {
                failures.push(format!("{here}: no {name} header in the answer"));
            }
        }
        if ex.answer.is_empty() {
            continue;
        }
        if ex.answer.starts_with('{') || ex.answer.starts_with('[') {
            let documented: Value = serde_json::from_str(&ex.answer).unwrap_or_else(|e| {
                panic!(
                    "docs/api.md:{}: the documented answer is not JSON: {e}",
                    ex.line
                )
            });
            let Ok(got) = serde_json::from_str::<Value>(&text) else {
                failures.push(format!("{here}: the answer is not JSON: {text}"));
                continue;
            };
            let mut errors = Vec::new();
            check_shape("", &documented, &got, &mut binds, &mut errors);
            for e in errors {
                failures.push(format!("{here}: {e}\n    answer: {text}"));
            }
        } else if text.trim() != ex.answer {
            failures.push(format!(
                "{here}: answered {text:?}, documented {:?}",
                ex.answer
            ));
        }
    }
    served.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} examples differ from the server:\n{}",
        failures.len(),
        exchanges.len(),
        failures.join("\n")
    );
}

/// The checker itself catches what it must: a missing key, a wrong kind, a wrong length, a
/// different code; and accepts what varies.
#[test]
fn the_shape_check_catches_differences() {
    let doc: Value = serde_json::from_str(
        r#"{"error": "invalid_request", "message": "count: too many", "n": 1,
            "list": [{"permit_id": "a.1", "ok": true}], "gone": null}"#,
    )
    .unwrap();
    let check = |got: &str| {
        let mut errors = Vec::new();
        let mut binds = BTreeMap::new();
        check_shape(
            "",
            &doc,
            &serde_json::from_str(got).unwrap(),
            &mut binds,
            &mut errors,
        );
        (errors.len(), binds)
    };
    let same = r#"{"error": "invalid_request", "message": "count: is 7", "n": 9,
                   "list": [{"permit_id": "b.2", "ok": true}], "gone": null}"#;
    let (errors, binds) = check(same);
    assert_eq!(errors, 0);
    assert_eq!(binds.get("a.1").map(String::as_str), Some("b.2"));
    for bad in [
        r#"{"error": "queue_full", "message": "count: x", "n": 9, "list": [{"permit_id": "b", "ok": true}], "gone": null}"#,
        r#"{"error": "invalid_request", "message": "permits: x", "n": 9, "list": [{"permit_id": "b", "ok": true}], "gone": null}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9.5, "list": [{"permit_id": "b", "ok": true}], "gone": null}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9, "list": [], "gone": null}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9, "list": [{"permit_id": "b", "ok": false}], "gone": null}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9, "list": [{"permit_id": "b", "ok": true}], "gone": 3}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9, "list": [{"permit_id": "b", "ok": true}]}"#,
        r#"{"error": "invalid_request", "message": "count: x", "n": 9, "list": [{"permit_id": "b", "ok": true}], "gone": null, "new": 1}"#,
    ] {
        assert_eq!(check(bad).0, 1, "{bad}");
    }
}

#[test]
fn the_parser_reads_exchanges_and_templates() {
    let doc = "### `GET /v1/limiters/{name}`, `GET /v1/limiters`\n\n```http\n\
               PUT /v1/limiters/a\n{\"concurrency\": 1,\n \"max_queue\": 5}\n\n\
               HTTP/1.1 200 OK\n\nDELETE /v1/limiters/a\n\nHTTP/1.1 429 Too Many Requests\n\
               retry-after: 1\n{\"error\": \"x\"}\n```\n";
    let ex = parse(doc);
    assert_eq!(ex.len(), 2);
    assert_eq!(
        (ex[0].method.as_str(), ex[0].path.as_str()),
        ("PUT", "/v1/limiters/a")
    );
    assert_eq!(ex[0].body, "{\"concurrency\": 1,\n \"max_queue\": 5}");
    assert_eq!((ex[0].status, ex[0].answer.as_str()), (200, ""));
    assert_eq!(
        (ex[1].status, ex[1].answer_headers.clone()),
        (429, vec!["retry-after".to_owned()])
    );
    assert_eq!(ex[1].answer, "{\"error\": \"x\"}");
    let heads = headed_endpoints(doc);
    assert_eq!(heads.len(), 2);
    assert!(fits(&heads[0].1, "/v1/limiters/snuba?x=1"));
    assert!(!fits(&heads[0].1, "/v1/limiters/snuba/holders"));
    assert!(fits(&heads[1].1, "/v1/limiters"));
}
