//! `lb-agent`: see `lb-agent --help`.

use clap::Parser;
use lb_userspace::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logs(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logs(&args.log_level, args.log_format);
            // One thread for the sync and the watchers; the HTTP servers
            // run on their own (`health::HttpRuntime`), the garbage
            // collector on another.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(lb_userspace::agent::run(args))
        }
        Command::Flows(a) => {
            let out = lb_userspace::inspect::print_flows(
                &a.bpffs_root,
                a.service.as_deref(),
                a.backend.as_deref(),
                a.json,
            )?;
            print!("{out}");
            Ok(())
        }
        Command::Interfaces(a) => {
            for (iface, hook) in lb_userspace::loader::attached_interfaces(
                &lb_userspace::loader::link_dir(&a.bpffs_root),
            )? {
                println!("{iface}\tingress={}\tegress=tc", hook.name());
            }
            Ok(())
        }
        Command::Backends(a) => {
            let out =
                lb_userspace::inspect::print_backends(&a.bpffs_root, a.service.as_deref(), a.json)?;
            print!("{out}");
            Ok(())
        }
    }
}
