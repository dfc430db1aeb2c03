//! The `bascule` command: run the balancer, or check a configuration file.
// The allocator's calls into mimalloc are the binary's only unsafe code.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bascule::{config, Server};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[allow(unsafe_code)]
mod allocator;

#[global_allocator]
static GLOBAL: allocator::Allocator = allocator::Allocator;

/// An L7 HTTP load balancer configured by one YAML file.
///
/// Signals: SIGHUP re-reads the config file and switches to it if it is valid;
/// SIGUSR1 reopens the access log file (after a log rotation); SIGTERM or
/// SIGINT stop accepting, let requests in flight finish (up to
/// shutdown_timeout) and exit, and a second one exits at once.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// The configuration file to run.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file without binding anything: prints `FILE: ok`,
    /// or every problem as FILE:LINE:COLUMN: message and exits 1.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Also print what a reload from this running config would change.
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
    },
    /// Print the configuration file's JSON Schema (draft 2020-12), for editors:
    /// a YAML language server validates and completes bascule.yaml with it.
    Schema,
}

fn main() -> ExitCode {
    allocator::tune();
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (Some(Command::Check { config, against }), _) => check(&config, against.as_deref()),
        (Some(Command::Schema), _) => {
            print!("{}", config::raw::schema_json());
            ExitCode::SUCCESS
        }
        (None, Some(config)) => run(&config),
        (None, None) => {
            eprintln!("bascule: give a configuration file with --config FILE (see --help)");
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path, against: Option<&Path>) -> ExitCode {
    match config::load(path) {
        Ok(new) => {
            println!("{}: ok", path.display());
            if let Some(old_path) = against {
                match config::load(old_path) {
                    Ok(old) => {
                        let changes = bascule::preview::preview(&old, &new);
                        if changes.is_empty() {
                            println!("no change from {}", old_path.display());
                        }
                        for line in changes {
                            println!("{line}");
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Before any thread starts: it takes variables out of the environment.
    let inherited = bascule::inherited::Inherited::from_env();
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bascule: cannot start the signal handler: {e}");
            return ExitCode::from(1);
        }
    };
    // Handlers first: a SIGHUP that came once the listeners were up but before
    // the handlers would end the process (the default action) and reset every
    // connection waiting to be accepted. Signals that come before the loop
    // below waits are kept for it.
    let signals = {
        let _runtime = rt.enter();
        Signals::new()
    };
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bascule: cannot handle signals: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        "bascule {} starting with {} ({} workers)",
        env!("CARGO_PKG_VERSION"),
        path.display(),
        config.worker_count()
    );
    for addr in inherited.addresses() {
        tracing::info!("socket activation: a socket inherited at {addr}");
    }
    let server = match Server::start_inheriting(config, Default::default(), inherited) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bascule: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        // SIGHUP reloads and SIGUSR1 reopens logs until SIGTERM or SIGINT starts the shutdown.
        loop {
            match signals.next().await {
                Sig::Reload => server.reload_from(path),
                Sig::Reopen => server.reopen_logs(),
                Sig::Stop => break,
            }
        }
        tracing::info!("shutting down: no new connections; waiting for requests in flight");
        server.shutdown();
        let mut waiting = tokio::task::spawn_blocking(move || server.wait());
        loop {
            tokio::select! {
                _ = &mut waiting => break,
                sig = signals.next() => match sig {
                    Sig::Stop => {
                        tracing::warn!("second stop signal: exiting now");
                        break;
                    }
                    // Nothing to reload into while draining; the drain goes on.
                    Sig::Reload => tracing::info!("SIGHUP ignored: shutting down"),
                    Sig::Reopen => {}
                },
            }
        }
    });
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

struct Signals {
    hup: Signal,
    usr1: Signal,
    term: Signal,
    int: Signal,
}

/// What a signal asks for.
enum Sig {
    Reload,
    Reopen,
    Stop,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.hup.recv() => Sig::Reload,
            _ = self.usr1.recv() => Sig::Reopen,
            _ = self.term.recv() => Sig::Stop,
            _ = self.int.recv() => Sig::Stop,
        }
    }
}
