//! Each knob declared once: its name, whether KSM has it, the values it takes, its unit, its
//! help, and how it reads and writes [`Knobs`].
//!
//! Surfaces are derived from [`KNOBS`], never written out by hand: a command line makes one
//! flag per entry (`--pages-to-scan`, also answering to the sysfs spelling `--pages_to_scan`),
//! a config file one key per entry (`pages_to_scan = 100`), and both parse a value with
//! [`Knob::parse`] (text) or [`Knob::number`] / [`Knob::switch`] (typed values), so the
//! ranges, the spellings of choices and the errors are the same everywhere. Ranges are checked
//! when a value is parsed; what spans knobs (the advisor's minimum at most its maximum) is
//! checked by [`Knobs::validate`] once all are set.

use std::fmt;
use std::time::Duration;

use super::{AdvisorMode, KnobRange, Knobs, RunMode, millis};

/// Where a knob comes from: KSM's sysfs files, under the same name, or samepage alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Ksm,
    Samepage,
}

/// The values a knob takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    /// A whole number within the range, in the range's unit.
    Number(KnobRange),
    /// Seconds, possibly fractional, whose value in milliseconds lies within the range.
    Seconds(KnobRange),
    /// On or off: `1`/`0`, `on`/`off`, `yes`/`no`, `y`/`n`, `true`/`false`.
    Switch,
    /// One of these names; KSM's `run` also takes each by its index (`0`, `1`, `2`).
    Choice(&'static [&'static str]),
}

/// A parsed value of one knob.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KnobValue {
    Number(u64),
    Seconds(f64),
    Switch(bool),
    /// The index of the choice in [`Values::Choice`].
    Choice(usize),
}

/// One knob: everything a surface says of it.
pub struct Knob {
    /// The name, as in `/sys/kernel/mm/ksm/` where KSM has the knob; the config key is the
    /// same, the flag the same with dashes.
    pub name: &'static str,
    pub origin: Origin,
    pub values: Values,
    /// One line for `--help` and the docs; the range and the default are added to it.
    pub help: &'static str,
    /// Spellings of earlier versions, still accepted on the command line and not shown.
    pub old_flags: &'static [&'static str],
    get: fn(&Knobs) -> KnobValue,
    set: fn(&mut Knobs, KnobValue),
}

impl fmt::Debug for Knob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Knob").field("name", &self.name).finish()
    }
}

const RUN_CHOICES: &[&str] = &["stop", "merge", "unmerge"];
const ADVISOR_CHOICES: &[&str] = &["none", "scan-time"];

/// The value as a whole number. [`Knob::set`] lets through only values of the knob's own
/// kind, so each setter sees the variant it expects; the conversion is total all the same,
/// so that no value can make a setter panic.
fn number(value: KnobValue) -> u64 {
    match value {
        KnobValue::Number(n) => n,
        KnobValue::Seconds(seconds) => seconds as u64,
        KnobValue::Switch(on) => u64::from(on),
        KnobValue::Choice(index) => index as u64,
    }
}

fn seconds(value: KnobValue) -> f64 {
    match value {
        KnobValue::Seconds(seconds) => seconds,
        other => number(other) as f64,
    }
}

fn switch(value: KnobValue) -> bool {
    number(value) != 0
}

fn choice(value: KnobValue) -> usize {
    number(value) as usize
}

