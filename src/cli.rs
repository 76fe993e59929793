//! Client subcommands (`raftmesh members`, `status`, `register`, ...): talk
//! to any node's HTTP API and print readable tables or, with `--json`, the
//! server's own JSON.
//!
//! Owns the client flags, the HTTP calls the client makes, turning transport
//! failures and error answers into one-line messages, and table formatting.
//! Does not own the API itself (`api/`) or any server-side validation: the
//! client checks only what it must to build a well-formed URL, and lets the
//! server judge everything else so both never disagree.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

/// Whole-request timeout; the server itself gives up on a write after its
/// `--write-timeout-ms` (5 s by default) plus leader wait, so 10 s lets its
/// own 503/504 answer arrive instead of a client-side timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a live node on a LAN takes milliseconds; waiting longer
/// only delays the "is the node running?" message.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Options shared by every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// API address of any node.
    #[arg(
        long,
        global = true,
        env = "RAFTMESH_ADDR",
        default_value = "127.0.0.1:8500"
    )]
    pub addr: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Client subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// List cluster members.
    Members,
    /// Show the Raft status of the node at --addr.
    Status,
    /// Register (or update) a service instance.
    Register(RegisterArgs),
    /// Deregister a service instance by id (unknown ids are a no-op).
    Deregister {
        /// Service instance id.
        id: String,
    },
    /// List service names and their tags.
    Services,
    /// List the instances of one service.
    Service {
        /// Service name.
        name: String,
        /// Answer from this node's local state, even if it lags the leader.
        #[arg(long)]
        stale: bool,
    },
}

/// Flags of `raftmesh register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// Service name.
    #[arg(long)]
    pub name: String,
    /// Instance id; defaults to the name.
    #[arg(long)]
    pub id: Option<String>,
    /// Address of the instance; empty means the node's address.
    #[arg(long)]
    pub address: Option<String>,
    /// Port of the instance.
    #[arg(long)]
    pub port: Option<u16>,
    /// Tag (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata as KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
}

/// Runs one client subcommand.
pub async fn run(opts: &ClientOpts, cmd: ClientCommand) -> anyhow::Result<()> {
    let api = Api::new(&opts.addr)?;
    match cmd {
        ClientCommand::Members => {
            let body = api.get("/v1/cluster/members").await?.json()?;
            if opts.json {
                return emit_json(&body);
            }
            let mut members: Vec<Member> =
                serde_json::from_value(body).context("unexpected /v1/cluster/members answer")?;
            members.sort_by_key(|m| m.id);
            emit(&members_table(&members))
        }
        ClientCommand::Status => {
            let body = api.get("/v1/cluster/status").await?.json()?;
            if opts.json {
                return emit_json(&body);
            }
            emit(&status_lines(&body)?)
        }
        ClientCommand::Register(args) => {
            let id = args.id.clone().unwrap_or_else(|| args.name.clone());
            check_segment("service id", &id)?;
            let resp = api
                .send(
                    Method::PUT,
                    "/v1/agent/service/register",
                    Some(register_body(&args)?),
                )
                .await?;
            write_done(opts, "registered", &id, resp.index())
        }
        ClientCommand::Deregister { id } => {
            check_segment("service id", &id)?;
            let path = format!("/v1/agent/service/deregister/{}", encode_segment(&id));
            let resp = api.send(Method::PUT, &path, None).await?;
            write_done(opts, "deregistered", &id, resp.index())
        }
        ClientCommand::Services => {
            let body = api.get("/v1/catalog/services").await?.json()?;
            if opts.json {
                return emit_json(&body);
            }
            let services: BTreeMap<String, Vec<String>> =
                serde_json::from_value(body).context("unexpected /v1/catalog/services answer")?;
            emit(&services_table(&services))
        }
        ClientCommand::Service { name, stale } => {
            check_segment("service name", &name)?;
            let mut path = format!("/v1/catalog/service/{}", encode_segment(&name));
            if stale {
                path.push_str("?stale");
            }
            let body = api.get(&path).await?.json()?;
            if opts.json {
                return emit_json(&body);
            }
            let instances: Vec<Instance> =
                serde_json::from_value(body).context("unexpected /v1/catalog/service answer")?;
            emit(&instances_table(&instances))
        }
    }
}

/// One entry of `GET /v1/cluster/members`.
#[derive(Debug, Deserialize)]
struct Member {
    id: u64,
    #[serde(default)]
    name: String,
    #[serde(default)]
    api_addr: String,
    #[serde(default)]
    peer_addr: String,
    #[serde(default)]
    voter: bool,
    #[serde(default)]
    leader: bool,
    #[serde(default)]
    matched_index: Option<u64>,
}

