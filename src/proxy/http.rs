//! The HTTP protocol (being written): matches a request to a route and
//! proxies it to an upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{ConnFuture, Protocol, ViewRx};

/// Serves HTTP routes.
pub struct HttpProxy {
    view: ViewRx,
}

impl HttpProxy {
    pub fn new(view: ViewRx) -> Self {
        HttpProxy { view }
    }
}

impl Protocol for HttpProxy {
    fn serve(
        self: Arc<Self>,
        conn: TcpStream,
        _peer: SocketAddr,
        _stop: CancellationToken,
    ) -> ConnFuture {
        let _ = &self.view;
        Box::pin(async move { drop(conn) })
    }
}