/// Every knob, in the order `--help` lists them: KSM's first, as its sysfs directory has them.
pub static KNOBS: &[Knob] = &[
    Knob {
        name: "run",
        origin: Origin::Ksm,
        values: Values::Choice(RUN_CHOICES),
        help: "1 merges, 0 stops the scanner (what is merged stays), 2 unmerges everything",
        old_flags: &[],
        get: |k| {
            KnobValue::Choice(match k.run {
                RunMode::Stop => 0,
                RunMode::Merge => 1,
                RunMode::UnmergeAll => 2,
            })
        },
        set: |k, v| {
            k.run = [RunMode::Stop, RunMode::Merge, RunMode::UnmergeAll][choice(v)];
        },
    },
    Knob {
        name: "pages_to_scan",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::PAGES_TO_SCAN),
        help: "pages the scanner looks at per batch",
        old_flags: &[],
        get: |k| KnobValue::Number(k.pages_to_scan as u64),
        set: |k, v| k.pages_to_scan = number(v) as usize,
    },
    Knob {
        name: "sleep_millisecs",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::SLEEP_MILLISECS),
        help: "pause between batches",
        old_flags: &["sleep-ms"],
        get: |k| KnobValue::Number(millis(k.sleep)),
        set: |k, v| k.sleep = Duration::from_millis(number(v)),
    },
    Knob {
        name: "max_page_sharing",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::MAX_PAGE_SHARING),
        help: "most pages that may share one stable page",
        old_flags: &[],
        get: |k| KnobValue::Number(u64::from(k.max_page_sharing)),
        set: |k, v| k.max_page_sharing = number(v) as u32,
    },
    Knob {
        name: "use_zero_pages",
        origin: Origin::Ksm,
        values: Values::Switch,
        help: "free pages of zeros instead of merging them",
        old_flags: &["zero-pages"],
        get: |k| KnobValue::Switch(k.use_zero_pages),
        set: |k, v| k.use_zero_pages = switch(v),
    },
    Knob {
        name: "smart_scan",
        origin: Origin::Ksm,
        values: Values::Switch,
        help: "skip pages that keep failing to merge for exponentially more passes",
        old_flags: &[],
        get: |k| KnobValue::Switch(k.smart_scan),
        set: |k, v| k.smart_scan = switch(v),
    },
    Knob {
        name: "advisor_mode",
        origin: Origin::Ksm,
        values: Values::Choice(ADVISOR_CHOICES),
        help: "scan-time tunes pages_to_scan to meet advisor_target_scan_time",
        old_flags: &[],
        get: |k| KnobValue::Choice(usize::from(k.advisor_mode == AdvisorMode::ScanTime)),
        set: |k, v| {
            k.advisor_mode = [AdvisorMode::None, AdvisorMode::ScanTime][choice(v)];
        },
    },
    Knob {
        name: "advisor_target_scan_time",
        origin: Origin::Ksm,
        values: Values::Seconds(Knobs::ADVISOR_TARGET_SCAN_TIME),
        help: "the advisor's target time for a full pass",
        old_flags: &[],
        get: |k| KnobValue::Seconds(k.advisor.target_scan_time.as_secs_f64()),
        set: |k, v| k.advisor.target_scan_time = Duration::from_secs_f64(seconds(v)),
    },
    Knob {
        name: "advisor_max_cpu",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::ADVISOR_MAX_CPU),
        help: "most of one core the advisor lets the scanner use",
        old_flags: &[],
        get: |k| KnobValue::Number(u64::from(k.advisor.max_cpu_percent)),
        set: |k, v| k.advisor.max_cpu_percent = number(v) as u8,
    },
    Knob {
        name: "advisor_min_pages_to_scan",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::ADVISOR_PAGES_TO_SCAN),
        help: "the advisor's lowest pages_to_scan",
        old_flags: &[],
        get: |k| KnobValue::Number(k.advisor.min_pages_to_scan as u64),
        set: |k, v| k.advisor.min_pages_to_scan = number(v) as usize,
    },
    Knob {
        name: "advisor_max_pages_to_scan",
        origin: Origin::Ksm,
        values: Values::Number(Knobs::ADVISOR_PAGES_TO_SCAN),
        help: "the advisor's highest pages_to_scan",
        old_flags: &[],
        get: |k| KnobValue::Number(k.advisor.max_pages_to_scan as u64),
        set: |k, v| k.advisor.max_pages_to_scan = number(v) as usize,
    },
    Knob {
        name: "scan_on_park",
        origin: Origin::Samepage,
        values: Values::Switch,
        help: "look at an instance's memory as soon as it stops running",
        old_flags: &[],
        get: |k| KnobValue::Switch(k.scan_on_park),
        set: |k, v| k.scan_on_park = switch(v),
    },
    Knob {
        name: "merge_running",
        origin: Origin::Samepage,
        values: Values::Switch,
        help: "merge instances while their code runs, write-protecting a few pages at a time",
        old_flags: &[],
        get: |k| KnobValue::Switch(k.merge_running),
        set: |k, v| k.merge_running = switch(v),
    },
    Knob {
        name: "merge_running_after_millisecs",
        origin: Origin::Samepage,
        values: Values::Number(Knobs::MERGE_RUNNING_AFTER_MILLISECS),
        help: "how long a call must have run before its instance is merged while it runs",
        old_flags: &[],
        get: |k| KnobValue::Number(millis(k.merge_running_after)),
        set: |k, v| k.merge_running_after = Duration::from_millis(number(v)),
    },
    Knob {
        name: "park_recheck_millisecs",
        origin: Origin::Samepage,
        values: Values::Number(Knobs::PARK_RECHECK_MILLISECS),
        help: "how long after a park the scanner looks again",
        old_flags: &[],
        get: |k| KnobValue::Number(millis(k.park_recheck)),
        set: |k, v| k.park_recheck = Duration::from_millis(number(v)),
    },
    Knob {
        name: "map_budget_percent",
        origin: Origin::Samepage,
        values: Values::Number(Knobs::MAP_BUDGET_PERCENT),
        help: "share of vm.max_map_count the engine's own mappings may use",
        old_flags: &[],
        get: |k| KnobValue::Number(u64::from(k.map_budget_percent)),
        set: |k, v| k.map_budget_percent = number(v) as u8,
    },
];

