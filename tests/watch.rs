//! End-to-end tests of the SSE watch stream `GET /v1/watch` on a real three-node cluster:
//! change events arrive in index order, a reconnect with `Last-Event-ID` (or `?index=`) sees
//! every later change exactly once, an index older than what a restarted node retains yields a
//! `resync` with the current state, an open stream ends when its node shuts down, and bad input
//! gets a 400 with a JSON body.
//!
//! The SSE parsing is done here, over reqwest's `Response::chunk`, so the test checks the wire
//! format itself. Every wait has a deadline; nothing sleeps to synchronize.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use common::{Cluster, WAIT};

/// The watched node: a follower or the leader, not the node the writes go through.
const WATCHED: u64 = 3;
/// Where writes go in.
const WRITER: u64 = 1;

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Msg {
    event: String,
    id: u64,
    data: Value,
}

/// An open stream: the response and the bytes not yet parsed.
struct Stream {
    what: String,
    resp: reqwest::Response,
    buf: Vec<u8>,
}

/// A client without an overall timeout (streams stay open); each read has its own deadline.
fn stream_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .context("build the stream client")
}

impl Stream {
    async fn open(c: &Cluster, node: u64, path: &str, last_id: Option<u64>) -> Result<Self> {
        let url = c.url(node, path)?;
        let mut req = stream_client()?.get(&url);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let what = format!("GET {url} (Last-Event-ID {last_id:?})");
        let resp = tokio::time::timeout(common::HTTP_TIMEOUT, req.send())
            .await
            .with_context(|| format!("{what}: no response head in time"))?
            .with_context(|| format!("{what}: send"))?;
        ensure!(resp.status() == 200, "{what}: status {}", resp.status());
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        ensure!(
            ct.starts_with("text/event-stream"),
            "{what}: content-type {ct:?}"
        );
        Ok(Stream {
            what,
            resp,
            buf: Vec::new(),
        })
    }

    /// The next event (keep-alive comments skipped), or `None` when the server ended the
    /// stream; fails if none arrives within `deadline`.
    async fn next(&mut self, deadline: Duration) -> Result<Option<Msg>> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).context("event is not UTF-8")?;
                if let Some(m) = parse_block(&block).with_context(|| self.what.clone())? {
                    return Ok(Some(m));
                }
                continue;
            }
            match tokio::time::timeout_at(until, self.resp.chunk()).await {
                Err(_) => bail!("{}: no event within {deadline:?}", self.what),
                Ok(Err(e)) => return Err(e).with_context(|| format!("{}: read", self.what)),
                Ok(Ok(None)) => {
                    ensure!(
                        self.buf.iter().all(u8::is_ascii_whitespace),
                        "{}: stream ended inside an event: {:?}",
                        self.what,
                        String::from_utf8_lossy(&self.buf)
                    );
                    return Ok(None);
                }
                Ok(Ok(Some(bytes))) => self.buf.extend_from_slice(&bytes),
            }
        }
    }

    async fn next_event(&mut self, deadline: Duration) -> Result<Msg> {
        self.next(deadline)
            .await?
            .with_context(|| format!("{}: stream ended", self.what))
    }
}

/// Parses one SSE block; `None` for a block of comments only (keep-alives).
fn parse_block(block: &str) -> Result<Option<Msg>> {
    let (mut event, mut id, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "id" => {
                id = Some(
                    value
                        .parse::<u64>()
                        .with_context(|| format!("id {value:?}"))?,
                )
            }
            "data" => data.push(value.to_string()),
            other => bail!("unexpected SSE field {other:?} in {block:?}"),
        }
    }
    if event.is_none() && id.is_none() && data.is_empty() {
        return Ok(None);
    }
    let event = event.with_context(|| format!("event without a type: {block:?}"))?;
    let id = id.with_context(|| format!("event without an id: {block:?}"))?;
    let data: Value = serde_json::from_str(&data.join("\n"))
        .with_context(|| format!("data is not JSON: {block:?}"))?;
    ensure!(
        data["Index"].as_u64() == Some(id),
        "id {id} differs from data.Index: {block:?}"
    );
    Ok(Some(Msg { event, id, data }))
}

/// `(instance id, op)` pairs of a change event's `services` changes, checking each change's
/// shape (and that a `set` carries the instance's stored JSON).
fn service_ops(m: &Msg) -> Result<Vec<(String, String)>> {
    ensure!(m.event == "change", "expected a change event, got {m:?}");
    let changes = m.data["Changes"]
        .as_array()
        .with_context(|| format!("no Changes list: {m:?}"))?;
    ensure!(!changes.is_empty(), "a change event without changes: {m:?}");
    let mut out = Vec::new();
    for ch in changes {
        ensure!(
            ch["Kind"] == "services",
            "?service=web passed a change of another kind: {ch}"
        );
        let key = ch["Key"]
            .as_str()
            .with_context(|| format!("no Key: {ch}"))?;
        let op = ch["Op"].as_str().with_context(|| format!("no Op: {ch}"))?;
        match op {
            "set" => {
                ensure!(
                    ch["Value"]["id"] == key,
                    "set value is not the instance: {ch}"
                );
                ensure!(ch["Value"]["name"] == "web", "?service=web passed {ch}");
            }
            "delete" => ensure!(ch["Value"].is_null(), "delete with a value: {ch}"),
            _ => bail!("unknown Op: {ch}"),
        }
        out.push((key.to_string(), op.to_string()));
    }
    Ok(out)
}

