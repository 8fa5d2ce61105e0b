// The ratio chart: ovl's medians over the kernel overlay's and the bare
// underlay's, one horizontal bar per metric and comparison, as a PNG.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Better, Comparison, Metric, PathId, Report, Underlay};

/// Where Debian's fonts-dejavu-core puts its sans face. Text is rasterised
/// from it with ab_glyph, so no fontconfig is involved.
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The family name the chart's text styles ask for.
const FONT_FAMILY: &str = "sans-serif";

/// The comparisons charted, with their bar colours.
const SERIES: [(Comparison, RGBColor); 3] = [
    (
        Comparison {
            path: PathId::OvlTc,
            reference: PathId::KernelVxlan,
        },
        RGBColor(31, 119, 180),
    ),
    (
        Comparison {
            path: PathId::OvlTc,
            reference: PathId::Bare,
        },
        RGBColor(255, 127, 14),
    ),
    (
        Comparison {
            path: PathId::OvlTcForwarding,
            reference: PathId::KernelVxlan,
        },
        RGBColor(44, 160, 44),
    ),
];

const WIDTH: u32 = 1400;
const MARGIN: i32 = 20;
const TITLE_HEIGHT: i32 = 70;
const PANEL_TITLE_HEIGHT: i32 = 44;
const AXIS_HEIGHT: i32 = 40;
const PANEL_GAP: i32 = 24;
const LEGEND_HEIGHT: i32 = 60;
const BAR_HEIGHT: i32 = 15;
const BAR_GAP: i32 = 2;
const GROUP_GAP: i32 = 16;
/// Left edge of the plot: metric labels are right-aligned before it.
const PLOT_LEFT: i32 = 430;
const PLOT_RIGHT: i32 = WIDTH as i32 - 90;
/// Ratios past this are drawn to the edge and labelled with their value.
const MAX_AXIS_RATIO: f64 = 3.0;

/// One underlay mode's bars.
struct Panel {
    underlay: Underlay,
    series: Vec<(Comparison, RGBColor)>,
    rows: Vec<(Metric, Vec<Option<f64>>)>,
}

impl Panel {
    fn height(&self) -> i32 {
        let bars = self.series.len() as i32;
        let group = bars * BAR_HEIGHT + (bars - 1) * BAR_GAP + GROUP_GAP;
        PANEL_TITLE_HEIGHT + self.rows.len() as i32 * group + AXIS_HEIGHT
    }
}

/// Draws the ratio chart of `report` to `path`.
pub fn render(report: &Report, path: &Path) -> Result<()> {
    register_font()?;
    let panels = panels(report);
    anyhow::ensure!(!panels.is_empty(), "no ratios to chart");
    let axis_max = axis_max(&panels);
    let height = TITLE_HEIGHT
        + panels.iter().map(Panel::height).sum::<i32>()
        + PANEL_GAP * (panels.len() as i32 - 1)
        + LEGEND_HEIGHT
        + MARGIN;
    let root = BitMapBackend::new(path, (WIDTH, height as u32)).into_drawing_area();
    draw(&root, report, &panels, axis_max)
        .map_err(|error| anyhow!("drawing {}: {error}", path.display()))?;
    root.present()
        .map_err(|error| anyhow!("writing {}: {error}", path.display()))?;
    Ok(())
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_FILE).map_err(|error| {
                format!("{FONT_FILE}: {error} (install Debian's fonts-dejavu-core; `cargo xtask setup` does)")
            })?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT_FILE} is not a usable TrueType font"))
        })
        .clone()
        .map_err(|message| anyhow!(message))
        .context("the chart needs a font")
}

fn panels(report: &Report) -> Vec<Panel> {
    report
        .samples
        .underlays()
        .into_iter()
        .filter_map(|underlay| {
            let ratio = |metric, comparison: Comparison| {
                report
                    .samples
                    .ratio(underlay, metric, comparison.path, comparison.reference)
            };
            let series: Vec<(Comparison, RGBColor)> = SERIES
                .into_iter()
                .filter(|(comparison, _)| {
                    Metric::ALL
                        .into_iter()
                        .any(|metric| ratio(metric, *comparison).is_some())
                })
                .collect();
            let rows: Vec<(Metric, Vec<Option<f64>>)> = Metric::ALL
                .into_iter()
                .map(|metric| {
                    let values = series.iter().map(|(c, _)| ratio(metric, *c)).collect();
                    (metric, values)
                })
                .filter(|(_, values): &(Metric, Vec<Option<f64>>)| {
                    values.iter().any(Option::is_some)
                })
                .collect();
            (!rows.is_empty()).then_some(Panel {
                underlay,
                series,
                rows,
            })
        })
        .collect()
}

/// The axis end: the largest ratio rounded up to a half, at least 1.5 and
/// at most [`MAX_AXIS_RATIO`].
fn axis_max(panels: &[Panel]) -> f64 {
    let largest = panels
        .iter()
        .flat_map(|panel| {
            panel
                .rows
                .iter()
                .flat_map(|(_, values)| values.iter().flatten())
        })
        .copied()
        .fold(1.0_f64, f64::max);
    ((largest * 2.0).ceil() / 2.0).clamp(1.5, MAX_AXIS_RATIO)
}

