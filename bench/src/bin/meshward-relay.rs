//! The benchmark's floor: a plain TCP relay with no TLS, no HTTP and no
//! policy. Two of them in a row (`--targets relay`) cost what any
//! epoll-based proxy pair pays the kernel on this machine just to move
//! the bytes: the wake-ups, context switches and socket calls. What a
//! proxy costs above this floor is its own work. See `bench/README.md`.
//!
//! One thread, a current-thread tokio runtime, like a proxy started with
//! one worker thread. It connects to `--upstream` for every accepted
//! connection and copies both ways until either side closes.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

/// Plain TCP relay: the floor of the proxy benchmark.
#[derive(Debug, Parser)]
#[command(name = "meshward-relay", version)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address to connect to for every accepted connection.
    #[arg(long)]
    upstream: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshward-relay: building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshward-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "meshward-relay: {} -> {}",
        listener.local_addr()?,
        args.upstream
    );
    loop {
        let (down, _) = listener.accept().await?;
        tokio::spawn(relay(down, args.upstream));
    }
}

async fn relay(mut down: TcpStream, upstream: SocketAddr) {
    let mut up = match TcpStream::connect(upstream).await {
        Ok(up) => up,
        Err(e) => {
            eprintln!("meshward-relay: connecting to {upstream}: {e}");
            return;
        }
    };
    if down.set_nodelay(true).is_err() || up.set_nodelay(true).is_err() {
        return;
    }
    // Errors end the connection; a reset from the load generator at the
    // end of a run is normal.
    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
}
