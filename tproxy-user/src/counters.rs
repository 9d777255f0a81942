//! Counters described once. Each counter of the datapath and the relays is
//! declared with the crate's `counters!` macro: its field (also its JSON name), its
//! Prometheus family and label, its help, and its words in summaries. The
//! `stats` table, the shutdown summary and the metrics endpoint all read
//! these descriptions.

/// How Prometheus should treat a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows.
    Counter,
    /// Goes up and down (what is open now).
    Gauge,
}

/// The description of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The field's name, as in JSON.
    pub name: &'static str,
    /// The Prometheus family; counters of one family follow each other and
    /// differ by `label`.
    pub metric: &'static str,
    /// The label that sets it apart within its family.
    pub label: Option<(&'static str, &'static str)>,
    /// Counter or gauge.
    pub kind: Kind,
    /// What follows the value in a summary: "3 connections relayed".
    pub words: &'static str,
    /// The family's help text.
    pub help: &'static str,
}

/// A snapshot of counters declared with the `counters!` macro.
pub trait Snapshot {
    /// The descriptions, in declaration order.
    const COUNTERS: &'static [Counter];
    /// The values, in the same order.
    fn values(&self) -> Vec<u64>;

    /// Each description with its value.
    fn described(&self) -> Vec<(&'static Counter, u64)> {
        Self::COUNTERS.iter().zip(self.values()).collect()
    }

    /// One line of the counters not at 0: "3 connections relayed, 1
    /// aborted, …"; "nothing counted" if all are.
    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .described()
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(c, v)| format!("{v} {}", c.words))
            .collect();
        if parts.is_empty() { "nothing counted".into() } else { parts.join(", ") }
    }
}

/// Declares a snapshot struct of `u64` counters with their descriptions and,
/// given `Live =>`, a struct of atomics that fills it.
///
/// ```text
/// counters! {
///     /// Live doc.
///     Live =>
///     /// Snapshot doc.
///     Snapshot {
///         /// Field doc.
///         accepted: Counter("tproxy_tcp_connections", "connections relayed", "TCP connections accepted"),
///         bytes_up: Counter("tproxy_tcp_bytes" direction = "up", "bytes up", "TCP bytes relayed"),
///     }
/// }
/// ```
macro_rules! counters {
    (
        $(#[$meta:meta])* $live:ident =>
        $(#[$smeta:meta])* $snapshot:ident { $($body:tt)* }
    ) => {
        $crate::counters::counters!(@fields $live $snapshot [$(#[$meta])*] [$(#[$smeta])*] [] $($body)*);
    };
    (
        $(#[$smeta:meta])* $snapshot:ident { $($body:tt)* }
    ) => {
        $crate::counters::counters!(@snapshot $snapshot [$(#[$smeta])*] [] $($body)*);
    };
    // Munches one field at a time into [ (attrs) name kind metric label words help ].
    (@fields $live:ident $snapshot:ident $meta:tt $smeta:tt [$($done:tt)*]
        $(#[$fmeta:meta])* $field:ident: $kind:ident($metric:literal $($lk:ident = $lv:literal)?, $words:literal, $help:literal),
        $($rest:tt)*
    ) => {
        $crate::counters::counters!(@fields $live $snapshot $meta $smeta
            [$($done)* [($(#[$fmeta])*) $field $kind $metric ($($lk $lv)?) $words $help]] $($rest)*);
    };
    (@fields $live:ident $snapshot:ident [$($meta:tt)*] $smeta:tt
        [$([($($fmeta:tt)*) $field:ident $kind:ident $metric:literal ($($lk:ident $lv:literal)?) $words:literal $help:literal])*]
    ) => {
        $($meta)*
        #[derive(Debug, Default)]
        pub struct $live {
            $($($fmeta)* pub $field: std::sync::atomic::AtomicU64,)*
        }

        impl $live {
            /// The counters' current values.
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($field: self.$field.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }

        $crate::counters::counters!(@emit $snapshot $smeta
            [$([($($fmeta)*) $field $kind $metric ($($lk $lv)?) $words $help])*]);
    };
    (@snapshot $snapshot:ident $smeta:tt [$($done:tt)*]
        $(#[$fmeta:meta])* $field:ident: $kind:ident($metric:literal $($lk:ident = $lv:literal)?, $words:literal, $help:literal),
        $($rest:tt)*
    ) => {
        $crate::counters::counters!(@snapshot $snapshot $smeta
            [$($done)* [($(#[$fmeta])*) $field $kind $metric ($($lk $lv)?) $words $help]] $($rest)*);
    };
    (@snapshot $snapshot:ident $smeta:tt [$($done:tt)*]) => {
        $crate::counters::counters!(@emit $snapshot $smeta [$($done)*]);
    };
    (@emit $snapshot:ident [$($smeta:tt)*]
        [$([($($fmeta:tt)*) $field:ident $kind:ident $metric:literal ($($lk:ident $lv:literal)?) $words:literal $help:literal])*]
    ) => {
        $($smeta)*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct $snapshot {
            $($($fmeta)* pub $field: u64,)*
        }

        impl $crate::counters::Snapshot for $snapshot {
            const COUNTERS: &'static [$crate::counters::Counter] = &[$(
                $crate::counters::Counter {
                    name: stringify!($field),
                    metric: $metric,
                    label: $crate::counters::counters!(@label $($lk $lv)?),
                    kind: $crate::counters::Kind::$kind,
                    words: $words,
                    help: $help,
                },
            )*];

            fn values(&self) -> Vec<u64> {
                vec![$(self.$field),*]
            }
        }

        impl $snapshot {
            /// Fills the fields in declaration order from `value`.
            #[allow(dead_code)]
            pub(crate) fn from_values(mut value: impl FnMut(usize) -> u64) -> Self {
                let mut index = 0..;
                Self { $($field: value(index.next().unwrap_or_default()),)* }
            }
        }
    };
    (@label) => { None };
    (@label $lk:ident $lv:literal) => { Some((stringify!($lk), $lv)) };
}
pub(crate) use counters;

#[cfg(test)]
mod tests {
    use super::Snapshot as _;
    use crate::control::stats::RuleCounters;

    #[test]
    fn a_summary_names_only_what_was_counted() {
        assert_eq!(RuleCounters::default().summary(), "nothing counted");
        let counters = RuleCounters { packets: 3, no_listener: 1, ..Default::default() };
        assert_eq!(counters.summary(), "3 packets, 1 no listener");
    }
}
