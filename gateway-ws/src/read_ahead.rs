//! Socket reads in large chunks under a WebSocket codec that asks for small
//! ones.
//!
//! tungstenite reads at most its read-buffer size per call, and that buffer
//! is allocated for every connection, idle or not (the largest fixed cost of
//! an idle connection, so it is small: `limits.read_buffer_bytes`). Under
//! load a small read buffer means a `recv` system call for every one or two
//! frames. [`ReadAhead`] sits between the socket and the codec: when the
//! codec asks for less than a chunk it reads up to a whole chunk from the
//! socket and hands it out from memory. The chunk exists only while it holds
//! unread bytes, so an idle connection keeps nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose small reads are served from one large socket read.
pub struct ReadAhead<S> {
    inner: S,
    chunk: usize,
    /// Bytes read from the socket, not yet handed out. Empty (and without
    /// an allocation) whenever everything was handed out.
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    /// Reads of less than `chunk` bytes go through a chunk-sized buffer;
    /// `chunk` 0 passes every read straight to `inner`.
    pub fn new(inner: S, chunk: usize) -> Self {
        ReadAhead {
            inner,
            chunk,
            buf: BytesMut::new(),
        }
    }

    /// Unread bytes held now (0 between bursts: nothing is kept).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Allocated read-ahead capacity (0 when nothing is buffered).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn hand_out(&mut self, dst: &mut ReadBuf<'_>) {
        let n = dst.remaining().min(self.buf.len());
        dst.put_slice(&self.buf[..n]);
        if n == self.buf.len() {
            // Drained: free the chunk rather than keep it for an idle
            // connection.
            self.buf = BytesMut::new();
        } else {
            self.buf.advance(n);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            this.hand_out(dst);
            return Poll::Ready(Ok(()));
        }
        if dst.remaining() >= this.chunk || dst.remaining() == 0 {
            return Pin::new(&mut this.inner).poll_read(cx, dst);
        }
        let mut buf = BytesMut::with_capacity(this.chunk);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut buf) {
            Poll::Ready(Ok(_)) => {
                // 0 bytes read is end of stream: hand out nothing, as the
                // socket did, and keep no chunk.
                if !buf.is_empty() {
                    this.buf = buf;
                    this.hand_out(dst);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn small_reads_come_from_one_chunk_and_nothing_is_kept_after() {
        let (mut far, near) = duplex(64 * 1024);
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&sent).await.expect("write");
        let mut stream = ReadAhead::new(near, 4096);
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        // The first small read takes a whole chunk from the stream.
        let n = stream.read(&mut small).await.expect("read");
        assert_eq!(n, 100);
        got.extend_from_slice(&small[..n]);
        assert_eq!(stream.buffered(), 4096 - 100);
        while got.len() < sent.len() {
            let n = stream.read(&mut small).await.expect("read");
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent, "bytes in order, none lost or repeated");
        assert_eq!(stream.buffered(), 0);
        assert_eq!(stream.capacity(), 0, "a drained connection keeps no chunk");
    }

    #[tokio::test]
    async fn large_reads_bypass_and_end_of_stream_passes_through() {
        let (mut far, near) = duplex(64 * 1024);
        far.write_all(b"hello world").await.expect("write");
        drop(far);
        let mut stream = ReadAhead::new(near, 16);
        let mut big = [0u8; 64];
        let n = stream.read(&mut big).await.expect("read");
        assert_eq!(&big[..n], b"hello world");
        assert_eq!(stream.capacity(), 0, "a large read used no chunk");
        let mut small = [0u8; 4];
        assert_eq!(stream.read(&mut small).await.expect("eof"), 0);
        assert_eq!(stream.capacity(), 0);
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (far, near) = duplex(1024);
        let mut stream = ReadAhead::new(near, 4096);
        stream.write_all(b"ping").await.expect("write");
        stream.flush().await.expect("flush");
        let mut far = far;
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
    }
}