impl Knob {
    /// The command-line flag, without its dashes: the name with `-` for `_`.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// This knob's value in `knobs`.
    pub fn get(&self, knobs: &Knobs) -> KnobValue {
        (self.get)(knobs)
    }

    /// Sets this knob in `knobs` to `value`, refusing a value of another kind or out of
    /// range, as the parsers would.
    pub fn set(&self, knobs: &mut Knobs, value: KnobValue) -> Result<(), String> {
        let checked = match (value, self.values) {
            (KnobValue::Number(n), Values::Number(_)) => self.number(n)?,
            (KnobValue::Seconds(seconds), Values::Seconds(_)) => self.seconds(seconds)?,
            (KnobValue::Choice(index), Values::Choice(_)) => self.number(index as u64)?,
            (KnobValue::Switch(_), Values::Switch) => value,
            _ => {
                return Err(format!(
                    "{} = {value:?}: expected {}",
                    self.name, self.values
                ));
            }
        };
        (self.set)(knobs, checked);
        Ok(())
    }

    /// The default, as [`Knobs::default`] has it.
    pub fn default_value(&self) -> KnobValue {
        self.get(&Knobs::default())
    }

    /// Parses a value written as text (a flag's argument), with the spellings the knob takes.
    pub fn parse(&self, text: &str) -> Result<KnobValue, String> {
        let text = text.trim();
        match self.values {
            Values::Number(_) => {
                let n = text
                    .parse::<u64>()
                    .map_err(|_| format!("{} = {text:?}: expected a whole number", self.name))?;
                self.number(n)
            }
            Values::Seconds(_) => {
                let seconds = text
                    .parse::<f64>()
                    .map_err(|_| format!("{} = {text:?}: expected seconds", self.name))?;
                self.seconds(seconds)
            }
            Values::Switch => match text.to_ascii_lowercase().as_str() {
                "1" | "on" | "y" | "yes" | "true" => self.switch(true),
                "0" | "off" | "n" | "no" | "false" => self.switch(false),
                _ => Err(format!("{} = {text:?}: expected on or off", self.name)),
            },
            Values::Choice(names) => match text.parse::<u64>() {
                Ok(index) => self.number(index),
                Err(_) => names
                    .iter()
                    .position(|name| *name == text)
                    .map(KnobValue::Choice)
                    .ok_or_else(|| self.choices_error(text)),
            },
        }
    }

    /// Takes a whole number: a number within the range, or a choice by its index (`run = 1`).
    pub fn number(&self, n: u64) -> Result<KnobValue, String> {
        match self.values {
            Values::Number(range) => range
                .check(n)
                .map(|()| KnobValue::Number(n))
                .map_err(|error| error.to_string()),
            Values::Seconds(_) => self.seconds(n as f64),
            Values::Choice(names) if (n as usize) < names.len() => {
                Ok(KnobValue::Choice(n as usize))
            }
            Values::Choice(_) => Err(self.choices_error(&n.to_string())),
            Values::Switch => Err(format!("{} = {n}: expected on or off", self.name)),
        }
    }

    /// Takes a fractional number of seconds.
    pub fn seconds(&self, seconds: f64) -> Result<KnobValue, String> {
        let Values::Seconds(range) = self.values else {
            return Err(format!(
                "{} = {seconds}: expected {}",
                self.name, self.values
            ));
        };
        let ms = seconds * 1e3;
        if ms.is_finite() && ms >= 0.0 && range.contains(ms.round() as u64) {
            Ok(KnobValue::Seconds(seconds))
        } else {
            Err(format!(
                "{} = {seconds} s is out of range: accepted {}",
                self.name, self.values
            ))
        }
    }