fn font(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT_FAMILY, size).into_font()).color(&BLACK)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(
    root: &Area<'_>,
    report: &Report,
    panels: &[Panel],
    axis_max: f64,
) -> std::result::Result<
    (),
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
> {
    root.fill(&WHITE)?;
    let x_of = |ratio: f64| {
        PLOT_LEFT + ((ratio.min(axis_max) / axis_max) * f64::from(PLOT_RIGHT - PLOT_LEFT)) as i32
    };
    root.draw(&Text::new(
        "ovl / reference, median of interleaved runs (1.0 = same as the reference)",
        (MARGIN, MARGIN),
        font(26.0),
    ))?;
    root.draw(&Text::new(
        report.title.clone(),
        (MARGIN, MARGIN + 32),
        font(17.0).color(&RGBColor(90, 90, 90)),
    ))?;
    let mut top = TITLE_HEIGHT;
    for panel in panels {
        root.draw(&Text::new(
            capitalised(panel.underlay.label()),
            (MARGIN, top + 12),
            font(21.0),
        ))?;
        let plot_top = top + PANEL_TITLE_HEIGHT;
        let plot_bottom = top + panel.height() - AXIS_HEIGHT;
        // Grid every 0.25, labels every 0.5, parity at 1.0.
        let mut tick = 0.0;
        while tick <= axis_max + 1e-9 {
            let x = x_of(tick);
            let major = (tick * 2.0).fract().abs() < 1e-9;
            let colour = if major {
                RGBColor(200, 200, 200)
            } else {
                RGBColor(232, 232, 232)
            };
            root.draw(&PathElement::new(
                vec![(x, plot_top - 6), (x, plot_bottom)],
                colour.stroke_width(1),
            ))?;
            if major {
                root.draw(&Text::new(
                    format!("{tick:.1}"),
                    (x, plot_bottom + 6),
                    font(15.0).pos(Pos::new(HPos::Center, VPos::Top)),
                ))?;
            }
            tick += 0.25;
        }
        let mut y = plot_top;
        for (metric, values) in &panel.rows {
            let bars = values.len() as i32;
            let group_height = bars * BAR_HEIGHT + (bars - 1) * BAR_GAP;
            let arrow = match metric.better() {
                Better::Higher => "higher is better",
                Better::Lower => "lower is better",
            };
            root.draw(&Text::new(
                metric.label(),
                (PLOT_LEFT - 12, y + group_height / 2 - 9),
                font(16.0).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            root.draw(&Text::new(
                arrow,
                (PLOT_LEFT - 12, y + group_height / 2 + 9),
                font(13.0)
                    .color(&RGBColor(110, 110, 110))
                    .pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            for (slot, (value, (_, colour))) in values.iter().zip(&panel.series).enumerate() {
                let bar_top = y + slot as i32 * (BAR_HEIGHT + BAR_GAP);
                let Some(value) = value else { continue };
                let end = x_of(*value);
                root.draw(&Rectangle::new(
                    [(PLOT_LEFT, bar_top), (end, bar_top + BAR_HEIGHT)],
                    colour.filled(),
                ))?;
                let label = if *value > axis_max {
                    format!("{value:.2} ▶")
                } else {
                    format!("{value:.2}")
                };
                root.draw(&Text::new(
                    label,
                    (end + 5, bar_top + BAR_HEIGHT / 2),
                    font(13.0).pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
            }
            y += group_height + GROUP_GAP;
        }
        let parity = x_of(1.0);
        root.draw(&PathElement::new(
            vec![(parity, plot_top - 6), (parity, plot_bottom)],
            BLACK.stroke_width(2),
        ))?;
        root.draw(&PathElement::new(
            vec![(PLOT_LEFT, plot_top - 6), (PLOT_LEFT, plot_bottom)],
            BLACK.stroke_width(1),
        ))?;
        top += panel.height() + PANEL_GAP;
    }
    // Legend: the union of the panels' series.
    let mut x = PLOT_LEFT;
    let legend_y = top - PANEL_GAP + 24;
    for (comparison, colour) in SERIES {
        if !panels
            .iter()
            .any(|panel| panel.series.iter().any(|(c, _)| *c == comparison))
        {
            continue;
        }
        root.draw(&Rectangle::new(
            [(x, legend_y), (x + 18, legend_y + 18)],
            colour.filled(),
        ))?;
        let label = comparison.label();
        root.draw(&Text::new(
            label.clone(),
            (x + 26, legend_y + 9),
            font(16.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        x += 60 + 9 * label.len() as i32;
    }
    Ok(())
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Samples;

    #[test]
    fn chart_renders_a_png_with_the_system_font() {
        let mut samples = Samples::default();
        for (path, value) in [
            (PathId::Bare, 10.0),
            (PathId::KernelVxlan, 8.0),
            (PathId::OvlTc, 9.0),
            (PathId::OvlTcForwarding, 30.0),
        ] {
            samples.add(Underlay::Offloads, path, Metric::Tcp1Throughput, value);
            samples.add(Underlay::WireLike, path, Metric::RrLatencyP50, value);
        }
        let report = Report {
            title: "chart test".to_string(),
            samples,
            ..Report::default()
        };
        let file = std::env::temp_dir().join(format!("ovl-chart-test-{}.png", std::process::id()));
        render(&report, &file).expect("renders");
        let bytes = std::fs::read(&file).expect("written");
        std::fs::remove_file(&file).expect("removed");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        assert!(
            bytes.len() > 10_000,
            "suspiciously small: {} bytes",
            bytes.len()
        );
    }

    #[test]
    fn axis_ends_on_a_half_between_one_and_a_half_and_three() {
        let panel = |values: Vec<Option<f64>>| Panel {
            underlay: Underlay::Offloads,
            series: Vec::new(),
            rows: vec![(Metric::Tcp1Throughput, values)],
        };
        assert_eq!(axis_max(&[panel(vec![Some(0.7)])]), 1.5);
        assert_eq!(axis_max(&[panel(vec![Some(1.69), None])]), 2.0);
        assert_eq!(axis_max(&[panel(vec![Some(9.2)])]), 3.0);
    }
}
