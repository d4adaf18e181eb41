//! `samepage`: the serverless host binary.

mod bench;
mod ksm;
mod measure;
mod merger;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Measures samepage: the merge path, the baselines side by side, single mechanisms.
    Bench(bench::BenchArgs),
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
        Command::Bench(args) => bench::run(args)?,
    }
    Ok(())
}
