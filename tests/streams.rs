//! Stream pipelines against a real three-node cluster: definitions through
//! one node run on every node; events posted to a node come out of that
//! node's pipeline to SSE clients and to registered services; buffers
//! apply their policy; delivery follows a service's failover; the
//! `_registry` and `_traffic` sources see registry changes and proxied
//! requests.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{Cluster, TestServer, WAIT};
use serde_json::{json, Value};

// ------------------------------------------------------------------ receivers

struct ReceiverState {
    /// Every event received, in arrival order.
    got: Mutex<Vec<Value>>,
    /// Batches answered.
    batches: AtomicU64,
    /// Milliseconds each batch is held before it is answered.
    delay_ms: AtomicU64,
    healthy: AtomicBool,
}

/// A registered service's instance: records the event batches POSTed to `/events`.
struct Receiver {
    name: String,
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    server: TestServer,
}

async fn take(State(s): State<Arc<ReceiverState>>, Json(batch): Json<Vec<Value>>) -> StatusCode {
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    s.got
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(batch);
    s.batches.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn health(State(s): State<Arc<ReceiverState>>) -> StatusCode {
    if s.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

impl Receiver {
    async fn start(name: &str) -> Result<Self> {
        let state = Arc::new(ReceiverState {
            got: Mutex::new(Vec::new()),
            batches: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        });
        let app = Router::new()
            .route("/events", post(take))
            .route("/health", get(health))
            .with_state(state.clone());
        let server = TestServer::start(app).await?;
        Ok(Receiver {
            name: name.to_string(),
            addr: server.addr,
            state,
            server,
        })
    }

    fn instance(&self, service: &str) -> Value {
        json!({
            "Name": service, "ID": self.name, "Address": "127.0.0.1", "Port": self.addr.port(),
            "Check": {"HTTP": format!("http://{}/health", self.addr), "Interval": "1s", "Timeout": "1s"},
        })
    }

    fn got(&self) -> Vec<Value> {
        self.state
            .got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn ids(&self) -> BTreeSet<u64> {
        self.got().iter().filter_map(|e| e["id"].as_u64()).collect()
    }

    /// Stops answering: the port refuses connections from now on.
    async fn kill(&mut self) -> Result<()> {
        self.server.kill().await;
        Ok(())
    }
}

// ------------------------------------------------------------------ SSE

/// An open `GET /v1/streams/{name}/subscribe`: yields `data:` events as JSON and
/// `event: dropped` notices.
struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

#[derive(Debug)]
enum SseMsg {
    Event(Value),
    Dropped(u64),
}

impl Sse {
    async fn open(c: &Cluster, node: u64, stream: &str) -> Result<Self> {
        let url = c.url(node, &format!("/v1/streams/{stream}/subscribe"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()?;
        let resp = tokio::time::timeout(common::HTTP_TIMEOUT, client.get(&url).send())
            .await
            .with_context(|| format!("GET {url}: no response head"))??;
        ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
        Ok(Sse {
            resp,
            buf: Vec::new(),
        })
    }

    async fn next(&mut self, deadline: Duration) -> Result<SseMsg> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block)?;
                let mut event = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                let v: Value = serde_json::from_str(&data).with_context(|| data.clone())?;
                return Ok(match event.as_deref() {
                    Some("dropped") => SseMsg::Dropped(v["dropped"].as_u64().unwrap_or(0)),
                    _ => SseMsg::Event(v),
                });
            }
            match tokio::time::timeout_at(until, self.resp.chunk()).await {
                Err(_) => bail!("no SSE event within {deadline:?}"),
                Ok(r) => match r? {
                    Some(b) => self.buf.extend_from_slice(&b),
                    None => bail!("SSE stream ended"),
                },
            }
        }
    }

    async fn event(&mut self, deadline: Duration) -> Result<Value> {
        match self.next(deadline).await? {
            SseMsg::Event(v) => Ok(v),
            SseMsg::Dropped(n) => bail!("expected an event, got a drop notice ({n})"),
        }
    }
}

// ------------------------------------------------------------------ helpers

async fn put_stream(c: &Cluster, via: u64, name: &str, def: &Value) -> Result<Value> {
    c.put_json(via, &format!("/v1/streams/{name}"), def)
        .await?
        .expect_200(&format!("PUT stream {name}"))?
        .json()
}

/// Waits until every node in `ids` runs `name` (its stats answer).
async fn running_on(c: &Cluster, ids: &[u64], name: &str) -> Result<()> {
    for &id in ids {
        c.eventually(
            WAIT,
            &format!("stream {name} running on node {id}"),
            async || {
                let r = c.get(id, &format!("/v1/streams/{name}/stats")).await?;
                ensure!(r.status == 200, "stats: {} {}", r.status, r.body);
                Ok(())
            },
        )
        .await?;
    }
    Ok(())
}

async fn stats(c: &Cluster, id: u64, name: &str) -> Result<Value> {
    c.get(id, &format!("/v1/streams/{name}/stats"))
        .await?
        .expect_200("stream stats")?
        .json()
}

async fn post_events(
    c: &Cluster,
    id: u64,
    stream: &str,
    content_type: &str,
    body: String,
) -> Result<common::Resp> {
    let req = c
        .client()
        .post(c.url(id, &format!("/v1/streams/{stream}/events"))?)
        .header("content-type", content_type)
        .body(body);
    c.send("POST events", req).await
}

fn num(v: &Value, what: &str) -> Result<u64> {
    v.pointer(what)
        .and_then(Value::as_u64)
        .with_context(|| format!("no number at {what} in {v}"))
}

// ------------------------------------------------------------------ 1: processors

/// Text lines → json_parse → filter → transform → a tumbling count window per service,
/// through node 2 (defined through node 1): the window results are the hand-computed ones,
/// and the stats count parse errors (dead-lettered) and filtered events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_parses_filters_transforms_and_windows() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = pipeline_body(&mut c).await;
    c.finish(r)
}

