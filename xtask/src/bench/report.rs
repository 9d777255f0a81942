//! BENCHMARKS.md's generated sections: the table of medians, the targets
//! checked against it, and the chart of the ratios.

use std::{fs, path::Path, process::Command, thread};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{Metric, Mode, Options, Results};

/// Where the generated figures go, from the workspace root.
pub const FIGURES: &str = "docs/bench";
pub const CHART: &str = "ratios.svg";
/// Markers around a generated section of BENCHMARKS.md.
pub type Section = (&'static str, &'static str);
pub const RESULTS: Section =
    ("<!-- results: written by cargo xtask bench -->", "<!-- end of results -->");
pub const UPGRADE: Section =
    ("<!-- upgrade results: written by cargo xtask bench -->", "<!-- end of upgrade results -->");

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn value(results: &Results, metric: Metric, mode: Mode) -> Option<f64> {
    results.get(&(metric, mode)).map(|v| median(v))
}

/// `mode`'s median over its anchor's (see [`Mode::anchor`]).
fn ratio(results: &Results, metric: Metric, mode: Mode) -> Option<f64> {
    let anchor = mode.anchor(metric);
    if anchor == mode {
        return None;
    }
    let (m, a) = (value(results, metric, mode)?, value(results, metric, anchor)?);
    (a > 0.0).then(|| m / a)
}

pub fn render(results: &Results, options: &Options) -> String {
    let mut out = format!(
        "`cargo xtask bench --rounds {0} --seconds {1}`: medians of {0} interleaved rounds of {1} s \
         per measurement. Ratios: throughput and UDP \
         to `direct`; connections, latency and memory to `haproxy` (HAProxy at its best), and \
         for the spoofing modes to `haproxy-spoof`.\n\n",
        options.rounds, options.seconds
    );
    let modes: Vec<Mode> =
        Mode::ALL.into_iter().filter(|m| results.keys().any(|(_, mode)| mode == m)).collect();
    out += "| metric |";
    for mode in &modes {
        out += &format!(" {} |", mode.name());
    }
    out += "\n| --- |";
    out += &" ---: |".repeat(modes.len());
    out += "\n";
    for metric in Metric::ALL {
        out += &format!("| {} |", metric.label());
        for &mode in &modes {
            out += &match (value(results, metric, mode), ratio(results, metric, mode)) {
                (Some(v), Some(r)) => format!(" {} ({r:.2}×) |", format_value(v)),
                (Some(v), None) => format!(" {} |", format_value(v)),
                (None, _) => " – |".to_owned(),
            };
        }
        out += "\n";
    }
    out += &format!("\n{}\n", targets(results));
    out += &format!("\n{}\n", environment());
    out
}

/// The targets of #14, each checked against this run's medians.
fn targets(results: &Results) -> String {
    struct Target {
        what: &'static str,
        metric: Metric,
        mode: Mode,
        /// The ratio must be at least this (or, with `at_most`, at most).
        bound: f64,
        at_most: bool,
    }
    let t = |what, metric, mode, bound, at_most| Target { what, metric, mode, bound, at_most };
    let list = [
        t("new connections ≥ 1.2 × HAProxy at its best", Metric::ConnRate, Mode::Ours, 1.2, false),
        t(
            "new connections, spoofing ≥ 1.2 × HAProxy `usesrc clientip`",
            Metric::ConnRate,
            Mode::OursSpoof,
            1.2,
            false,
        ),
        t("p99 latency ≤ HAProxy's", Metric::LatencyP99, Mode::Ours, 1.0, true),
        t("p99 latency, spoofing ≤ HAProxy's", Metric::LatencyP99, Mode::OursSpoof, 1.0, true),
        t("TCP bulk, 1 stream ≥ 0.95 × direct", Metric::Throughput1, Mode::Ours, 0.95, false),
        t("UDP request/response ≥ 0.8 × direct", Metric::UdpRate, Mode::Ours, 0.8, false),
        t(
            "memory per idle connection ≤ 0.5 × HAProxy's",
            Metric::IdleMemory,
            Mode::Ours,
            0.5,
            true,
        ),
    ];
    let mut out = String::from("| target | ratio | |\n| --- | ---: | --- |\n");
    for target in list {
        let cell = match ratio(results, target.metric, target.mode) {
            Some(r) => {
                let met = if target.at_most { r <= target.bound } else { r >= target.bound };
                format!("{r:.2}× | {} |", if met { "met" } else { "**not met**" })
            }
            None => "– | not measured |".to_owned(),
        };
        out += &format!("| {} | {cell}\n", target.what);
    }
    out
}