    /// Takes on or off.
    pub fn switch(&self, on: bool) -> Result<KnobValue, String> {
        match self.values {
            Values::Switch => Ok(KnobValue::Switch(on)),
            _ => Err(format!("{} = {on}: expected {}", self.name, self.values)),
        }
    }

    /// Takes a choice by name.
    pub fn choice(&self, name: &str) -> Result<KnobValue, String> {
        match self.values {
            Values::Choice(_) => self.parse(name),
            _ => Err(format!(
                "{} = {name:?}: expected {}",
                self.name, self.values
            )),
        }
    }

    fn choices_error(&self, given: &str) -> String {
        format!("{} = {given}: expected {}", self.name, self.values)
    }

    /// `--help`'s line: the help, what the knob takes, and its default.
    pub fn help_line(&self) -> String {
        let ksm = match self.origin {
            Origin::Ksm => format!(" (KSM {})", self.name),
            Origin::Samepage => String::new(),
        };
        format!(
            "{}{ksm}; {}; default {}",
            capitalised(self.help),
            self.values,
            self.display(self.default_value())
        )
    }

    /// A value as the knob's surfaces spell it.
    pub fn display(&self, value: KnobValue) -> String {
        match (value, self.values) {
            (KnobValue::Choice(index), Values::Choice(names)) => {
                format!("{index} ({})", names[index])
            }
            (KnobValue::Number(n), _) => n.to_string(),
            (KnobValue::Seconds(s), _) => format!("{s} s"),
            (KnobValue::Switch(on), _) => (if on { "on" } else { "off" }).to_owned(),
            (KnobValue::Choice(index), _) => index.to_string(),
        }
    }
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

impl fmt::Display for Values {
    /// What the knob takes, as help texts and errors say it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Values::Number(range) => write!(f, "{range}"),
            Values::Seconds(range) => write!(
                f,
                "{} to {} s",
                range.min as f64 / 1e3,
                range.max as f64 / 1e3
            ),
            Values::Switch => write!(f, "on or off"),
            Values::Choice(names) => {
                let listed: Vec<String> = names
                    .iter()
                    .enumerate()
                    .map(|(index, name)| format!("{index} ({name})"))
                    .collect();
                write!(f, "{}", listed.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_knob_reads_back_what_it_was_set_to_and_its_default_parses() {
        for knob in KNOBS {
            let default = knob.default_value();
            let mut knobs = Knobs::default();
            knob.set(&mut knobs, default)
                .expect("the default is accepted");
            assert_eq!(knobs, Knobs::default(), "{}", knob.name);
            let spelled = match default {
                KnobValue::Number(n) => n.to_string(),
                KnobValue::Seconds(s) => s.to_string(),
                KnobValue::Switch(on) => u8::from(on).to_string(),
                KnobValue::Choice(index) => index.to_string(),
            };
            assert_eq!(knob.parse(&spelled), Ok(default), "{}", knob.name);
        }
    }

    #[test]
    fn values_out_of_range_are_refused_with_the_range() {
        let pages = Knobs::declared("pages_to_scan").expect("declared");
        assert_eq!(
            pages.parse("0"),
            Err("pages_to_scan = 0 is out of range: accepted 1 to 16777216".to_owned())
        );
        let run = Knobs::declared("run").expect("declared");
        assert_eq!(run.parse("unmerge"), Ok(KnobValue::Choice(2)));
        assert_eq!(
            run.parse("3"),
            Err("run = 3: expected 0 (stop), 1 (merge), 2 (unmerge)".to_owned())
        );
        let target = Knobs::declared("advisor_target_scan_time").expect("declared");
        assert_eq!(target.parse("0.5"), Ok(KnobValue::Seconds(0.5)));
        assert!(target.parse("0.001").is_err());
    }

    #[test]
    fn names_are_distinct_and_sysfs_spelled() {
        for (i, knob) in KNOBS.iter().enumerate() {
            assert!(
                knob.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                knob.name
            );
            assert!(KNOBS[..i].iter().all(|other| other.name != knob.name));
        }
    }
}