async fn pipeline_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    put_stream(c, 1, "bad-lines", &json!({})).await?;
    let def = json!({
        "processors": [
            {"type": "json_parse", "dead_letter": "bad-lines"},
            {"type": "filter", "expr": "event.level == \"error\" && event.latency_ms > 100"},
            {"type": "transform", "set": {"slow": "event.latency_ms > 500"},
             "rename": {"svc": "service"}, "drop": ["level"]},
            {"type": "window", "kind": "tumbling", "size_count": 2, "group_by": "service",
             "field": "latency_ms", "aggregates": ["count", "sum", "min", "max", "avg"]}
        ],
        "buffer": {"capacity": 100, "policy": "block"}
    });
    let stored = put_stream(c, 1, "errors", &def).await?;
    ensure!(stored["name"] == "errors", "stored: {stored}");
    running_on(c, &[2], "errors").await?;
    running_on(c, &[2], "bad-lines").await?;
    let mut out = Sse::open(c, 2, "errors").await?;
    let mut dead = Sse::open(c, 2, "bad-lines").await?;
    let lines = [
        r#"{"svc":"api","level":"error","latency_ms":150}"#,
        r#"{"svc":"api","level":"info","latency_ms":900}"#, // filtered: not an error
        r#"{"svc":"db","level":"error","latency_ms":700}"#,
        r#"not json"#,                                      // dead letter
        r#"{"svc":"api","level":"error","latency_ms":50}"#, // filtered: too fast
        r#"{"svc":"api","level":"error","latency_ms":650}"#,
        r#"{"svc":"db","level":"error","latency_ms":300.5}"#,
    ];
    let r = post_events(c, 2, "errors", "text/plain", lines.join("\n")).await?;
    ensure!(r.status == 200, "POST: {} {}", r.status, r.body);
    ensure!(r.json()?["accepted"] == 7, "accepted all seven: {}", r.body);
    let mut windows = Vec::new();
    for _ in 0..2 {
        windows.push(out.event(WAIT).await?);
    }
    windows.sort_by_key(|w| w["group"].as_str().map(str::to_string));
    let api = &windows[0];
    ensure!(api["group"] == "api", "{api}");
    ensure!(
        api["count"] == 2 && api["min"] == 150.0 && api["max"] == 650.0,
        "{api}"
    );
    ensure!(api["sum"] == 800.0 && api["avg"] == 400.0, "{api}");
    let db = &windows[1];
    ensure!(db["group"] == "db" && db["count"] == 2, "{db}");
    ensure!(
        db["sum"] == 1000.5 && db["min"] == 300.5 && db["max"] == 700.0,
        "{db}"
    );
    let bad = dead.event(WAIT).await?;
    ensure!(bad["raw"] == "not json", "dead letter: {bad}");

    let s = stats(c, 2, "errors").await?;
    ensure!(num(&s, "/received")? == 7, "{s}");
    ensure!(
        num(&s, "/parse_errors")? == 1 && num(&s, "/dead_lettered")? == 1,
        "{s}"
    );
    ensure!(num(&s, "/filtered")? == 2, "{s}");
    ensure!(num(&s, "/out")? == 2, "{s}");
    // Node 3 runs the stream too, but saw none of node 2's events.
    running_on(c, &[3], "errors").await?;
    ensure!(num(&stats(c, 3, "errors").await?, "/received")? == 0);

    // Bad input: a malformed body adds nothing; a bad expression never reaches Raft.
    let r = post_events(c, 2, "errors", "application/json", "[{\"a\":1},".into()).await?;
    ensure!(r.status == 400, "malformed body: {} {}", r.status, r.body);
    ensure!(num(&stats(c, 2, "errors").await?, "/received")? == 7);
    let r = c
        .put_json(
            1,
            "/v1/streams/broken",
            &json!({"processors": [{"type": "filter", "expr": "event.a =="}]}),
        )
        .await?;
    ensure!(
        r.status == 400 && r.body.contains("processors[0]"),
        "{} {}",
        r.status,
        r.body
    );
    let r = post_events(c, 1, "nope", "application/json", "{}".into()).await?;
    ensure!(r.status == 404, "unknown stream: {} {}", r.status, r.body);
    Ok(())
}

