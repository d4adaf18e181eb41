//! `samepage`: the serverless host binary.

mod bench;
mod ksm;
mod measure;
mod merger;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};
use samepage_dedup::Knobs;

#[derive(Parser)]
#[command(
    version,
    about = "Runs many WebAssembly instances and merges their identical memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs N instances of a module, merges their memory and reports the saving.
    Run(run::RunArgs),
    /// Measures the merge path on synthetic workloads.
    Bench {
        /// Only the named workloads (A, B); all when none is given.
        #[arg(long = "workload")]
        workloads: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let json = args.json;
            let report = run::run(args)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                run::print_human(&report);
            }
        }
        Command::Bench { workloads } => {
            for workload in [bench::engine::WORKLOAD_A, bench::engine::WORKLOAD_B]
                .into_iter()
                .filter(|w| {
                    workloads.is_empty() || workloads.iter().any(|n| n.eq_ignore_ascii_case(w.name))
                })
            {
                let knobs = Knobs {
                    pages_to_scan: 1 << 16,
                    sleep: std::time::Duration::ZERO,
                    ..Knobs::default()
                };
                let figures = bench::engine::run(&workload, knobs)?;
                println!("{}", serde_json::to_string_pretty(&figures)?);
            }
        }
    }
    Ok(())
}
