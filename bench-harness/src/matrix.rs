//! `ringbench matrix`: a suite of named broker configurations and workloads. For each broker
//! configuration ringbench starts `ringbroker` on a fresh data directory, runs that
//! configuration's workloads, stops it, and finally writes one comparison per group of runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::broker::{BrokerConfig, BrokerProcess};
use crate::compare;
use crate::report::{Report, summary_table};
use crate::run::{PlacementOptions, RunOptions, run};
use crate::workload::{DriverKind, Workload};

/// One run of a suite: a workload on a broker configuration, both by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub broker: String,
    pub workload: String,
}

/// A group of runs rendered side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    pub name: String,
    pub description: Option<String>,
    pub runs: Vec<Case>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    #[serde(rename = "broker")]
    pub brokers: Vec<BrokerConfig>,
    #[serde(rename = "workload")]
    pub workloads: Vec<Workload>,
    /// If empty, every workload runs on every broker and one comparison shows them all.
    #[serde(default, rename = "comparison")]
    pub comparisons: Vec<Comparison>,
}

impl Suite {
    pub fn load(path: &Path) -> anyhow::Result<Suite> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let suite: Suite =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        suite.validate()?;
        Ok(suite)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let mut broker_names = BTreeSet::new();
        for b in &self.brokers {
            if !broker_names.insert(b.name.as_str()) {
                bail!("broker configuration {:?} is defined twice", b.name);
            }
        }
        let mut workload_names = BTreeSet::new();
        for w in &self.workloads {
            w.validate()
                .with_context(|| format!("workload {:?}", w.name))?;
            if !workload_names.insert(w.name.as_str()) {
                bail!("workload {:?} is defined twice", w.name);
            }
        }
        for c in &self.comparisons {
            if c.runs.is_empty() {
                bail!("comparison {:?} has no runs", c.name);
            }
            for r in &c.runs {
                if !broker_names.contains(r.broker.as_str()) {
                    bail!(
                        "comparison {:?} names unknown broker {:?}",
                        c.name,
                        r.broker
                    );
                }
                if !workload_names.contains(r.workload.as_str()) {
                    bail!(
                        "comparison {:?} names unknown workload {:?}",
                        c.name,
                        r.workload
                    );
                }
            }
        }
        Ok(())
    }

    /// The comparisons to render (the implicit all-by-all one when none is given).
    pub fn effective_comparisons(&self) -> Vec<Comparison> {
        if !self.comparisons.is_empty() {
            return self.comparisons.clone();
        }
        let runs = self
            .brokers
            .iter()
            .flat_map(|b| {
                self.workloads.iter().map(|w| Case {
                    broker: b.name.clone(),
                    workload: w.name.clone(),
                })
            })
            .collect();
        vec![Comparison {
            name: "all".to_string(),
            description: None,
            runs,
        }]
    }
}

pub struct MatrixSettings {
    pub broker_binary: PathBuf,
    pub driver: DriverKind,
    pub placement: PlacementOptions,
    pub output_dir: PathBuf,
    pub progress: bool,
    /// Shortens every workload (smoke runs); warm-up becomes a fifth of it.
    pub duration_override_s: Option<f64>,
    pub repo_dir: PathBuf,
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs the suite; returns the path of the top-level index page.
pub fn run_suite(suite: &Suite, settings: &MatrixSettings) -> anyhow::Result<PathBuf> {
    let comparisons = suite.effective_comparisons();
    let needed: BTreeSet<Case> = comparisons
        .iter()
        .flat_map(|c| c.runs.iter().cloned())
        .collect();
    let reports_dir = settings.output_dir.join("reports");
    let mut reports: BTreeMap<Case, Report> = BTreeMap::new();
    for broker in &suite.brokers {
        let cases: Vec<&Case> = needed.iter().filter(|c| c.broker == broker.name).collect();
        if cases.is_empty() {
            continue;
        }
        eprintln!(
            "== broker configuration {}: starting {}",
            broker.name,
            settings.broker_binary.display()
        );
        let mut process = BrokerProcess::start(&settings.broker_binary, broker)?;
        let mut outcome = Ok(());
        for case in cases {
            let Some(workload) = suite.workloads.iter().find(|w| w.name == case.workload) else {
                continue;
            };
            let mut workload = workload.clone();
            if let Some(d) = settings.duration_override_s {
                workload.duration_s = d;
                workload.warmup_s = d / 5.0;
                workload.stats_interval_s = workload.stats_interval_s.min(d.max(0.1));
            }
            eprintln!("-- {} on {}", workload.name, broker.name);
            let mut placement = settings.placement.clone();
            placement.broker_cpus = broker.cpus.clone();
            let opts = RunOptions {
                bootstrap: process.bootstrap(),
                driver: settings.driver,
                workload,
                placement,
                output_dir: reports_dir.clone(),
                name: Some(format!(
                    "{}--{}",
                    file_safe(&case.workload),
                    file_safe(&case.broker)
                )),
                label: Some(format!("{} @ {}", case.workload, case.broker)),
                broker: process.info(),
                progress: settings.progress,
                record_limit: None,
                worker_binary: None,
                repo_dir: settings.repo_dir.clone(),
            };
            match run(&opts) {
                Ok(done) => {
                    eprint!("{}", summary_table(&done.report));
                    reports.insert(case.clone(), done.report);
                }
                Err(e) => {
                    outcome = Err(e.context(format!(
                        "{} on {}; broker output:\n{}",
                        case.workload,
                        case.broker,
                        process.log_tail()
                    )));
                    break;
                }
            }
        }
        let stopped = process.stop();
        outcome?;
        stopped?;
    }

    let mut index = String::new();
    let _ = writeln!(
        index,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head><body style=\"font-family:sans-serif\">\n<h1>ringbench matrix: {}</h1><ul>",
        suite.name, suite.name
    );
    for c in &comparisons {
        let runs: Vec<Report> = c
            .runs
            .iter()
            .filter_map(|r| reports.get(r).cloned())
            .collect();
        let dir = settings
            .output_dir
            .join(format!("compare-{}", file_safe(&c.name)));
        let page = compare::compare_reports(&runs, &dir)?;
        let relative = page
            .strip_prefix(&settings.output_dir)
            .unwrap_or(&page)
            .display()
            .to_string();
        let _ = writeln!(
            index,
            "<li><a href=\"{relative}\">{}</a> {}</li>",
            c.name,
            c.description.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(index, "</ul></body></html>");
    let path = settings.output_dir.join("index.html");
    std::fs::write(&path, index)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_suite_parses_and_covers_the_required_comparisons() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("suites/standard.toml");
        let suite = Suite::load(&path).unwrap();
        let names: Vec<&str> = suite.comparisons.iter().map(|c| c.name.as_str()).collect();
        for wanted in ["acks", "fetch-path", "shards", "record-size"] {
            assert!(
                names.contains(&wanted),
                "missing comparison {wanted}: {names:?}"
            );
        }
        let shards: BTreeSet<u32> = suite.brokers.iter().map(|b| b.shards).collect();
        assert!(shards.contains(&1) && shards.contains(&2));
    }

    #[test]
    fn unknown_names_are_rejected() {
        let text = r#"
            name = "s"
            [[broker]]
            name = "a"
            [[workload]]
            name = "w"
            [[comparison]]
            name = "c"
            runs = [{ broker = "b", workload = "w" }]
        "#;
        let suite: Suite = toml::from_str(text).unwrap();
        assert!(suite.validate().is_err());
    }
}
