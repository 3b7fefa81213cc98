//! The HTTP listener for operators: `/metrics` (Prometheus), `/health` (alive), `/ready`
//! (connected to both servers, not backing off), each also for HEAD; and the `healthcheck`
//! client. `/metrics` answers the classic text format 0.0.4 unless the `Accept` header
//! prefers OpenMetrics. Slow or idle clients are cut off and connections are capped.

use std::{
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use click_consumer::Metrics;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

/// Parses `METRICS_ADDR`; `None` when disabled (`off`, `none`, `false`, empty).
pub(crate) fn parse_addr(value: &str) -> anyhow::Result<Option<SocketAddr>> {
    let value = value.trim();
    if matches!(
        value.to_ascii_lowercase().as_str(),
        "" | "off" | "none" | "false" | "disabled"
    ) {
        return Ok(None);
    }
    value.parse().map(Some).with_context(|| {
        format!(
            "invalid setting METRICS_ADDR: `{value}` is not an address like 0.0.0.0:9090 (or `off`)"
        )
    })
}

/// Longest a client may take to send a request's headers, and longest a kept-alive
/// connection may wait idle for its next request (hyper times both from the moment it
/// waits for a request head).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest any one connection may stay open, whatever it does (a slow body, a client
/// that reads its response slowly).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Connections served at once; further clients wait in the listen backlog until one
/// closes (a scraper or a probe needs one or two).
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS...) before the next one, so a
/// lack of file descriptors does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Failed accepts are logged at warn at most this often (at debug otherwise).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Binds the listener (so a taken port fails start-up) and serves it in the background.
pub(crate) async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on METRICS_ADDR {addr}"))?;
    log::info!("serving /metrics, /health and /ready on http://{addr}");
    tokio::spawn(serve(listener, metrics));
    Ok(())
}

async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<Instant> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // At warn at most every ACCEPT_WARN_EVERY, not ten lines a second.
                if last_warning.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    log::warn!(
                        "metrics listener: cannot accept a connection: {e}; retrying every {ACCEPT_ERROR_PAUSE:?}"
                    );
                    last_warning = Some(Instant::now());
                } else {
                    log::debug!("metrics listener: cannot accept a connection: {e}");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = service_fn(move |request| respond(request, metrics.clone()));
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => log::debug!("metrics connection: {e}"),
                Err(_) => log::debug!("metrics connection: closed after {CONNECTION_LIFETIME:?}"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

/// Which exposition format a scraper asked for.
#[derive(Debug, PartialEq, Eq)]
enum Format {
    /// The classic text format 0.0.4: for `text/plain`, `*/*` and no `Accept` at all.
    Classic,
    /// OpenMetrics, when preferred by the `Accept` header's q-values.
    OpenMetrics,
}

/// Reads an `Accept` header: OpenMetrics only when its best q-value beats that of the
/// classic format (`text/plain`, `text/*`, `*/*`), which is also the answer for no header.
/// Prometheus asks for both and weighs OpenMetrics higher.
fn negotiate(accept: Option<&str>) -> Format {
    let (mut openmetrics, mut classic) = (0.0_f32, 0.0_f32);
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => classic = classic.max(q),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics > classic {
        Format::OpenMetrics
    } else {
        Format::Classic
    }
}

async fn respond(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let accept = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            match negotiate(accept) {
                Format::OpenMetrics => (StatusCode::OK, Metrics::CONTENT_TYPE, metrics.encode()),
                Format::Classic => (
                    StatusCode::OK,
                    Metrics::CLASSIC_CONTENT_TYPE,
                    metrics.encode_classic(),
                ),
            }
        }
        (&Method::GET | &Method::HEAD, "/health") => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&Method::GET | &Method::HEAD, "/ready") if metrics.is_ready() => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        (&Method::GET | &Method::HEAD, "/ready") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: connecting or backing off\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    // hyper sends no body to a HEAD request, and keeps the Content-Length of the GET.
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

/// `click-consumer healthcheck`: GET /health on this host's listener, for Docker.
pub(crate) fn healthcheck(addr: &str) -> anyhow::Result<()> {
    let Some(mut addr) = parse_addr(addr)? else {
        anyhow::bail!("METRICS_ADDR is off: there is no /health to check");
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("nothing answers on {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "unhealthy: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_can_be_disabled() {
        assert_eq!(parse_addr("off").unwrap(), None);
        assert_eq!(parse_addr("").unwrap(), None);
        assert_eq!(
            parse_addr("0.0.0.0:9090").unwrap(),
            Some("0.0.0.0:9090".parse().unwrap())
        );
        let err = parse_addr("localhost").unwrap_err().to_string();
        assert!(err.contains("METRICS_ADDR"), "{err}");
    }

    #[test]
    fn accept_header_picks_the_format() {
        let cases = [
            (None, Format::Classic),
            (Some(""), Format::Classic),
            (Some("*/*"), Format::Classic),
            (Some("text/plain"), Format::Classic),
            (Some("text/plain; version=0.0.4"), Format::Classic),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                Format::OpenMetrics,
            ),
            // Prometheus 2.42's header.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            // Prometheus with scrape_protocols preferring the classic format.
            (
                Some(
                    "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5",
                ),
                Format::Classic,
            ),
            (
                Some("application/openmetrics-text;q=0,text/plain;q=0.1"),
                Format::Classic,
            ),
            (
                Some("APPLICATION/OpenMetrics-Text;Q=0.8, */*;q=0.2"),
                Format::OpenMetrics,
            ),
            (Some("application/json"), Format::Classic),
        ];
        for (accept, expected) in cases {
            assert_eq!(negotiate(accept), expected, "Accept: {accept:?}");
        }
    }
}
