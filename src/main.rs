//! The `raftmesh` binary: parses the command line, sets up tracing and hands
//! over to the library (`node::run` for `agent`, `cli::run` otherwise).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use raftmesh::cli::{ClientCommand, ClientOpts};
use raftmesh::config::AgentArgs;

// glibc malloc took about a sixth of a loaded leader's CPU (profiled under
// 64 concurrent writers); mimalloc's thread-local free lists cost far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Raft-replicated service registry with a Consul-compatible API.
#[derive(Debug, Parser)]
#[command(name = "raftmesh", version)]
struct Cli {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node.
    Agent(AgentArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received");
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workers = match &cli.cmd {
        Cmd::Agent(a) => a.workers(),
        Cmd::Client(_) => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftmesh: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.cmd {
        Cmd::Agent(args) => {
            init_tracing();
            let cfg = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("raftmesh agent: {e}");
                    return ExitCode::from(2);
                }
            };
            match raftmesh::node::run(cfg, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "node failed");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Client(cmd) => match raftmesh::cli::run(&cli.client, cmd).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("raftmesh: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
