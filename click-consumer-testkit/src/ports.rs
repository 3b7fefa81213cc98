//! Free loopback ports and simple TCP probes.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::process::wait_for;

/// Asks the kernel for `N` distinct free ports on 127.0.0.1, then releases them.
///
/// All listeners are held at once, so the ports differ from each other; another
/// process could still take one before the server binds it, which the servers'
/// start-up handles by retrying with fresh ports.
pub(crate) fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] = std::array::from_fn(|_| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("cannot bind a free port on 127.0.0.1: {err}"))
    });
    listeners.map(|listener| {
        listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    })
}

/// Whether a listener could bind `port` now (with SO_REUSEADDR, as the servers do).
pub(crate) fn is_bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Waits up to `timeout` until every port in `ports` is bindable.
pub(crate) fn wait_bindable(ports: &[u16], timeout: Duration) -> bool {
    wait_for(timeout, || ports.iter().all(|&port| is_bindable(port)))
}

/// Connects to 127.0.0.1:`port`, giving up after `timeout`.
pub(crate) fn connect(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}
