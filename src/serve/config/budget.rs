//! The memory budget of `[server]`: bytes, or a share of the memory the host may use.

use crate::cli::parse_bytes;

/// The most memory the host may hold, as the kernel counts it (PSS, after merging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBudget {
    Bytes(u64),
    /// A share, in percent, of the memory the host may use at all: the lowest memory limit
    /// of its cgroups (a container's limit), or the machine's memory without one.
    ShareOfLimit(u8),
}

impl MemoryBudget {
    /// `2GiB` (or a number of bytes), or `75%`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().strip_suffix('%') {
            Some(share) => match share.trim().parse::<u8>() {
                Ok(share @ 1..=100) => Ok(Self::ShareOfLimit(share)),
                _ => Err(format!(
                    "{text:?}: a share of the memory limit is a whole percentage from 1 to 100"
                )),
            },
            None => parse_bytes(text).map(Self::Bytes),
        }
    }

    /// The budget in bytes, and what it was taken from: for a share, the cgroup limit or the
    /// machine's memory as read now.
    pub fn resolve(self) -> Result<(u64, String), String> {
        let share = match self {
            Self::Bytes(bytes) => return Ok((bytes, "as configured".to_owned())),
            Self::ShareOfLimit(share) => u64::from(share),
        };
        let (limit, source) = match crate::cgroup::memory_limit() {
            Some((limit, cgroup)) => (
                limit,
                format!("the memory limit of cgroup {}", cgroup.display()),
            ),
            None => {
                let total = <procfs::Meminfo as procfs::Current>::current()
                    .map_err(|error| format!("no cgroup limits memory, and {error}"))?
                    .mem_total;
                (total, "the machine's memory (MemTotal)".to_owned())
            }
        };
        Ok((
            limit / 100 * share,
            format!("{share}% of {} MiB, {source}", limit >> 20),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_budget_is_bytes_or_a_share_of_the_limit() {
        assert_eq!(
            MemoryBudget::parse("2GiB"),
            Ok(MemoryBudget::Bytes(2 << 30))
        );
        assert_eq!(
            MemoryBudget::parse("75%"),
            Ok(MemoryBudget::ShareOfLimit(75))
        );
        assert_eq!(
            MemoryBudget::parse(" 100 %"),
            Ok(MemoryBudget::ShareOfLimit(100))
        );
        for wrong in ["0%", "101%", "7.5%", "lots"] {
            assert!(MemoryBudget::parse(wrong).is_err(), "{wrong}");
        }
        let (bytes, _) = MemoryBudget::ShareOfLimit(50)
            .resolve()
            .expect("a limit or MemTotal");
        assert!(bytes > 0);
    }
}