// ------------------------------------------------------------------ 2: backpressure

/// A slow subscriber: its buffer stays within capacity, and the producer sees the stream's
/// policy — `reject` answers 429 with Retry-After once the buffers are full, `drop_newest`
/// accepts and counts the drops, `block` makes the producer wait until there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_the_stream_policy_and_bounded_buffers() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = backpressure_body(&mut c).await;
    c.finish(r)
}

async fn backpressure_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    let slow = Receiver::start("slow-1").await?;
    slow.state.delay_ms.store(300, Ordering::SeqCst);
    c.register(1, &slow.instance("slow"))
        .await?
        .expect_200("register slow")?;
    let sub = json!({"service": "slow", "path": "/events", "capacity": 5, "batch": 1});
    for (name, policy) in [("rej", "reject"), ("drop", "drop_newest"), ("blk", "block")] {
        put_stream(
            c,
            1,
            name,
            &json!({"buffer": {"capacity": 5, "policy": policy}}),
        )
        .await?;
        c.put_json(1, &format!("/v1/streams/{name}/subscriptions/s"), &sub)
            .await?
            .expect_200("PUT subscription")?;
        running_on(c, &[1], name).await?;
    }
    // Subscriptions start once their node applied them; wait until node 1 shows them.
    for name in ["rej", "drop", "blk"] {
        c.eventually(WAIT, "subscription running", async || {
            let s = stats(c, 1, name).await?;
            ensure!(s["subscriptions"]["s"].is_object(), "{s}");
            Ok(())
        })
        .await?;
    }

    // reject: one event at a time, until refused.
    let mut accepted = 0;
    let mut refused = None;
    // More posts than the bound below, so a stream that never refuses fails.
    for i in 0..300 {
        let r = post_events(
            c,
            1,
            "rej",
            "application/json",
            json!({"id": i}).to_string(),
        )
        .await?;
        match r.status {
            200 => accepted += 1,
            429 => {
                refused = Some(r);
                break;
            }
            s => bail!("reject stream answered {s}: {}", r.body),
        }
    }
    let r = refused.context("the reject stream never answered 429")?;
    ensure!(r.header("retry-after").is_some(), "429 without Retry-After");
    ensure!(r.json()?["error"] == "stream_full", "{}", r.body);
    // At most: the stream's buffer, the subscription's buffer, one batch in flight, plus the
    // worker's hand.
    ensure!(
        accepted <= 5 + 5 + 1 + 1 + 256,
        "accepted {accepted} before 429"
    );
    let s = stats(c, 1, "rej").await?;
    ensure!(num(&s, "/dropped/rejected")? >= 1, "{s}");
    ensure!(num(&s, "/buffer/high_water")? <= 5, "{s}");
    ensure!(
        num(&s, "/subscriptions/s/buffer/high_water")? <= 5,
        "subscription buffer over capacity: {s}"
    );

    // drop_newest: everything is answered 200; what did not fit is counted.
    let body: Vec<Value> = (0..200).map(|i| json!({"id": i})).collect();
    let r = post_events(
        c,
        1,
        "drop",
        "application/json",
        Value::Array(body).to_string(),
    )
    .await?;
    ensure!(r.status == 200, "{} {}", r.status, r.body);
    let v = r.json()?;
    let (acc, dropped) = (num(&v, "/accepted")?, num(&v, "/dropped")?);
    ensure!(acc + dropped == 200 && dropped > 0, "{v}");
    c.eventually(WAIT, "drops counted", async || {
        let s = stats(c, 1, "drop").await?;
        let lost =
            num(&s, "/dropped/buffer_newest")? + num(&s, "/subscriptions/s/buffer/dropped_newest")?;
        ensure!(lost >= dropped, "{s}");
        ensure!(num(&s, "/subscriptions/s/buffer/high_water")? <= 5, "{s}");
        Ok(())
    })
    .await?;

    // block: 20 events through buffers of 5 and 5 behind a 300 ms-per-event subscriber
    // cannot all be taken at once: the POST waits, then succeeds.
    let body: Vec<Value> = (0..20).map(|i| json!({"id": i})).collect();
    let started = std::time::Instant::now();
    let r = post_events(
        c,
        1,
        "blk",
        "application/json",
        Value::Array(body).to_string(),
    )
    .await?;
    let took = started.elapsed();
    ensure!(r.status == 200, "{} {}", r.status, r.body);
    ensure!(r.json()?["accepted"] == 20, "{}", r.body);
    ensure!(
        took >= Duration::from_millis(900),
        "a blocked producer should have waited for the slow subscriber (took {took:?})"
    );
    let s = stats(c, 1, "blk").await?;
    ensure!(num(&s, "/buffer/high_water")? <= 5, "{s}");
    ensure!(num(&s, "/dropped/timed_out")? == 0, "{s}");
    Ok(())
}

