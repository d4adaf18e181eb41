//! The engine's knobs as command-line flags, one per entry of the engine's declaration
//! ([`samepage_dedup::KNOBS`]), flattened into `samepage run` and `samepage serve` alike.
//!
//! A flag is the knob's sysfs name with dashes (`--pages-to-scan`) and also answers to the
//! sysfs spelling (`--pages_to_scan`); its help says the range and the default. Flags carry no
//! default of their own: a flag not given leaves the knob as the layer below has it (the
//! engine's default, or the serve config's `[engine]` table), so the command line overrides
//! the file and nothing else.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use samepage_dedup::knobs::{Origin, Values};
use samepage_dedup::{KNOBS, Knob, KnobValue, Knobs};

/// The knob flags given on a command line, in the declaration's order.
#[derive(Clone, Debug, Default)]
pub struct KnobFlags {
    given: Vec<(&'static Knob, KnobValue)>,
}

impl KnobFlags {
    /// `knobs` with the given flags applied, validated as a whole (the advisor's bounds).
    pub fn apply(&self, mut knobs: Knobs) -> anyhow::Result<Knobs> {
        for (knob, value) in &self.given {
            knob.set(&mut knobs, *value).map_err(anyhow::Error::msg)?;
        }
        knobs.validate()?;
        Ok(knobs)
    }
}

fn heading(knob: &Knob) -> &'static str {
    match knob.origin {
        Origin::Ksm => "KSM knobs",
        Origin::Samepage => "samepage knobs",
    }
}

impl Args for KnobFlags {
    fn augment_args(mut command: Command) -> Command {
        for knob in KNOBS {
            let parser = move |text: &str| knob.parse(text);
            command = command.arg(
                Arg::new(knob.name)
                    .long(knob.flag())
                    .alias(knob.name)
                    .aliases(knob.old_flags)
                    .value_name(value_name(knob))
                    .value_parser(parser)
                    .action(ArgAction::Set)
                    .help(knob.help_line())
                    .help_heading(heading(knob)),
            );
        }
        command
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

fn value_name(knob: &Knob) -> &'static str {
    match knob.values {
        Values::Number(_) => "N",
        Values::Seconds(_) => "SECONDS",
        Values::Switch => "on|off",
        Values::Choice(_) => "CHOICE",
    }
}

impl FromArgMatches for KnobFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = KNOBS
            .iter()
            .filter_map(|knob| {
                matches
                    .get_one::<KnobValue>(knob.name)
                    .map(|value| (knob, *value))
            })
            .collect();
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        knobs: KnobFlags,
    }

    #[test]
    fn every_knob_is_a_flag_under_both_spellings() {
        for knob in KNOBS {
            let value = knob.display(knob.default_value());
            let value = value.split(' ').next().expect("a value");
            for spelling in [knob.flag(), knob.name.to_owned()] {
                let line = Line::try_parse_from(["x", &format!("--{spelling}={value}")])
                    .unwrap_or_else(|e| panic!("--{spelling}={value}: {e}"));
                let knobs = line.knobs.apply(Knobs::default()).expect("valid");
                assert_eq!(knobs, Knobs::default(), "--{spelling}={value}");
            }
        }
    }

    #[test]
    fn out_of_range_flags_are_refused_with_the_range() {
        let error = Line::try_parse_from(["x", "--max-page-sharing", "1"])
            .err()
            .expect("refused");
        assert!(error.to_string().contains("accepted 2 to"), "{error}");
        let line = Line::try_parse_from([
            "x",
            "--advisor-mode=scan-time",
            "--advisor-min-pages-to-scan=10",
            "--advisor-max-pages-to-scan=5",
        ])
        .expect("each in range");
        assert!(line.knobs.apply(Knobs::default()).is_err());
    }
}
