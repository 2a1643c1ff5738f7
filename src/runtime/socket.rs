//! A connection's TCP socket after the handshake, shared by its reader, its writer and its
//! `Conn`, and the few system calls ringcast makes on a socket by hand.
//!
//! Invariant: every `unsafe` block that names a socket's descriptor is in this file, and each
//! takes the descriptor from a `&TcpStream` borrowed for the length of the call, so the stream
//! that owns the descriptor (and closes it when dropped) outlives the call. Nothing here holds
//! `&mut TcpStream`: the reader and writer both work through `&self` (readiness from monoio,
//! then a non-blocking `recv`/`send`), so they can share the stream without aliasing a
//! mutable borrow, and an idle connection holds no read or write buffer of its own.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::net::TcpStream;

/// An upgraded connection's stream. The descriptor closes when the last `Rc` goes (the reader
/// and writer hold one each); `Conn` holds a `Weak`, so cutting a connection that has already
/// ended does nothing rather than touch a descriptor number the kernel may have reused.
pub struct Socket {
    stream: TcpStream,
    /// `stream`'s descriptor, kept next to it: a write reads it without following the
    /// stream's own shared handle.
    fd: RawFd,
}

impl Socket {
    pub fn new(stream: TcpStream) -> Rc<Socket> {
        let fd = stream.as_raw_fd();
        Rc::new(Socket { stream, fd })
    }

    /// One non-blocking send of (a prefix of) `buf`.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // `fd` belongs to `self.stream`, which `&self` keeps open for this call.
        send_fd(self.fd, buf)
    }

    /// For readiness (`readable`) and `recv`.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Cuts the connection both ways: a pending read or write fails and both loops end.
    pub fn shutdown(&self) {
        // ENOTCONN once the peer is gone: nothing left to cut.
        let _ = shutdown(&self.stream, Shutdown::Both);
    }
}

/// One non-blocking send on a stream that has no `Socket` (yet): what the kernel takes now.
pub fn try_send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    send_fd(stream.as_raw_fd(), buf)
}

/// One non-blocking send on `fd`, which the caller keeps open for the call. MSG_NOSIGNAL: a
/// peer that left is an error here, never a SIGPIPE.
fn send_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is open for this call (the caller's promise); `buf` is only read.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Whether the peer closed its end: a one-byte peek reads nothing (or the socket failed).
/// What the peer sent is left where it is.
pub fn peer_closed(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: a peek of at most one byte into a local buffer on a descriptor `stream` owns.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

/// One non-blocking receive into `buf`: `Ok(0)` is the end of the stream, `WouldBlock` a
/// spurious readiness wake-up.
pub fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the descriptor belongs to `stream`, borrowed for this call, so it is open; `buf`
    // is ours, writable for its length; MSG_DONTWAIT never blocks the core.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `shutdown(2)` of one or both directions.
pub fn shutdown(stream: &TcpStream, how: Shutdown) -> io::Result<()> {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: the descriptor belongs to `stream`, borrowed for this call.
    match unsafe { libc::shutdown(stream.as_raw_fd(), how) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before the kernel gives up
/// on the connection (a peer that vanished is found without an application-level ping).
pub fn set_user_timeout(stream: &TcpStream, after: Duration) -> io::Result<()> {
    let ms = libc::c_uint::try_from(after.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the descriptor belongs to `stream`, borrowed for this call; the option value is a
    // c_uint on our stack, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