/// Reads change events until `until` is among the ops seen; returns every op seen (in order)
/// and the last id. Ids must keep increasing past `after`.
async fn read_until(
    s: &mut Stream,
    after: u64,
    until: &(String, String),
) -> Result<(Vec<(String, String)>, u64)> {
    let (mut ops, mut last) = (Vec::new(), after);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ops.contains(until) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = s
            .next_event(left)
            .await
            .with_context(|| format!("waiting for {until:?}; seen so far {ops:?}"))?;
        ensure!(m.id > last, "event id {} not after {last}: {m:?}", m.id);
        last = m.id;
        ops.extend(service_ops(&m)?);
    }
    Ok((ops, last))
}

fn op(id: &str, op: &str) -> (String, String) {
    (id.to_string(), op.to_string())
}

/// Asserts `seen` holds exactly the ops in `want`, each once.
fn exactly_once(seen: &[(String, String)], want: &[(String, String)], what: &str) -> Result<()> {
    let unique: BTreeSet<&(String, String)> = seen.iter().collect();
    ensure!(unique.len() == seen.len(), "{what}: duplicates in {seen:?}");
    let want: BTreeSet<&(String, String)> = want.iter().collect();
    ensure!(unique == want, "{what}: saw {unique:?}, wanted {want:?}");
    Ok(())
}

async fn register(c: &Cluster, id: &str, name: &str) -> Result<()> {
    let body = json!({"ID": id, "Name": name, "Port": 8080});
    c.register(WRITER, &body)
        .await?
        .expect_200(&format!("register {id}"))?;
    Ok(())
}

async fn deregister(c: &Cluster, id: &str) -> Result<()> {
    c.deregister(WRITER, id)
        .await?
        .expect_200(&format!("deregister {id}"))?;
    Ok(())
}

/// Waits until the watched node's local state lists exactly `want` as instances of web.
async fn applied_on_watched(c: &Cluster, want: &BTreeSet<String>) -> Result<()> {
    c.eventually(WAIT, "the watched node to apply the writes", async || {
        let ids = c.catalog_ids(WATCHED, "web", "?stale").await?;
        ensure!(&ids == want, "node {WATCHED} has {ids:?}");
        Ok(())
    })
    .await
}

// ------------------------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_resumes_exactly_once_and_resyncs() -> Result<()> {
    // Snapshots every 5 entries, so a restarted node's history (it replays the log from
    // its last snapshot) starts past index 1.
    let mut c = Cluster::new(&["--snapshot-every", "5"])?;
    let r = resumes_exactly_once_and_resyncs(&mut c).await;
    c.finish(r)
}

