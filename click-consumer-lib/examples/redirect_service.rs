//! A minimal URL shortener redirect service that publishes one click per redirect.
//!
//! ```sh
//! RABBITMQ_URL=amqp://guest:guest@localhost:5672/ cargo run -p click-consumer --example redirect_service
//! curl -i http://127.0.0.1:8080/docs
//! ```
//!
//! The handler answers the redirect at once and publishes the click in the background:
//! a slow broker never slows a redirect, and a failed publish is logged. One
//! `ClickPublisher` (one connection, one channel) is shared by every request.
//! `EXAMPLE_SELF_TEST=1` makes it send itself a few requests and exit (used by CI).

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use click_consumer::{ClickEvent, ClickPublisher, Config};
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// The shortener's links; a real one reads them from its database.
fn links() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        ("docs", "https://docs.rs/click-consumer"),
        ("rust", "https://www.rust-lang.org/"),
    ])
}

struct App {
    links: HashMap<&'static str, &'static str>,
    publisher: ClickPublisher,
    published: tokio::sync::Mutex<JoinSet<()>>,
}

async fn redirect(
    app: Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let code = request.uri().path().trim_start_matches('/');
    let Some(&target) = app.links.get(code) else {
        let mut response = Response::new(Empty::new());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    };
    let header_text = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let click = ClickEvent::now(code)
        .with_user_agent(header_text(header::USER_AGENT))
        .with_referrer(header_text(header::REFERER))
        .with_ip_address(peer.ip().to_string())
        .with_original_url(target);
    let publisher = app.publisher.clone();
    app.published.lock().await.spawn(async move {
        if let Err(e) = publisher.publish(&click).await {
            log::error!("click on {} not recorded: {e}", click.short_code);
        }
    });
    let mut response = Response::new(Empty::new());
    *response.status_mut() = StatusCode::FOUND;
    response
        .headers_mut()
        .insert(header::LOCATION, header::HeaderValue::from_static(target));
    Ok(response)
}

async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| redirect(app.clone(), peer, request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends `GET /<code>` and returns the status line.
async fn get(addr: SocketAddr, code: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /{code} HTTP/1.1\r\nHost: x\r\nUser-Agent: self-test\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    Ok(reply.lines().next().unwrap_or_default().to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let self_test = std::env::var_os("EXAMPLE_SELF_TEST").is_some();
    let addr = if self_test {
        "127.0.0.1:0".to_owned()
    } else {
        std::env::var("EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned())
    };
    let publisher = ClickPublisher::connect(&Config::from_env()?).await?;
    let app = Arc::new(App {
        links: links(),
        publisher: publisher.clone(),
        published: Default::default(),
    });
    let listener = TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    log::info!("redirecting on http://{local}/docs and http://{local}/rust");
    let server = tokio::spawn(serve(listener, app.clone()));
    if !self_test {
        tokio::signal::ctrl_c().await?;
    } else {
        for code in ["docs", "rust", "docs", "nope"] {
            let status = get(local, code).await?;
            log::info!("GET /{code}: {status}");
            let expected = if code == "nope" { "404" } else { "302" };
            assert!(status.contains(expected), "GET /{code} answered {status}");
        }
    }
    server.abort();
    // Let the clicks in flight be confirmed before closing the connection.
    let mut published = std::mem::take(&mut *app.published.lock().await);
    while published.join_next().await.is_some() {}
    publisher.close().await?;
    Ok(())
}
