//! Routes as replicated configuration: `PUT`/`GET`/`DELETE /v1/routes/{name}` through any
//! node, visible on every node, watchable with a blocking query, kept across a restart, and
//! bad definitions refused with a clear 400. (The proxy that uses them is separate.) Real
//! processes on port 0, one temp data dir per node.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::Cluster;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_replicate_wake_watchers_survive_restarts_and_refuse_bad_input() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let billing = json!({
            "protocol": "http",
            "match": {"path_prefix": "/billing", "method": "GET", "headers": {"x-env": "prod"}},
            "service": "billing", "tags": ["v2"], "lb": "least_connections",
            "strip_prefix": true, "connect_timeout": "1s", "request_timeout": "5s", "retries": 2,
        });
        let put = c
            .put_json(1, "/v1/routes/billing", &billing)
            .await?
            .expect_200("put billing")?;
        let stored = put.json()?;
        ensure!(
            stored["name"] == "billing" && stored["lb"] == "least_connections",
            "{stored}"
        );
        let created = stored["create_index"].as_u64().context("create_index")?;

        // Default reads on another node see it at once (read barrier).
        let got = c
            .get(3, "/v1/routes/billing")
            .await?
            .expect_200("get on node 3")?;
        let index = got.index()?;
        let v = got.json()?;
        ensure!(
            v["match"]["path_prefix"] == "/billing" && v["retries"] == 2,
            "node 3: {v}"
        );

        // A blocking list on node 3 wakes when node 2 changes a route.
        let watch = {
            let url = c.url(3, &format!("/v1/routes?index={index}&wait=20s"))?;
            let http = c.client().clone();
            tokio::spawn(async move { http.get(url).send().await?.json::<Value>().await })
        };
        let tcp = json!({"protocol": "tcp", "listen_port": 19000, "service": "db"});
        c.put_json(2, "/v1/routes/db", &tcp)
            .await?
            .expect_200("put db")?;
        let listed = tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .context("the blocking route list did not wake")???;
        let names: Vec<&str> = listed
            .as_array()
            .context("list")?
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        ensure!(names == ["billing", "db"], "listed {names:?}");

        // Replacing keeps create_index; bad definitions change nothing.
        let mut billing2 = billing.clone();
        billing2["retries"] = json!(3);
        let v = c
            .put_json(3, "/v1/routes/billing", &billing2)
            .await?
            .expect_200("replace")?
            .json()?;
        ensure!(
            v["create_index"] == created && v["retries"] == 3,
            "replaced: {v}"
        );
        let bad: Vec<(&str, &str, Value)> = vec![
            (
                "unknown field",
                "x",
                json!({"protocol": "http", "service": "a", "lbb": "random"}),
            ),
            (
                "tcp without port",
                "x",
                json!({"protocol": "tcp", "service": "a"}),
            ),
            (
                "port taken",
                "db2",
                json!({"protocol": "tcp", "listen_port": 19000, "service": "a"}),
            ),
            (
                "hash without header",
                "x",
                json!({"protocol": "http", "service": "a", "lb": "consistent_hash"}),
            ),
            (
                "bad protocol",
                "x",
                json!({"protocol": "udp", "service": "a"}),
            ),
            (
                "bad name",
                "a%20b",
                json!({"protocol": "http", "service": "a"}),
            ),
        ];
        for (what, name, body) in bad {
            let r = c.put_json(1, &format!("/v1/routes/{name}"), &body).await?;
            ensure!(r.status == 400, "{what}: {} {}", r.status, r.body);
            ensure!(r.json()?["message"].is_string(), "{what}: no message");
        }
        let all: Value = c.get(2, "/v1/routes").await?.expect_200("list")?.json()?;
        ensure!(
            all.as_array().map(Vec::len) == Some(2),
            "bad input stored something: {all}"
        );

        // Routes are in the state machine: they survive a restart of every node.
        for id in c.ids() {
            c.signal(id, "TERM")?;
            let st = c.wait_exit(id, Duration::from_secs(20)).await?;
            ensure!(st.success(), "node {id} exited {st:?}");
        }
        for id in c.ids() {
            c.spawn(id)?;
        }
        for id in c.ids() {
            c.wait_ready(id).await?;
        }
        c.wait_for_leader(&c.ids()).await?;
        let v = c
            .get(1, "/v1/routes/billing")
            .await?
            .expect_200("after restart")?
            .json()?;
        ensure!(v["retries"] == 3, "after restart: {v}");

        let del = c
            .send("delete db", c.client().delete(c.url(2, "/v1/routes/db")?))
            .await?;
        ensure!(
            del.status == 200 && del.body.trim() == "true",
            "delete: {} {}",
            del.status,
            del.body
        );
        let gone = c.get(1, "/v1/routes/db").await?;
        ensure!(
            gone.status == 404 && gone.index()? >= del.index()?,
            "after delete: {}",
            gone.status
        );
        let again = c
            .send(
                "delete db again",
                c.client().delete(c.url(3, "/v1/routes/db")?),
            )
            .await?;
        ensure!(again.status == 404, "second delete: {}", again.status);
        Ok(())
    }
    .await;
    c.finish(r)
}