/// The fields of one `GET /v1/catalog/service/{name}` entry the table shows.
#[derive(Debug, Deserialize)]
struct Instance {
    #[serde(rename = "ServiceID", default)]
    service_id: String,
    #[serde(rename = "Node", default)]
    node: String,
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "ServiceAddress", default)]
    service_address: String,
    #[serde(rename = "ServicePort", default)]
    service_port: u16,
    #[serde(rename = "ServiceTags", default)]
    service_tags: Vec<String>,
}

fn members_table(members: &[Member]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.api_addr.clone(),
                m.peer_addr.clone(),
                if m.voter { "voter" } else { "learner" }.to_string(),
                if m.leader { "*" } else { "" }.to_string(),
                m.matched_index
                    .map_or_else(|| "-".to_string(), |i| i.to_string()),
            ]
        })
        .collect();
    render_table(
        &["ID", "NAME", "API", "PEER", "ROLE", "LEADER", "MATCHED"],
        &rows,
    )
}

fn services_table(services: &BTreeMap<String, Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|(name, tags)| vec![name.clone(), tags.join(",")])
        .collect();
    render_table(&["NAME", "TAGS"], &rows)
}

fn instances_table(instances: &[Instance]) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            // Consul semantics: an empty ServiceAddress means "the node's address".
            let address = if i.service_address.is_empty() {
                &i.address
            } else {
                &i.service_address
            };
            vec![
                i.service_id.clone(),
                i.node.clone(),
                address.clone(),
                i.service_port.to_string(),
                i.service_tags.join(","),
            ]
        })
        .collect();
    render_table(&["ID", "NODE", "ADDRESS", "PORT", "TAGS"], &rows)
}

/// `key: value` lines in the order the spec documents, so the output is
/// stable and reads top-down (serde_json's map would sort alphabetically);
/// keys a newer server adds are appended rather than dropped.
fn status_lines(body: &Value) -> anyhow::Result<String> {
    const ORDER: [&str; 13] = [
        "node_id",
        "name",
        "role",
        "term",
        "leader_id",
        "commit_index",
        "applied_index",
        "last_log_index",
        "snapshot_index",
        "purged_index",
        "snapshots_installed",
        "api_addr",
        "peer_addr",
    ];
    let Some(map) = body.as_object() else {
        bail!("unexpected /v1/cluster/status answer: not a JSON object");
    };
    let known = ORDER.iter().copied();
    let extra = map
        .keys()
        .map(String::as_str)
        .filter(|k| !ORDER.contains(k));
    let mut out = String::new();
    for key in known.chain(extra) {
        if let Some(v) = map.get(key) {
            out.push_str(&format!("{key}: {}\n", plain(v)));
        }
    }
    Ok(out)
}

/// A JSON value as a human reads it: strings unquoted, null as "-".
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart. The last column is not padded so
/// lines carry no trailing whitespace. Widths count chars, not bytes, so a
/// non-ASCII node name does not shift the columns after it.
fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < widths.len() {
                let pad = w.saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // An empty last cell (e.g. no tags) would otherwise leave padding.
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Parses one `--meta KEY=VALUE`. The value may be empty or contain `=`
/// (only the first `=` splits), the key may not be empty.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        Some(_) => Err(format!("{s:?}: the key before '=' is empty")),
        None => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The register request body. Optional fields are left out when not given so
/// the server applies its own defaults.
fn register_body(args: &RegisterArgs) -> anyhow::Result<Value> {
    if args.name.is_empty() {
        bail!("--name must not be empty");
    }
    let mut meta = serde_json::Map::new();
    for (k, v) in &args.meta {
        // A silent last-one-wins would hide a typo in a long command line.
        if meta.insert(k.clone(), Value::String(v.clone())).is_some() {
            bail!("--meta key {k:?} given twice");
        }
    }
    let mut body = json!({
        "Name": args.name,
        "Tags": args.tags,
        "Meta": meta,
    });
    if let Some(map) = body.as_object_mut() {
        if let Some(id) = &args.id {
            map.insert("ID".into(), json!(id));
        }
        if let Some(address) = &args.address {
            map.insert("Address".into(), json!(address));
        }
        if let Some(port) = args.port {
            map.insert("Port".into(), json!(port));
        }
    }
    Ok(body)
}

/// Rejects path segments that cannot round-trip: an empty one changes which
/// route matches, and `.`/`..` (even percent-encoded) are resolved away by
/// URL normalisation, so the request would hit a different path.
fn check_segment(what: &str, s: &str) -> anyhow::Result<()> {
    if s.is_empty() {
        bail!("{what} must not be empty");
    }
    if s == "." || s == ".." {
        bail!("{what} {s:?} is not allowed");
    }
    Ok(())
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `:`
/// (legal in a path segment, and common in service ids).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints the outcome of a register/deregister.
fn write_done(opts: &ClientOpts, verb: &str, id: &str, index: Option<u64>) -> anyhow::Result<()> {
    if opts.json {
        return emit_json(&json!({ "id": id, "index": index }));
    }
    match index {
        Some(i) => emit(&format!("{verb} {id} (index {i})\n")),
        None => emit(&format!("{verb} {id}\n")),
    }
}

fn emit_json(v: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("formatting JSON")?;
    emit(&format!("{text}\n"))
}

/// Writes to stdout; a closed pipe (`raftmesh services | head -1`) is a
/// normal end, not an error (println! would panic there).
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// A successful answer, fully read.
struct Answer {
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).context("the server's answer is not JSON")
    }

    /// `X-Consul-Index`, the commit index of a write.
    fn index(&self) -> Option<u64> {
        self.headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    }
}