async fn resumes_exactly_once_and_resyncs(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    let path = "/v1/watch?service=web";

    // Live: no cursor, so a resync first (nothing of web yet), then the changes in order.
    let mut s = Stream::open(c, WATCHED, path, None).await?;
    let first = s.next_event(WAIT).await?;
    ensure!(
        first.event == "resync",
        "first event without a cursor: {first:?}"
    );
    ensure!(
        first.data["State"] == json!([]),
        "web has no state yet: {first:?}"
    );
    let mut live = Vec::new();
    for n in 1..=5 {
        let id = format!("web-{n}");
        register(c, &id, "web").await?;
        live.push(op(&id, "set"));
    }
    // Another service's instance: never on a ?service=web stream.
    register(c, "db-1", "db").await?;
    let (mut seen, mut last) = read_until(&mut s, first.id, &op("web-5", "set")).await?;
    // A key written twice could fold into one apply on the watched node (a stream shows state,
    // not every write), so the second write waits until the first one was seen.
    deregister(c, "web-2").await?;
    live.push(op("web-2", "delete"));
    let (more, l) = read_until(&mut s, last, &op("web-2", "delete")).await?;
    seen.extend(more);
    last = l;
    exactly_once(&seen, &live, "live stream")?;

    // Disconnect, write while away (each key once), and make sure the watched node applied it
    // all, so the reconnect replays from the hub's ring rather than seeing it live.
    drop(s);
    let mut away = Vec::new();
    for n in 6..=9 {
        let id = format!("web-{n}");
        register(c, &id, "web").await?;
        away.push(op(&id, "set"));
    }
    for id in ["web-3", "web-4"] {
        deregister(c, id).await?;
        away.push(op(id, "delete"));
    }
    register(c, "db-2", "db").await?;
    let now: BTreeSet<String> = ["web-1", "web-5", "web-6", "web-7", "web-8", "web-9"]
        .map(String::from)
        .into();
    applied_on_watched(c, &now).await?;

    // Reconnect with Last-Event-ID: every change after it exactly once, then live ones (a
    // fence write bounds the read, so a duplicate after the replay would show up too).
    let mut s = Stream::open(c, WATCHED, path, Some(last)).await?;
    register(c, "web-fence", "web").await?;
    let fence = op("web-fence", "set");
    let (resumed, fence_id) = read_until(&mut s, last, &fence).await?;
    let mut want = away.clone();
    want.push(fence.clone());
    exactly_once(&resumed, &want, "stream resumed with Last-Event-ID")?;
    drop(s);

    // `?index=` resumes the same way.
    let mut s = Stream::open(c, WATCHED, &format!("{path}&index={last}"), None).await?;
    let (by_index, _) = read_until(&mut s, last, &fence).await?;
    exactly_once(&by_index, &want, "stream resumed with ?index")?;

    // An open stream ends when its node shuts down, and the node exits cleanly.
    c.signal(WATCHED, "TERM")?;
    let end = s.next(WAIT).await?;
    ensure!(end.is_none(), "stream went on after SIGTERM: {end:?}");
    let st = c.wait_exit(WATCHED, WAIT).await?;
    ensure!(
        st.success(),
        "node {WATCHED} exited with {st} after SIGTERM"
    );

    // The restarted node keeps history only from its last snapshot (it replays the log
    // after it): index 1 is older than that, so the stream starts with a resync holding the
    // current state.
    c.start(WATCHED).await?;
    let mut now = now;
    now.insert("web-fence".into());
    applied_on_watched(c, &now).await?;
    let mut s = Stream::open(c, WATCHED, &format!("{path}&index=1"), None).await?;
    let m = s.next_event(WAIT).await?;
    ensure!(m.event == "resync", "expected a resync for index 1: {m:?}");
    ensure!(
        m.id >= fence_id,
        "resync index {} is behind {fence_id}",
        m.id
    );
    let state = m.data["State"]
        .as_array()
        .with_context(|| format!("no State list: {m:?}"))?;
    let mut keys = BTreeSet::new();
    for e in state {
        ensure!(e["Kind"] == "services", "?service=web state has {e}");
        ensure!(e["Value"]["name"] == "web", "?service=web state has {e}");
        let key = e["Key"].as_str().with_context(|| format!("no Key: {e}"))?;
        ensure!(
            e["Value"]["id"] == key,
            "state entry is not its instance: {e}"
        );
        ensure!(keys.insert(key.to_string()), "{key} twice in the state");
    }
    ensure!(keys == now, "resync state {keys:?}, wanted {now:?}");
    // And it goes on live after the resync's index.
    register(c, "web-after", "web").await?;
    let (after, _) = read_until(&mut s, m.id, &op("web-after", "set")).await?;
    exactly_once(&after, &[op("web-after", "set")], "live after the resync")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rejects_bad_input() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = rejects_bad_input(&mut c).await;
    c.finish(r)
}

async fn rejects_bad_input(c: &mut Cluster) -> Result<()> {
    c.form_ids(&[1]).await?;
    let bad = |what: &'static str, r: common::Resp| -> Result<()> {
        ensure!(
            r.status == 400,
            "{what}: status {} body {:?}",
            r.status,
            r.body
        );
        let v = r.json()?;
        ensure!(v["error"] == "bad_request", "{what}: body {v}");
        ensure!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        Ok(())
    };
    bad("kind=bogus", c.get(1, "/v1/watch?kind=bogus").await?)?;
    bad("index=x", c.get(1, "/v1/watch?index=x").await?)?;
    bad(
        "kind=kv&service=web",
        c.get(1, "/v1/watch?kind=kv&service=web").await?,
    )?;
    let url = c.url(1, "/v1/watch")?;
    let req = c.client().get(&url).header("Last-Event-ID", "-3");
    bad("Last-Event-ID: -3", c.send("GET /v1/watch", req).await?)?;
    // A good kind opens a stream (which this client then drops).
    let mut s = Stream::open(c, 1, "/v1/watch?kind=nodes", None).await?;
    let m = s.next_event(WAIT).await?;
    ensure!(m.event == "resync", "first event: {m:?}");
    let nodes = m.data["State"]
        .as_array()
        .with_context(|| format!("no State: {m:?}"))?;
    ensure!(
        nodes
            .iter()
            .any(|n| n["Kind"] == "nodes" && n["Key"] == "1"),
        "node 1 missing from the nodes state: {m:?}"
    );
    Ok(())
}
