//! Response flags as Envoy and Istio define them, recorded per request
//! (`response_flags` in metrics, `%RESPONSE_FLAGS%` in access logs).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// A set of response flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

/// In Envoy's order, which is also the order they print in.
const NAMES: &[&str] = &[
    "UH", "UF", "UO", "NR", "URX", "UC", "DC", "UT", "DI", "FI", "RBAC", "UAEX", "DPE",
];

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// No healthy upstream.
    pub const UH: Flags = Flags(1);
    /// Upstream connection failure.
    pub const UF: Flags = Flags(1 << 1);
    /// Upstream overflow (circuit breaking).
    pub const UO: Flags = Flags(1 << 2);
    /// No route (or no cluster) for the request.
    pub const NR: Flags = Flags(1 << 3);
    /// Retries exhausted on a retriable failure.
    pub const URX: Flags = Flags(1 << 4);
    /// Upstream connection terminated mid-request.
    pub const UC: Flags = Flags(1 << 5);
    /// Downstream connection terminated.
    pub const DC: Flags = Flags(1 << 6);
    /// Upstream request timeout.
    pub const UT: Flags = Flags(1 << 7);
    /// Delay injected.
    pub const DI: Flags = Flags(1 << 8);
    /// Abort injected.
    pub const FI: Flags = Flags(1 << 9);
    /// Downstream protocol error: the client's request was malformed.
    pub const DPE: Flags = Flags(1 << 12);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// `-` for none, else the flags joined with commas.
    pub fn as_str(self) -> &'static str {
        if self.0 == 0 {
            return "-";
        }
        if self.0.is_power_of_two() {
            return NAMES[self.0.trailing_zeros() as usize];
        }
        // Combinations are few (a bounded set); each is built once.
        static SEEN: OnceLock<Mutex<HashMap<u16, &'static str>>> = OnceLock::new();
        let mut seen = SEEN.get_or_init(Default::default).lock().unwrap();
        seen.entry(self.0).or_insert_with(|| {
            let names: Vec<&str> = NAMES
                .iter()
                .enumerate()
                .filter(|(i, _)| self.0 & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            Box::leak(names.join(",").into_boxed_str())
        })
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_as_envoy_does() {
        assert_eq!(Flags::NONE.as_str(), "-");
        assert_eq!(Flags::URX.as_str(), "URX");
        assert_eq!((Flags::FI | Flags::DI).as_str(), "DI,FI");
        assert_eq!((Flags::UT | Flags::URX).as_str(), "URX,UT");
    }
}
