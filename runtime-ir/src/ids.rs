//! Typed ids shared by every phase: ranks, stages, microbatches and buffers.
//!
//! Each id's `Display` is its spelling in the IR text form, and `FromStr`
//! parses that spelling back.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a piece of IR text could not be read as an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdParseError {
    /// What was expected, e.g. "a rank like `r3`".
    pub expected: &'static str,
    /// The text that was found instead.
    pub found: String,
}

impl fmt::Display for IdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {}, found `{}`", self.expected, self.found)
    }
}

impl std::error::Error for IdParseError {}

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $expected:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// The id as an index into per-id tables.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.strip_prefix($prefix)
                    .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|digits| digits.parse().ok())
                    .map($name)
                    .ok_or_else(|| IdParseError { expected: $expected, found: s.to_string() })
            }
        }
    };
}

numeric_id!(
    /// A pipeline rank (one GPU, or one group of TP shards). Text form `r3`.
    Rank,
    "r",
    "a rank like `r3`"
);
numeric_id!(
    /// A pipeline stage: a contiguous slice of the model's layers. Stages are
    /// numbered in forward order; the loss follows the last one. Text form `s5`.
    Stage,
    "s",
    "a stage like `s5`"
);
numeric_id!(
    /// A microbatch. Text form `mb7`.
    Microbatch,
    "mb",
    "a microbatch like `mb7`"
);

/// What a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    /// The output activation of `F(stage, mb)`: the input of the next stage
    /// (or of the loss, after the last stage).
    Act,
    /// The input gradient computed by `B(stage, mb)` or `BW(stage, mb)`: the
    /// output gradient of the previous stage.
    Grad,
    /// What `F(stage, mb)` saves for its backward passes (its input and
    /// intermediate activations); read by `B`/`W`/`BW` of the same pair.
    Stash,
}

impl BufferKind {
    /// The spelling in the text form.
    pub fn as_str(self) -> &'static str {
        match self {
            BufferKind::Act => "act",
            BufferKind::Grad => "grad",
            BufferKind::Stash => "stash",
        }
    }
}

/// A tensor named by what it is: `kind` of (`stage`, `mb`). On one rank
/// there is at most one live buffer with a given name. Text form
/// `act.s2.mb5`, which is also how JSON spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Buffer {
    /// What the buffer holds.
    pub kind: BufferKind,
    /// The stage whose pass produced it.
    pub stage: Stage,
    /// The microbatch it belongs to.
    pub mb: Microbatch,
}

impl Buffer {
    /// The output activation of `F(stage, mb)`.
    pub fn act(stage: Stage, mb: Microbatch) -> Buffer {
        Buffer { kind: BufferKind::Act, stage, mb }
    }
    /// The input gradient computed by the backward of (`stage`, `mb`).
    pub fn grad(stage: Stage, mb: Microbatch) -> Buffer {
        Buffer { kind: BufferKind::Grad, stage, mb }
    }
    /// What `F(stage, mb)` saved for its backward.
    pub fn stash(stage: Stage, mb: Microbatch) -> Buffer {
        Buffer { kind: BufferKind::Stash, stage, mb }
    }
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.kind.as_str(), self.stage, self.mb)
    }
}

impl Serialize for Buffer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Programs hold hundreds of thousands of buffers: spell the name on
        // the stack instead of through the formatting machinery.
        let mut text = [0u8; 40];
        let mut len = 0;
        let mut push = |bytes: &[u8]| {
            text[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        push(self.kind.as_str().as_bytes());
        push(b".s");
        push(decimal(self.stage.0, &mut [0u8; 10]));
        push(b".mb");
        push(decimal(self.mb.0, &mut [0u8; 10]));
        serializer.serialize_str(std::str::from_utf8(&text[..len]).unwrap_or_default())
    }
}

/// `n` in decimal, written into the end of `digits`.
pub(crate) fn decimal(mut n: u32, digits: &mut [u8; 10]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

impl<'de> Deserialize<'de> for Buffer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Buffer, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Buffer {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdParseError { expected: "a buffer like `act.s2.mb5`", found: s.to_string() };
        let mut parts = s.split('.');
        let kind = match parts.next() {
            Some("act") => BufferKind::Act,
            Some("grad") => BufferKind::Grad,
            Some("stash") => BufferKind::Stash,
            _ => return Err(bad()),
        };
        let stage = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let mb = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Buffer { kind, stage, mb })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_back() {
        assert_eq!(Rank(3).to_string(), "r3");
        assert_eq!("r3".parse::<Rank>(), Ok(Rank(3)));
        assert_eq!("mb12".parse::<Microbatch>(), Ok(Microbatch(12)));
        let b = Buffer::grad(Stage(4), Microbatch(9));
        assert_eq!(b.to_string(), "grad.s4.mb9");
        assert_eq!(b.to_string().parse::<Buffer>(), Ok(b));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in ["r", "r-1", "s3", "rr3", "r3x", " r3"] {
            assert!(bad.parse::<Rank>().is_err(), "{bad} parsed as a rank");
        }
        for bad in ["act.s1", "act.s1.mb2.x", "foo.s1.mb2", "act.mb1.s2"] {
            assert!(bad.parse::<Buffer>().is_err(), "{bad} parsed as a buffer");
        }
    }
}