/// The HTTP API of one node.
struct Api {
    client: reqwest::Client,
    /// As the user wrote it, for messages.
    addr: String,
    /// `http://host:port`, no trailing slash.
    base: String,
}

impl Api {
    fn new(addr: &str) -> anyhow::Result<Self> {
        let addr = addr.trim().trim_end_matches('/');
        if addr.is_empty() {
            bail!("--addr must not be empty");
        }
        // HOST:PORT is the documented form; a pasted URL works too.
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // Node addresses are cluster-internal; a stray HTTP_PROXY in the
            // environment would otherwise turn every call into a proxy error.
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            addr: addr.to_string(),
            base,
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, None).await
    }

    /// Sends one request; any failure becomes a message naming the address.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Answer> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            bail!("{}", error_message(&self.addr, status, &headers, &body));
        }
        Ok(Answer { headers, body })
    }

    fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let why = if e.is_connect() && e.is_timeout() {
            format!(
                "no connection within {} s — is the node running and the address right?",
                CONNECT_TIMEOUT.as_secs()
            )
        } else if e.is_timeout() {
            format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
        } else if let Some(io) = io_cause(e) {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                "connection refused — is the node running?".to_string()
            } else {
                io.to_string()
            }
        } else {
            innermost(e)
        };
        anyhow::anyhow!("cannot reach raftmesh at {}: {why}", self.addr)
    }
}

