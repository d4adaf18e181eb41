//! `samepage`: the serverless host binary.

mod cgroup;
mod cli;
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
            let human_report = args.wants_report() && !json;
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
                } else if human_report && guests_on_stdout {
                    run::print_human(&finished.report, &mut std::io::stderr().lock())?;
                } else if human_report {
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use samepage_dedup::knobs::Values;
    use samepage_dedup::{KNOBS, Knob, KnobValue, Knobs};

    use super::Cli;

    /// A value of `knob` other than its default, spelled for the command line and for TOML.
    fn other_value(knob: &Knob) -> (String, String) {
        match (knob.values, knob.default_value()) {
            (Values::Number(range), KnobValue::Number(default)) => {
                let n = if default == range.min {
                    range.max
                } else {
                    range.min
                };
                (n.to_string(), n.to_string())
            }
            (Values::Seconds(range), _) => {
                let seconds = range.min as f64 / 1e3;
                (seconds.to_string(), format!("{seconds:?}"))
            }
            (Values::Switch, KnobValue::Switch(on)) => {
                (if on { "off" } else { "on" }.to_owned(), (!on).to_string())
            }
            (Values::Choice(names), KnobValue::Choice(default)) => {
                let name = names[(default + 1) % names.len()];
                (name.to_owned(), format!("{name:?}"))
            }
            (values, default) => panic!("{}: {default:?} is not one of {values}", knob.name),
        }
    }

    /// The three surfaces of a knob agree: `samepage run` and `samepage serve` have its flag
    /// with the declared help, and the serve config's `[engine]` table takes its key, each
    /// setting the same value.
    #[test]
    fn every_knob_is_a_flag_of_run_and_serve_and_a_key_of_the_serve_config() {
        let command = Cli::command();
        for knob in KNOBS {
            let (flag_value, toml_value) = other_value(knob);
            let mut expected = Knobs::default();
            knob.set(&mut expected, knob.parse(&flag_value).expect("parses"))
                .expect("in range");
            for sub in ["run", "serve"] {
                let sub = command.find_subcommand(sub).expect("a subcommand");
                let arg = sub
                    .get_arguments()
                    .find(|arg| arg.get_long() == Some(knob.flag().as_str()))
                    .unwrap_or_else(|| panic!("{}: no --{}", sub.get_name(), knob.flag()));
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert_eq!(help, knob.help_line(), "{}", knob.name);
            }
            let flag = format!("--{}={flag_value}", knob.flag());
            let run = Cli::try_parse_from(["samepage", "run", &flag, "x.wasm"])
                .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let super::Command::Run(run) = run.command else {
                panic!("run")
            };
            assert_eq!(run.knobs().expect("valid"), expected, "{flag}");
            let serve = Cli::try_parse_from(["samepage", "serve", &flag, "x.wasm"])
                .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let super::Command::Serve(serve) = serve.command else {
                panic!("serve")
            };
            assert_eq!(
                serve.knobs.apply(Knobs::default()).expect("valid"),
                expected,
                "{flag}"
            );
            let text = format!(
                "[engine]\n{} = {toml_value}\n[[function]]\nname = \"a\"\nroute = \"/\"\n\
                 component = \"a.wasm\"\n",
                knob.name
            );
            let config = crate::serve::config::parse(std::path::Path::new("/x.toml"), &text)
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(config.knobs, expected, "{text}");
        }
    }
}