// ------------------------------------------------------------------ 3: failover

/// Events flow to one of two instances; the one receiving them dies; once its check is
/// critical deliveries go to the other, and every event accepted before and after reached
/// some instance (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_move_to_a_healthy_instance_when_the_receiving_one_dies() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = failover_body(&mut c).await;
    c.finish(r)
}

async fn failover_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    let mut a = Receiver::start("pager-a").await?;
    let b = Receiver::start("pager-b").await?;
    c.register(1, &a.instance("pager"))
        .await?
        .expect_200("register a")?;
    c.register(2, &b.instance("pager"))
        .await?
        .expect_200("register b")?;
    put_stream(c, 1, "alerts", &json!({"buffer": {"capacity": 1000}})).await?;
    c.put_json(
        2,
        "/v1/streams/alerts/subscriptions/pager",
        &json!({"service": "pager", "path": "/events", "batch": 10}),
    )
    .await?
    .expect_200("PUT subscription")?;
    running_on(c, &[3], "alerts").await?;
    c.eventually(WAIT, "both pager instances passing", async || {
        let v = c.get(3, "/v1/health/service/pager?passing").await?.json()?;
        ensure!(v.as_array().map_or(0, Vec::len) == 2, "{v}");
        Ok(())
    })
    .await?;
    c.eventually(WAIT, "subscription running on node 3", async || {
        let s = stats(c, 3, "alerts").await?;
        ensure!(s["subscriptions"]["pager"].is_object(), "{s}");
        Ok(())
    })
    .await?;

    let mut sent: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    let mut send = async |c: &Cluster, n: u64, sent: &mut BTreeSet<u64>| -> Result<()> {
        let batch: Vec<Value> = (next..next + n).map(|i| json!({"id": i})).collect();
        let r = post_events(
            c,
            3,
            "alerts",
            "application/json",
            Value::Array(batch).to_string(),
        )
        .await?;
        ensure!(r.status == 200, "{} {}", r.status, r.body);
        ensure!(r.json()?["accepted"] == n, "{}", r.body);
        sent.extend(next..next + n);
        next += n;
        Ok(())
    };
    for _ in 0..10 {
        send(c, 10, &mut sent).await?;
    }
    c.eventually(WAIT, "the first 100 events delivered", async || {
        let got: BTreeSet<u64> = a.ids().union(&b.ids()).copied().collect();
        ensure!(
            sent.is_subset(&got),
            "{} of {} delivered",
            got.len(),
            sent.len()
        );
        Ok(())
    })
    .await?;
    ensure!(!a.ids().is_empty(), "round robin reached pager-a");

    // pager-a dies; events keep coming while its check turns critical and after.
    a.kill().await?;
    for _ in 0..5 {
        send(c, 10, &mut sent).await?;
    }
    c.eventually(WAIT, "pager-a critical on node 3", async || {
        let v = c.get(3, "/v1/health/service/pager?passing").await?.json()?;
        let ids: Vec<&str> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["Service"]["ID"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        ensure!(ids == ["pager-b"], "passing: {ids:?}");
        Ok(())
    })
    .await?;
    for _ in 0..5 {
        send(c, 10, &mut sent).await?;
    }
    c.eventually(WAIT, "every accepted event delivered", async || {
        let got: BTreeSet<u64> = a.ids().union(&b.ids()).copied().collect();
        let missing: Vec<&u64> = sent.difference(&got).take(5).collect();
        ensure!(
            missing.is_empty(),
            "missing e.g. {missing:?} of {}",
            sent.len()
        );
        Ok(())
    })
    .await?;
    let after: Vec<u64> = b.ids().into_iter().filter(|&i| i >= 100).collect();
    ensure!(
        after.len() == 100,
        "pager-b took every event after the kill: {}",
        after.len()
    );
    let s = stats(c, 3, "alerts").await?;
    ensure!(num(&s, "/subscriptions/pager/delivered")? >= 200, "{s}");
    Ok(())
}

