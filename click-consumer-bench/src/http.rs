//! A minimal HTTP GET for the consumer's `/metrics` and `/ready` on 127.0.0.1.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// `(status, body)` of `GET path` on `127.0.0.1:port`.
pub(crate) fn get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub(crate) fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name))
                .then(|| fields.next()?.parse().ok())
                .flatten()
        })
}

/// A free TCP port on 127.0.0.1 (free when asked; taken by the next process to bind it).
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn reads_unlabelled_samples() {
        let text = "# TYPE click_consumer_inserts counter\n\
                    click_consumer_inserts_total 20\n\
                    click_consumer_messages_unacked 0\n\
                    click_consumer_messages_dead_lettered_total{reason=\"not_json\"} 3\n";
        assert_eq!(metric(text, "click_consumer_inserts_total"), Some(20.0));
        assert_eq!(metric(text, "click_consumer_messages_unacked"), Some(0.0));
        assert_eq!(metric(text, "click_consumer_inserts"), None);
    }
}
