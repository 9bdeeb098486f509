//! Following a fine-tuning job from its event stream: [`Progress`] folds `metrics` events into
//! step/total, loss history, tokens/s and an ETA; [`Reporter`] shows them as an indicatif bar on
//! a terminal, or as plain lines (one per event) when stderr is a file or a pipe.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use itamae_client::JobEvent;

/// Loss values shown in the sparkline.
const SPARK_WIDTH: usize = 24;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What a job's events have said so far.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total: Option<u64>,
    pub losses: Vec<f64>,
    pub valid_loss: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// (step, created_at) of the first and latest step events: the measured pace.
    first: Option<(u64, i64)>,
    last: Option<(u64, i64)>,
}

/// How one event changed the picture.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A training step: the bar moves, no line is printed on a terminal.
    Step,
    /// Anything else worth a line of its own (messages, validation results).
    Line(String),
}

impl Progress {
    pub fn apply(&mut self, ev: &JobEvent) -> Update {
        if ev.kind != "metrics" {
            return Update::Line(ev.message.clone());
        }
        let d = &ev.data;
        if let Some(t) = d["total_steps"].as_u64() {
            self.total = Some(t);
        }
        if let Some(v) = d["valid_loss"].as_f64() {
            self.valid_loss = Some(v);
            return Update::Line(ev.message.clone());
        }
        let (Some(step), Some(loss)) = (d["step"].as_u64(), d["train_loss"].as_f64()) else {
            return Update::Line(ev.message.clone());
        };
        // A job resumed from a checkpoint replays from there: keep the history in step order.
        if step <= self.step {
            let keep = self
                .losses
                .len()
                .saturating_sub((self.step - step + 1) as usize);
            self.losses.truncate(keep);
            self.first = None;
        }
        self.step = step;
        self.losses.push(loss);
        self.tokens_per_sec = d["tokens_per_sec"].as_f64().or(self.tokens_per_sec);
        if self.first.is_none() {
            self.first = Some((step, ev.created_at));
        }
        self.last = Some((step, ev.created_at));
        Update::Step
    }

    /// Seconds left at the pace measured between the first and the latest step seen.
    pub fn eta_secs(&self) -> Option<u64> {
        let ((s0, t0), (s1, t1)) = (self.first?, self.last?);
        let total = self.total?;
        if s1 <= s0 || t1 <= t0 {
            return None;
        }
        let per_step = (t1 - t0) as f64 / (s1 - s0) as f64;
        Some((total.saturating_sub(s1) as f64 * per_step).round() as u64)
    }

    /// `loss 1.2345 ▇▆▅▃▂ · 812 tok/s · ETA 1m05s`
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = self.losses.last() {
            parts.push(format!(
                "loss {l:.4} {}",
                sparkline(&self.losses, SPARK_WIDTH)
            ));
        }
        if let Some(v) = self.valid_loss {
            parts.push(format!("valid {v:.4}"));
        }
        if let Some(t) = self.tokens_per_sec {
            parts.push(format!("{t:.0} tok/s"));
        }
        if let Some(e) = self.eta_secs() {
            parts.push(format!("ETA {}", duration(e)));
        }
        parts.join(" · ")
    }
}

/// The last `width` values as block characters scaled between their min and max.
pub fn sparkline(values: &[f64], width: usize) -> String {
    let tail: Vec<f64> = values[values.len().saturating_sub(width)..]
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = tail
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    tail.iter()
        .map(|&v| {
            let i = if hi > lo {
                ((v - lo) / (hi - lo) * (SPARK.len() - 1) as f64).round() as usize
            } else {
                SPARK.len() / 2
            };
            SPARK[i.min(SPARK.len() - 1)]
        })
        .collect()
}

/// `45s`, `3m07s`, `2h05m`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Where progress goes: a live bar on a terminal, plain lines otherwise.
pub enum Reporter {
    Bar { bar: ProgressBar, has_length: bool },
    Lines,
}

impl Reporter {
    pub fn new(job_id: &str) -> Self {
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Reporter::Lines;
        }
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(job_id.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Reporter::Bar {
            bar,
            has_length: false,
        }
    }

