//! The usage chart: an SVG drawn here, a stacked bar per bucket (requests allowed and
//! denied) and a line of the bucket's latency p99. Written by hand rather than with a
//! plotting crate: it is some fifty lines, and the page's CSP and theme (CSS classes,
//! no inline styles) are simpler to honour in our own markup.

use maud::{Markup, html};

/// One bucket of the chart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Bar {
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
    pub(crate) p99_ms: Option<f64>,
}

const W: f64 = 600.0;
const H: f64 = 160.0;
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 18.0;
const TOP: f64 = 8.0;

/// The chart of `bars` (oldest first), `first` and `last` labelling the ends of the
/// time axis. The `<svg>` carries the number of points and the totals as `data-`
/// attributes, for tests and tools.
pub(crate) fn usage_svg(bars: &[Bar], first: &str, last: &str, what: &str) -> Markup {
    let allowed: u64 = bars.iter().map(|b| b.allowed).sum();
    let denied: u64 = bars.iter().map(|b| b.denied).sum();
    let top = bars.iter().map(|b| b.allowed.saturating_add(b.denied)).max().unwrap_or(0).max(1);
    let p99_top = bars.iter().filter_map(|b| b.p99_ms).fold(0.0_f64, f64::max);
    let plot_w = W - LEFT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    let y = |v: u64| TOP + plot_h - plot_h * (v as f64 / top as f64);
    let line: Vec<String> = bars
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let p = b.p99_ms?;
            let py = TOP + plot_h - plot_h * (p / p99_top.max(f64::MIN_POSITIVE));
            Some(format!("{:.1},{:.1}", LEFT + slot * (i as f64 + 0.5), py))
        })
        .collect();
    let label = format!("{what}: {allowed} requests allowed and {denied} denied in {} buckets", bars.len());
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(label)
            data-points=(bars.len()) data-allowed=(allowed) data-denied=(denied) {
            title { (label) }
            line.axis x1=(LEFT) y1=(TOP + plot_h) x2=(W) y2=(TOP + plot_h) {}
            text.tick x=(LEFT - 4.0) y=(TOP + 8.0) text-anchor="end" { (top) }
            text.tick x=(LEFT - 4.0) y=(TOP + plot_h) text-anchor="end" { "0" }
            text.tick x=(LEFT) y=(H - 4.0) { (first) }
            text.tick x=(W) y=(H - 4.0) text-anchor="end" { (last) }
            @for (i, b) in bars.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + slot * 0.1;
                @let bw = slot * 0.8;
                g.bar data-allowed=(b.allowed) data-denied=(b.denied) {
                    title { (b.allowed) " allowed, " (b.denied) " denied" }
                    @if b.allowed > 0 {
                        rect.allowed x={ (format!("{x:.1}")) } y={ (format!("{:.1}", y(b.allowed))) }
                            width={ (format!("{bw:.1}")) } height={ (format!("{:.1}", TOP + plot_h - y(b.allowed))) } {}
                    }
                    @if b.denied > 0 {
                        @let top_y = y(b.allowed.saturating_add(b.denied));
                        rect.denied x={ (format!("{x:.1}")) } y={ (format!("{top_y:.1}")) }
                            width={ (format!("{bw:.1}")) } height={ (format!("{:.1}", y(b.allowed) - top_y)) } {}
                    }
                }
            }
            @if !line.is_empty() {
                polyline.p99 points=(line.join(" ")) data-max-ms=(format!("{p99_top:.1}")) {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svg_holds_every_point_and_the_totals() {
        let bars = [
            Bar { allowed: 3, denied: 1, p99_ms: Some(2.0) },
            Bar::default(),
            Bar { allowed: 0, denied: 5, p99_ms: Some(4.0) },
        ];
        let svg = usage_svg(&bars, "10:00", "10:02", "acme").into_string();
        assert!(svg.contains(r#"data-points="3" data-allowed="3" data-denied="6""#), "{svg}");
        assert_eq!(svg.matches(r#"<g class="bar""#).count(), 3);
        assert_eq!(svg.matches(r#"<rect class="allowed""#).count(), 1);
        assert_eq!(svg.matches(r#"<rect class="denied""#).count(), 2);
        assert!(svg.contains(r#"<polyline class="p99""#));
        assert!(!svg.contains("style="), "no inline styles under the CSP");
    }

    #[test]
    fn an_empty_span_draws_no_bars_and_no_nan() {
        let svg = usage_svg(&[Bar::default(); 4], "a", "b", "k").into_string();
        assert!(svg.contains(r#"data-points="4" data-allowed="0" data-denied="0""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(!svg.contains("<polyline"));
    }
}
