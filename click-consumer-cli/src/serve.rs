//! The HTTP listener for operators: `/metrics` (Prometheus), `/health` (alive), `/ready`
//! (connected to both servers, not backing off); and the `healthcheck` client.

use std::{
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use click_consumer::Metrics;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

/// Binds the listener (so a taken port fails start-up) and serves it in the background.
pub(crate) async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on METRICS_ADDR {addr}"))?;
    log::info!("serving /metrics, /health and /ready on http://{addr}");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            let service = service_fn(move |request| respond(request, metrics.clone()));
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    log::debug!("metrics connection: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn respond(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, Metrics::CONTENT_TYPE, metrics.encode()),
        (&Method::GET, "/health") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        (&Method::GET, "/ready") if metrics.is_ready() => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        (&Method::GET, "/ready") => (
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
}