/// The `std::io::Error` somewhere under reqwest's error, if any.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// The deepest cause's text: reqwest's own top level ("error sending
/// request for url ...") says less than what it wraps.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `ADDR answered 400 Bad Request: <message>`, with the server's JSON
/// `message` when there is one and its body (shortened) when not.
fn error_message(addr: &str, status: StatusCode, headers: &HeaderMap, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = body.trim();
            if text.chars().count() > 200 {
                format!("{}...", text.chars().take(200).collect::<String>())
            } else {
                text.to_string()
            }
        });
    let mut out = format!("{addr} answered {status}");
    if !message.is_empty() {
        out.push_str(": ");
        out.push_str(&message);
    }
    if let Some(after) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) {
        out.push_str(&format!(" (retry after {after} s)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[&[&str]]) -> Vec<Vec<String>> {
        r.iter()
            .map(|row| row.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let t = render_table(
            &["ID", "NAME", "TAGS"],
            &rows(&[&["web-1", "web", "a,b"], &["x", "database", ""]]),
        );
        assert_eq!(
            t,
            "ID     NAME      TAGS\n\
             web-1  web       a,b\n\
             x      database\n"
        );
    }

    #[test]
    fn table_with_no_rows_is_just_the_header() {
        assert_eq!(render_table(&["NAME", "TAGS"], &[]), "NAME  TAGS\n");
    }

    #[test]
    fn table_counts_chars_not_bytes() {
        let t = render_table(&["N", "X"], &rows(&[&["é", "1"], &["ab", "2"]]));
        assert_eq!(t, "N   X\né   1\nab  2\n");
    }

    #[test]
    fn members_table_marks_leader_and_learner() {
        let members = vec![
            Member {
                id: 1,
                name: "node1".into(),
                api_addr: "127.0.0.1:8500".into(),
                peer_addr: "127.0.0.1:8300".into(),
                voter: true,
                leader: true,
                matched_index: Some(42),
            },
            Member {
                id: 2,
                name: "node2".into(),
                api_addr: "127.0.0.1:8501".into(),
                peer_addr: "127.0.0.1:8301".into(),
                voter: false,
                leader: false,
                matched_index: None,
            },
        ];
        assert_eq!(
            members_table(&members),
            "ID  NAME   API             PEER            ROLE     LEADER  MATCHED\n\
             1   node1  127.0.0.1:8500  127.0.0.1:8300  voter    *       42\n\
             2   node2  127.0.0.1:8501  127.0.0.1:8301  learner          -\n"
        );
    }

    #[test]
    fn instances_fall_back_to_node_address() {
        let instances: Vec<Instance> = serde_json::from_value(json!([
            {"ServiceID": "web-1", "Node": "node1", "Address": "10.0.0.1",
             "ServiceAddress": "", "ServicePort": 8080, "ServiceTags": ["a"]},
            {"ServiceID": "web-2", "Node": "node2", "Address": "10.0.0.2",
             "ServiceAddress": "192.168.1.9", "ServicePort": 80, "ServiceTags": []},
        ]))
        .expect("valid instances");
        assert_eq!(
            instances_table(&instances),
            "ID     NODE   ADDRESS      PORT  TAGS\n\
             web-1  node1  10.0.0.1     8080  a\n\
             web-2  node2  192.168.1.9  80\n"
        );
    }

    #[test]
    fn status_lines_follow_spec_order_and_keep_unknown_keys() {
        let body = json!({"zeta": true, "role": "leader", "node_id": 1, "leader_id": null});
        assert_eq!(
            status_lines(&body).expect("object"),
            "node_id: 1\nrole: leader\nleader_id: -\nzeta: true\n"
        );
        assert!(status_lines(&json!([1])).is_err());
    }

    #[test]
    fn meta_splits_at_first_equals() {
        assert_eq!(parse_meta("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(parse_meta("url=a=b"), Ok(("url".into(), "a=b".into())));
        assert_eq!(parse_meta("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(parse_meta(" k =v"), Ok(("k".into(), "v".into())));
    }

    #[test]
    fn meta_rejects_missing_key_or_equals() {
        assert!(parse_meta("novalue").is_err());
        assert!(parse_meta("=v").is_err());
        assert!(parse_meta("  =v").is_err());
        assert!(parse_meta("").is_err());
    }

    fn register_args() -> RegisterArgs {
        RegisterArgs {
            name: "web".into(),
            id: None,
            address: None,
            port: None,
            tags: vec![],
            meta: vec![],
        }
    }

    #[test]
    fn register_body_leaves_out_what_was_not_given() {
        let mut args = register_args();
        assert_eq!(
            register_body(&args).expect("valid"),
            json!({"Name": "web", "Tags": [], "Meta": {}})
        );
        args.id = Some("web-1".into());
        args.port = Some(8080);
        args.address = Some("10.0.0.1".into());
        args.tags = vec!["a".into()];
        args.meta = vec![("env".into(), "prod".into())];
        assert_eq!(
            register_body(&args).expect("valid"),
            json!({"Name": "web", "ID": "web-1", "Address": "10.0.0.1", "Port": 8080,
                   "Tags": ["a"], "Meta": {"env": "prod"}})
        );
    }

    #[test]
    fn register_body_rejects_empty_name_and_duplicate_meta() {
        let mut args = register_args();
        args.meta = vec![("k".into(), "1".into()), ("k".into(), "2".into())];
        assert!(register_body(&args).is_err());
        args.meta.clear();
        args.name.clear();
        assert!(register_body(&args).is_err());
    }

    #[test]
    fn segments_are_encoded_and_dot_segments_rejected() {
        assert_eq!(encode_segment("web-1.a_b:c~"), "web-1.a_b:c~");
        assert_eq!(encode_segment("a b/c?"), "a%20b%2Fc%3F");
        assert!(check_segment("id", "").is_err());
        assert!(check_segment("id", "..").is_err());
        assert!(check_segment("id", "web").is_ok());
    }

    #[test]
    fn error_message_uses_server_message_and_retry_after() {
        let mut headers = HeaderMap::new();
        let body = r#"{"error":"bad_request","message":"Name is required"}"#;
        assert_eq!(
            error_message("h:1", StatusCode::BAD_REQUEST, &headers, body),
            "h:1 answered 400 Bad Request: Name is required"
        );
        headers.insert(RETRY_AFTER, reqwest::header::HeaderValue::from_static("1"));
        assert_eq!(
            error_message("h:1", StatusCode::SERVICE_UNAVAILABLE, &headers, "oops"),
            "h:1 answered 503 Service Unavailable: oops (retry after 1 s)"
        );
    }
}
