//! `samepage`: the serverless host binary.

mod cgroup;
mod cli;
mod merger;
mod resources;
mod run;
mod serve;

use std::io::Write;

use clap::{Parser, Subcommand};
// What serve, run and the lab measure, in the runtime they share.
use samepage_runtime::measure;

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
    Run(Box<run::RunArgs>),
    /// Measures samepage: the merge path, the baselines side by side, single mechanisms.
    #[cfg(feature = "bench")]
    Bench(samepage_lab::BenchArgs),
    /// `samepage bench` in a build without the lab: refused, saying how to build it.
    #[cfg(not(feature = "bench"))]
    #[command(hide = true, disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        _args: Vec<String>,
    },
    /// The serverless host: serves wasi:http components and WAGI commands over HTTP, their
    /// instances kept warm and merged, within a memory budget.
    Serve(Box<serve::ServeArgs>),
}

fn main() {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(mut args) => {
            args.split_program();
            let json = args.json;
            // stdout is the guests' when their output is shown, as under `wasmtime run`: the
            // report for a reader then goes to stderr.
            let guests_on_stdout = args.guest_output_on_stdout();
            run::run(*args).and_then(|finished| {
                for problem in &finished.report.problems {
                    eprintln!("samepage: {problem}");
                }
                if json {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", serde_json::to_string(&finished.report)?)?;
                } else if guests_on_stdout {
                    run::print_human(&finished.report, &mut std::io::stderr().lock())?;
                } else {
                    run::print_human(&finished.report, &mut std::io::stdout().lock())?;
                }
                Ok(finished.exit_code)
            })
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => samepage_lab::run(args).map(|()| 0),
        #[cfg(not(feature = "bench"))]
        Command::Bench { .. } => Err(anyhow::anyhow!(
            "`samepage bench` is the lab's, which this build leaves out: build with \
             `--features bench` (`cargo run --release --features bench -- bench ...`)"
        )),
        Command::Serve(args) => serve::serve(*args).map(|()| 0),
    };
    match status {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {}", cli::causes_once(&error));
            std::process::exit(1);
        }
    }
}
