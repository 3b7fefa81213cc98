//! The consumer running inside an application, next to its web server: one runtime, one
//! logger, one shutdown (Ctrl-C cancels a token that both watch).
//!
//! ```sh
//! RABBITMQ_URL=amqp://guest:guest@localhost:5672/ CLICKHOUSE_HOST=localhost \
//!     cargo run -p click-consumer --example consumer_beside_web_server
//! curl http://127.0.0.1:8081/metrics
//! ```
//!
//! The app serves the consumer's metrics on its own port and gets a callback after each
//! committed batch (here: forwarded to a channel and logged). `EXAMPLE_SELF_TEST=1`
//! publishes 200 clicks, waits until they are committed, and exits (used by CI).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use click_consumer::{ClickEvent, ClickPublisher, CommitReport, Config, Consumer, Metrics};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn web_server(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
        };
        let metrics = metrics.clone();
        let service = service_fn(move |_request: Request<Incoming>| {
            let body = metrics.encode();
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let self_test = std::env::var_os("EXAMPLE_SELF_TEST").is_some();
    let config = Config::from_env()?;
    let shutdown = CancellationToken::new();

    // The consumer reports each committed batch to the app through a channel.
    let (commits_tx, mut commits) = tokio::sync::mpsc::unbounded_channel::<CommitReport>();
    let consumer = Consumer::new(config.clone())?.on_commit(move |report| {
        let _ = commits_tx.send(report.clone());
    });
    let listener = TcpListener::bind(if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:8081"
    })
    .await?;
    log::info!("app metrics on http://{}/metrics", listener.local_addr()?);
    let web = tokio::spawn(web_server(listener, consumer.metrics(), shutdown.clone()));

    let trigger = shutdown.clone();
    let expected = if self_test { 200 } else { usize::MAX };
    tokio::spawn(async move {
        let mut committed = 0;
        while let Some(report) = commits.recv().await {
            committed += report.rows;
            log::info!(
                "committed {} rows ({} in all, {} dead-lettered in this batch)",
                report.rows,
                committed,
                report.dead_lettered
            );
            if committed >= expected {
                trigger.cancel();
            }
        }
    });
    if self_test {
        let publisher = ClickPublisher::connect(&config).await?;
        let clicks: Vec<ClickEvent> = (0..200)
            .map(|i| ClickEvent::now(format!("app{i}")))
            .collect();
        publisher.publish_all(&clicks).await?;
        publisher.close().await?;
    } else {
        let ctrl_c = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            ctrl_c.cancel();
        });
    }

    let summary = tokio::time::timeout(
        if self_test {
            Duration::from_secs(60)
        } else {
            Duration::MAX
        },
        consumer.run(shutdown.cancelled()),
    )
    .await
    .map_err(|_| "the self-test did not finish within 60 s")??;
    web.await?;
    log::info!("consumer stopped: {summary:?}");
    if self_test {
        assert_eq!(summary.stored, 200, "every published click was stored");
    }
    Ok(())
}