    pub fn status(&mut self, status: &str) {
        if let Reporter::Bar { bar, has_length } = self {
            if !*has_length {
                bar.set_message(status.to_string());
            }
        }
    }

    pub fn show(&mut self, p: &Progress, update: &Update) {
        match self {
            Reporter::Lines => match update {
                Update::Line(l) => eprintln!("{l}"),
                Update::Step => eprintln!(
                    "step {}/{} {}",
                    p.step,
                    p.total.map_or("?".into(), |t| t.to_string()),
                    p.summary()
                ),
            },
            Reporter::Bar { bar, has_length } => {
                if let Update::Line(l) = update {
                    bar.println(l);
                }
                if let (Some(total), false) = (p.total, *has_length) {
                    bar.set_length(total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix} [{bar:30}] {pos}/{len} {wide_msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("█▌ "),
                    );
                    *has_length = true;
                }
                if *has_length {
                    bar.set_position(p.step);
                    bar.set_message(p.summary());
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Reporter::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn ev(kind: &str, message: &str, created_at: i64, data: Value) -> JobEvent {
        serde_json::from_value(json!({
            "id": format!("ftevent-{created_at}"), "created_at": created_at, "level": "info",
            "message": message, "type": kind, "data": data,
        }))
        .unwrap()
    }

    fn step(n: u64, t: i64, loss: f64) -> JobEvent {
        ev(
            "metrics",
            &format!("Step {n}/10"),
            t,
            json!({"step": n, "total_steps": 10, "train_loss": loss, "tokens_per_sec": 800.0,
                   "learning_rate": 1e-4, "train_mean_token_accuracy": 0.5}),
        )
    }

    #[test]
    fn folds_steps_messages_and_validation() {
        let mut p = Progress::default();
        assert_eq!(
            p.apply(&ev("message", "Fine-tuning job started", 100, json!({}))),
            Update::Line("Fine-tuning job started".into())
        );
        assert_eq!(p.eta_secs(), None);
        assert_eq!(p.apply(&step(1, 100, 3.0)), Update::Step);
        assert_eq!(p.eta_secs(), None, "one step gives no pace");
        assert_eq!(p.apply(&step(2, 102, 2.5)), Update::Step);
        assert_eq!(p.apply(&step(3, 104, 2.0)), Update::Step);
        assert_eq!((p.step, p.total), (3, Some(10)));
        assert_eq!(p.losses, vec![3.0, 2.5, 2.0]);
        // 2 s per step, 7 steps to go.
        assert_eq!(p.eta_secs(), Some(14));
        let v = ev(
            "metrics",
            "Step 3: validation loss=2.1000",
            105,
            json!({"step": 3, "valid_loss": 2.1, "valid_mean_token_accuracy": 0.4}),
        );
        assert_eq!(
            p.apply(&v),
            Update::Line("Step 3: validation loss=2.1000".into())
        );
        assert_eq!(p.step, 3);
        assert_eq!(
            p.summary(),
            "loss 2.0000 █▅▁ · valid 2.1000 · 800 tok/s · ETA 14s"
        );
    }

    #[test]
    fn a_resumed_job_replays_from_its_checkpoint() {
        let mut p = Progress::default();
        for (i, l) in [3.0, 2.8, 2.6, 2.4].into_iter().enumerate() {
            p.apply(&step(i as u64 + 1, i as i64, l));
        }
        p.apply(&step(3, 50, 2.55));
        assert_eq!(p.step, 3);
        assert_eq!(p.losses, vec![3.0, 2.8, 2.55]);
        assert_eq!(p.eta_secs(), None, "the pace restarts after a resume");
    }

    #[test]
    fn sparklines() {
        assert_eq!(sparkline(&[], 5), "");
        assert_eq!(sparkline(&[1.0, 1.0], 5), "▅▅");
        assert_eq!(sparkline(&[4.0, 3.0, 2.0, 1.0], 5), "█▆▃▁");
        assert_eq!(
            sparkline(&[9.0, 1.0, 2.0, 3.0], 3),
            "▁▅█",
            "only the last 3"
        );
        assert_eq!(sparkline(&[1.0, f64::NAN, 2.0], 5), "▁█");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(187), "3m07s");
        assert_eq!(duration(7500), "2h05m");
    }
}