// ------------------------------------------------------------------ 4: built-in sources

/// `_registry` on node 1 sees a registration made through node 3; `_traffic` on node 2 sees
/// the requests its proxy carried, with route, upstream and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_sources_see_registry_changes_and_proxied_requests() -> Result<()> {
    let mut c = Cluster::new(&["--proxy-addr", "127.0.0.1:0"])?;
    let r = sources_body(&mut c).await;
    c.finish(r)
}

async fn sources_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    put_stream(
        c,
        1,
        "changes",
        &json!({"source": "_registry",
                "processors": [{"type": "filter", "expr": "event.kind == \"services\""}]}),
    )
    .await?;
    put_stream(c, 1, "requests", &json!({"source": "_traffic"})).await?;
    running_on(c, &[1], "changes").await?;
    running_on(c, &[2], "requests").await?;
    let mut changes = Sse::open(c, 1, "changes").await?;
    let mut requests = Sse::open(c, 2, "requests").await?;

    let web = Receiver::start("web-1").await?;
    c.register(3, &web.instance("web"))
        .await?
        .expect_200("register web-1")?;
    let ev = changes.event(WAIT).await?;
    ensure!(
        ev["key"] == "web-1" && ev["op"] == "set",
        "registry event: {ev}"
    );
    ensure!(
        ev["value"]["name"] == "web" && ev["index"].as_u64().is_some(),
        "{ev}"
    );

    c.put_json(
        1,
        "/v1/routes/web",
        &json!({"protocol": "http", "service": "web", "match": {"path_prefix": "/health"}}),
    )
    .await?
    .expect_200("PUT route")?;
    let proxy = c.proxy_addr(2)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?;
    c.eventually(WAIT, "GET /health via node 2's proxy", async || {
        let r = client.get(format!("http://{proxy}/health")).send().await?;
        ensure!(r.status() == 200, "{}", r.status());
        Ok(())
    })
    .await?;
    // Earlier tries may have been 503s (no passing instance yet): find the 200.
    loop {
        let ev = requests.event(WAIT).await?;
        ensure!(
            ev["path"] == "/health" && ev["method"] == "GET",
            "traffic event: {ev}"
        );
        if ev["status"] == 200 {
            ensure!(ev["route"] == "web" && ev["upstream"] == "web-1", "{ev}");
            ensure!(ev["latency_ms"].as_f64().is_some(), "{ev}");
            break;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ WebSocket

/// A WebSocket producer's messages (a JSON array, then NDJSON) are answered with what was
/// accepted, and a WebSocket subscriber on the same node receives the output events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ingest_and_subscribe() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = websocket_body(&mut c).await;
    c.finish(r)
}

async fn websocket_body(c: &mut Cluster) -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    c.form().await?;
    put_stream(
        c,
        1,
        "ws",
        &json!({"processors": [{"type": "filter", "expr": "event.n % 2 == 0"}]}),
    )
    .await?;
    running_on(c, &[3], "ws").await?;
    let api = c.api_addr(3)?;
    let ws = async |path: &str| {
        let url = format!("ws://{api}{path}");
        anyhow::Ok(
            tokio::time::timeout(common::HTTP_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .context("WebSocket handshake timed out")??
                .0,
        )
    };
    let mut sub = ws("/v1/streams/ws/subscribe").await?;
    let mut producer = ws("/v1/streams/ws/events").await?;
    let mut reply = async |text: String| -> Result<Value> {
        producer.send(Message::text(text)).await?;
        loop {
            let m = tokio::time::timeout(WAIT, producer.next())
                .await?
                .context("producer socket closed")??;
            if let Message::Text(t) = m {
                return Ok(serde_json::from_str(t.as_str())?);
            }
        }
    };
    let r = reply(json!([{"n": 1}, {"n": 2}, {"n": 3}]).to_string()).await?;
    ensure!(r["accepted"] == 3, "array message: {r}");
    let r = reply("{\"n\": 4}\n{\"n\": 5}\n".to_string()).await?;
    ensure!(r["accepted"] == 2, "NDJSON message: {r}");
    let r = reply("{oops".to_string()).await?;
    ensure!(r["status"] == 400, "a bad message is answered 400: {r}");
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await?
            .context("subscriber socket closed")??;
        if let Message::Text(t) = m {
            got.push(serde_json::from_str::<Value>(t.as_str())?);
        }
    }
    ensure!(
        got == [json!({"n": 2}), json!({"n": 4})],
        "subscriber got {got:?}"
    );
    Ok(())
}
