//! Accepted connections, for both listeners: a cap on how many are open, a back-off when
//! `accept` fails, and timeouts that close connections which send nothing.
//!
//! Without these, 1,000 idle connections stayed open for ever, and at the file-descriptor
//! limit `accept` failed in a tight loop at 100 % of a core while real Checks failed. Now a
//! connection must send its first byte within `header_read_timeout` and is closed after
//! `idle_timeout` without a byte either way; at `max_connections` no further connection is
//! accepted (the kernel's backlog holds them) until one closes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};

/// Connection limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time from accept to the connection's first byte (for TLS, its ClientHello).
    pub header_read_timeout: Duration,
    /// Time without a byte read or written after which a connection is closed.
    pub idle_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Longest pause between `accept` attempts while they fail.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` until the receiver is dropped. TCP_NODELAY is set on each:
/// a response split over two writes would otherwise wait for Envoy's delayed ACK.
pub fn accept(
    listener: TcpListener,
    settings: Settings,
) -> mpsc::Receiver<(Conn<TcpStream>, std::net::SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    tokio::spawn(async move {
        let mut backoff = Duration::ZERO;
        loop {
            // At the cap, wait for a connection to close before accepting another.
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((tcp, addr)) => {
                    backoff = Duration::ZERO;
                    let _ = tcp.set_nodelay(true);
                    let conn = Conn::new(tcp, permit, settings);
                    if tx.send((conn, addr)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // EMFILE and friends: spinning would only burn the core real Checks need.
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_BACKOFF);
                    tracing::warn!(error = %e, backoff = ?backoff, "accept failed; backing off");
                    drop(permit);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    });
    rx
}

/// An accepted connection: holds its place under `max_connections` for as long as it lives, and
/// reads as closed once it has been silent too long.
pub struct Conn<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    /// Fires at the current deadline; re-armed lazily from `last_activity`.
    timer: Pin<Box<Sleep>>,
    last_activity: Instant,
    seen_bytes: bool,
    settings: Settings,
}

impl<T> Conn<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, settings: Settings) -> Conn<T> {
        let now = Instant::now();
        Conn {
            inner,
            _permit: permit,
            timer: Box::pin(tokio::time::sleep_until(now + settings.header_read_timeout)),
            last_activity: now,
            seen_bytes: false,
            settings,
        }
    }

    fn deadline(&self) -> Instant {
        if self.seen_bytes {
            self.last_activity + self.settings.idle_timeout
        } else {
            self.last_activity + self.settings.header_read_timeout
        }
    }

    /// Ready once the connection has been silent past its deadline. Activity only records the
    /// time; the timer is moved when it fires early, so the hot path never touches the wheel.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.seen_bytes = true;
                    this.last_activity = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.poll_expired(cx) {
                // Read as end of stream: the server closes the connection as if the peer had.
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = ready!(Pin::new(&mut this.inner).poll_write(cx, data));
        if matches!(result, Ok(n) if n > 0) {
            this.last_activity = Instant::now();
        }
        Poll::Ready(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs));
        if matches!(result, Ok(n) if n > 0) {
            this.last_activity = Instant::now();
        }
        Poll::Ready(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Conn<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// An axum listener over connections handed out on a channel: [`accept`]ed ones, or TLS
/// streams from [`crate::tls::Tls::incoming`].
pub struct Listener<Io> {
    rx: mpsc::Receiver<(Io, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl<Io> Listener<Io> {
    pub fn from_channel(
        rx: mpsc::Receiver<(Io, std::net::SocketAddr)>,
        local: std::net::SocketAddr,
    ) -> Listener<Io> {
        Listener { rx, local }
    }
}

impl Listener<Conn<TcpStream>> {
    pub fn new(listener: TcpListener, settings: Settings) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Listener::from_channel(accept(listener, settings), local))
    }
}

impl<Io> axum::serve::Listener for Listener<Io>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
