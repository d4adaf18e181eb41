//! `samepage`: the serverless host binary.

mod bench;
mod cgroup;
mod cleanup;
mod cli;
mod ksm;
mod measure;
mod merger;
mod resources;
mod run;
mod serve;

use std::io::Write;

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
    Run(Box<run::RunArgs>),
    /// Measures samepage: the merge path, the baselines side by side, single mechanisms.
    Bench(bench::BenchArgs),
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
        Command::Bench(args) => bench::run(args).map(|()| 0),
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