fn format_value(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn environment() -> String {
    let version = |cmd: &str, args: &[&str]| -> String {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    let kernel = version("uname", &["-r"]);
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let commit = version("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "Measured on Linux {kernel}, {cpus} CPUs (client, proxy and server share them), tproxy {commit}; \
         {}; {}; {}; {}; {}.",
        version("haproxy", &["-v"]),
        version("nginx", &["-v"]),
        version("iperf3", &["--version"]),
        version("ab", &["-V"]),
        version("iptables", &["--version"]),
    )
}

/// Replaces one generated section of the report, keeping the prose (or
/// appends it).
pub fn write_section(path: &Path, (begin, end): Section, text: &str) -> Result<()> {
    let report = fs::read_to_string(path).unwrap_or_default();
    let block = format!("{begin}\n{text}\n{end}");
    let report = match (report.find(begin), report.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &report[..b], &report[e + end.len()..])
        }
        _ => format!("{report}\n{block}\n"),
    };
    fs::write(path, report).with_context(|| format!("writing {}", path.display()))
}

/// The font the chart's text is measured and drawn with (Debian's
/// fonts-dejavu-core, which the bench installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A bar chart of each mode's ratio to its anchor, per metric, with the
/// targets marked.
pub fn chart(results: &Results, path: &Path) -> Result<()> {
    let font = fs::read(FONT).with_context(|| format!("reading {FONT}"))?;
    // plotters keeps the font for the process's life.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    // (label, metric, target; higher is better unless the label says so)
    let groups = [
        ("new connections\n÷ HAProxy best", Metric::ConnRate, 1.2),
        ("p99 latency (lower is better)\n÷ HAProxy best", Metric::LatencyP99, 1.0),
        ("TCP bulk, 1 stream\n÷ direct", Metric::Throughput1, 0.95),
        ("UDP request/response\n÷ direct", Metric::UdpRate, 0.8),
        ("idle memory (lower is better)\n÷ HAProxy best", Metric::IdleMemory, 0.5),
    ];
    let modes = [
        Mode::HaproxyRecipe,
        Mode::Haproxy,
        Mode::HaproxySpoof,
        Mode::NginxUdp,
        Mode::Ours,
        Mode::OursSpoof,
    ];
    let colors = [
        RGBColor(190, 190, 190),
        RGBColor(120, 120, 120),
        RGBColor(70, 70, 70),
        RGBColor(200, 140, 60),
        RGBColor(40, 90, 200),
        RGBColor(60, 160, 90),
    ];
    // An anchor is 1 by definition; it is drawn so that the bars compare.
    let bar = |metric, mode| match ratio(results, metric, mode) {
        None if value(results, metric, mode).is_some() => Some(1.0),
        r => r,
    };
    let bars: Vec<Vec<Option<f64>>> = groups
        .iter()
        .map(|&(_, metric, _)| modes.iter().map(|&mode| bar(metric, mode)).collect())
        .collect();
    let top = bars.iter().flatten().flatten().fold(1.5f64, |a, &b| a.max(b)) * 1.1;
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("tproxy and its rivals, as ratios (targets: black marks)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ratio")
        .label_style(("sans-serif", 13))
        .draw()?;
    let width = 0.8 / modes.len() as f64;
    for (g, group) in bars.iter().enumerate() {
        for (m, bar) in group.iter().enumerate() {
            let Some(r) = bar else { continue };
            let x0 = g as f64 + 0.1 + m as f64 * width;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, *r)],
                colors[m].filled(),
            )))?;
        }
        let target = groups[g].2;
        chart.draw_series(std::iter::once(PathElement::new(
            [(g as f64 + 0.05, target), (g as f64 + 0.95, target)],
            BLACK.stroke_width(2),
        )))?;
        // Under the axis, in pixels: the plotting area clips its own.
        let (x, y) = chart.backend_coord(&(g as f64 + 0.08, 0.0));
        for (i, line) in groups[g].0.lines().enumerate() {
            root.draw(&Text::new(line.to_owned(), (x, y + 8 + 16 * i as i32), ("sans-serif", 13)))?;
        }
    }
    for (m, mode) in modes.iter().enumerate() {
        chart.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?.label(mode.name()).legend(
            move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colors[m].filled()),
        );
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}
